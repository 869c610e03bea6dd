"""probes/_layout.py's map layouts (MAP_LAYOUTS, the ctypes key/value structs) against the map
declarations and structs of probes/driftwarden.bpf.c, compiled with gcc: ProbeSet reads and
writes these maps through libbpf with nothing but these types, so a field added on the C side
without its mirror must fail here (ProbeSet.start also checks the sizes the kernel reports)."""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import pytest
from driftwarden.probes import _layout
from driftwarden.probes._layout import MAP_LAYOUTS, RINGBUF_MAP

SOURCE = Path(_layout.__file__).resolve().parent / "driftwarden.bpf.c"
MIRRORED = {"dw_dedup_key": _layout.DedupKey, "dw_known_val": _layout.KnownVal,
            "dw_budget_key": _layout.BudgetKey, "dw_budget_val": _layout.BudgetVal}
# what the bcc macros declare: (key type, value type, per CPU); arrays are keyed by u32
_DECLARATION = re.compile(
    r"^\s*(?:BPF_(?P<macro>HASH|ARRAY|PERCPU_ARRAY)\((?P<args>[^;]*?)\)|"
    r"BPF_F_TABLE\(\"(?P<ftype>\w+)\",(?P<fargs>[^;]*?)\)|"
    r"BPF_RINGBUF_OUTPUT\((?P<ring>\w+),[^;]*?\))\s*;", re.M | re.S)


def _text() -> str:
    return re.sub(r"/\*.*?\*/", "", SOURCE.read_text(), flags=re.S)


def _declarations() -> dict[str, tuple[str, str, bool]]:
    out: dict[str, tuple[str, str, bool]] = {}
    for match in _DECLARATION.finditer(_text()):
        if match["ring"]:
            out[match["ring"]] = ("", "", False)
        elif match["macro"]:
            args = [a.strip() for a in match["args"].split(",")]
            if match["macro"] == "HASH":
                out[args[0]] = (args[1], args[2], False)
            else:
                out[args[0]] = ("u32", args[1], match["macro"] == "PERCPU_ARRAY")
        else:
            args = [a.strip() for a in match["fargs"].split(",")]
            out[args[2]] = (args[0], args[1], "percpu" in match["ftype"])
    return out


def _struct_sources() -> str:
    text = _text()
    found = []
    for name in MIRRORED:
        match = re.search(rf"^struct {name} \{{.*?^\}};", text, flags=re.M | re.S)
        assert match, f"struct {name} is not in {SOURCE.name}"
        found.append(match.group(0))
    return "\n".join(found)


@pytest.fixture(scope="module")
def c_sizes(gcc_ok, tmp_path_factory) -> dict[str, int]:
    """"sizeof X" and "offsetof S.f" -> value, from gcc on the C declarations."""
    declarations = _declarations()
    lines = ["#include <stdio.h>", "#include <stddef.h>",
             "typedef unsigned long long u64; typedef unsigned int u32; typedef int s32;",
             "typedef unsigned short u16; typedef unsigned char u8;",
             _struct_sources(), "int main(void) {"]
    for name, cls in MIRRORED.items():
        lines.append(f'printf("sizeof struct {name} %zu\\n", sizeof(struct {name}));')
        for field, _ in cls._fields_:
            lines.append(f'printf("offsetof {name}.{field} %zu\\n", '
                         f"offsetof(struct {name}, {field}));")
    for name in MAP_LAYOUTS:
        key, value, _ = declarations[name]
        lines.append(f'printf("sizeof {name}.key %zu\\n", sizeof({key}));')
        lines.append(f'printf("sizeof {name}.value %zu\\n", sizeof({value}));')
    lines += ["return 0;", "}"]
    tmp = tmp_path_factory.mktemp("maps")
    (tmp / "maps.c").write_text("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(tmp / "maps"), str(tmp / "maps.c")],
                   check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(tmp / "maps")], check=True, capture_output=True, text=True)
    return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1])
            for line in out.stdout.splitlines()}


@pytest.mark.parametrize("name", sorted(MIRRORED))
def test_mirrored_structs_match_c(c_sizes, name):
    cls = MIRRORED[name]
    assert ctypes.sizeof(cls) == c_sizes[f"sizeof struct {name}"]
    for field, _ in cls._fields_:
        assert getattr(cls, field).offset == c_sizes[f"offsetof {name}.{field}"], field
    # every byte of the C struct has a field on the Python side
    assert sum(getattr(cls, f).size for f, _ in cls._fields_) == ctypes.sizeof(cls)


@pytest.mark.parametrize("name", sorted(MAP_LAYOUTS))
def test_map_layouts_match_the_declarations(c_sizes, name):
    layout = MAP_LAYOUTS[name]
    assert ctypes.sizeof(layout.key) == c_sizes[f"sizeof {name}.key"]
    assert ctypes.sizeof(layout.value) == c_sizes[f"sizeof {name}.value"]
    assert layout.per_cpu == _declarations()[name][2]


def test_the_declaration_parser_finds_every_map():
    """Guards the regex: the maps userspace uses, the ring buffer, and the program's own."""
    declarations = _declarations()
    assert set(MAP_LAYOUTS) | {RINGBUF_MAP} <= set(declarations)
    assert declarations["budget"] == ("struct dw_budget_key", "struct dw_budget_val", False)
    assert declarations["counters"] == ("u32", "u64", True)
    assert declarations["known"] == ("struct dw_dedup_key", "struct dw_known_val", False)
    assert len(declarations) >= 18
