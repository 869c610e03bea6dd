"""probes/_layout.py against probes/dw_event.h, compiled with gcc: every size, offset and constant.

The C program below is generated from the Python tables (Limits.structs) so that every field the
mirror knows is checked, and the enum/#define names are parsed out of the header so that a
constant added on the C side without a Python counterpart fails the test too.
"""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest
from driftwarden.probes import _layout
from driftwarden.probes._layout import (
    AT_FDCWD,
    COMM_LEN,
    COUNTER_MAX,
    HEADER_FIELDS,
    HEADER_SIZE,
    HEADER_STRUCT,
    KIND_MAX,
    RESULT_UNKNOWN,
    UNIX_PATH_LEN,
    Counter,
    EventKind,
    FileOp,
    Flag,
    Limits,
)

PROBES = Path(_layout.__file__).resolve().parent
HEADER = PROBES / "dw_event.h"
STRUCTS = ("dw_event_header", "dw_exec_event", "dw_connect_event", "dw_file_event",
           "dw_chdir_event", "dw_fork_event", "dw_exec_repeat_event", "dw_exit_event")
NON_DEFAULT = Limits(path_max=256, max_args=16, max_arg_len=128, args_size=2048)


def _c_program(limits: Limits, constants: list[str]) -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "dw_event.h"',
        "#define FIELD(s, f) printf(\"field %s %s %zu %zu\\n\", #s, #f, offsetof(struct s, f), "
        "sizeof(((struct s *)0)->f))",
        "int main(void) {",
    ]
    for name in STRUCTS:
        lines.append(f'    printf("size {name} %zu\\n", sizeof(struct {name}));')
        for field, _ in limits.structs[name]:
            lines.append(f"    FIELD({name}, {field});")
    for const in constants:
        lines.append(f'    printf("const {const} %lld\\n", (long long)({const}));')
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


def _header_constants() -> dict[str, list[str]]:
    """Names of enum members and #defines in dw_event.h, grouped by prefix."""
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    enum_members = re.findall(r"^\s*(DW_[A-Z0-9_]+)\s*=", text, flags=re.M)
    defines = re.findall(r"^\s*#\s*define\s+(DW_[A-Z0-9_]+)\s+\S", text, flags=re.M)
    names = enum_members + defines
    return {
        prefix: [n for n in names if n.startswith(prefix)]
        for prefix in ("DW_KIND_", "DW_CNT_", "DW_FILE_", "DW_F_")
    } | {"other": [n for n in defines if not n.startswith(("DW_F_",))]}


def _compile_and_run(limits: Limits, tmp: Path) -> tuple[dict, dict, dict]:
    groups = _header_constants()
    constants = sorted({n for names in groups.values() for n in names})
    src = tmp / "layout.c"
    exe = tmp / "layout"
    src.write_text(_c_program(limits, constants))
    subprocess.run(
        ["gcc", "-std=gnu11", "-Wall", "-Werror", "-I", str(PROBES), *limits.cflags(),
         "-o", str(exe), str(src)],
        check=True, capture_output=True, text=True, timeout=60,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10)
    sizes: dict[str, int] = {}
    fields: dict[str, dict[str, tuple[int, int]]] = {}
    consts: dict[str, int] = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if parts[0] == "size":
            sizes[parts[1]] = int(parts[2])
        elif parts[0] == "field":
            fields.setdefault(parts[1], {})[parts[2]] = (int(parts[3]), int(parts[4]))
        elif parts[0] == "const":
            consts[parts[1]] = int(parts[2])
    return sizes, fields, consts


@pytest.fixture(scope="module", params=[Limits(), NON_DEFAULT], ids=["default", "small"])
def compiled(request, tmp_path_factory, gcc_ok):
    # gcc_ok (tests/conftest.py): skips without gcc, fails under DRIFTWARDEN_REQUIRE_INTEGRATION=1
    limits = request.param
    return limits, _compile_and_run(limits, tmp_path_factory.mktemp("layout"))


def _field_size(limits: Limits, fmt: str) -> int:
    return HEADER_SIZE if fmt == "header" else struct.calcsize("<" + fmt)


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_sizes_and_offsets_match_c(compiled, name):
    limits, (sizes, fields, _) = compiled
    assert sizes[name] == limits.size(name)
    c_fields = fields[name]
    py_fields = limits.structs[name]
    assert list(c_fields) == [f for f, _ in py_fields]
    expected = {f: (limits.offsets(name)[f], _field_size(limits, fmt)) for f, fmt in py_fields}
    assert c_fields == expected


def test_python_tables_cover_every_c_byte(compiled):
    """Consecutive fields tile each struct exactly: no hidden padding on either side."""
    _, (sizes, fields, _) = compiled
    for name in STRUCTS:
        end = 0
        for field, (offset, size) in fields[name].items():
            assert offset == end, f"{name}.{field} at {offset}, previous field ended at {end}"
            end = offset + size
        assert end == sizes[name]


def test_variable_buffers_follow_limits(compiled):
    limits, (_, fields, _) = compiled
    assert fields["dw_exec_event"]["filename"][1] == limits.path_max
    assert fields["dw_exec_event"]["args"][1] == limits.args_size
    assert fields["dw_file_event"]["path"][1] == limits.path_max
    assert fields["dw_file_event"]["path2"][1] == limits.path_max
    assert fields["dw_chdir_event"]["path"][1] == limits.path_max
    assert fields["dw_connect_event"]["unix_path"][1] == UNIX_PATH_LEN


def test_fixed_struct_ends_where_the_first_buffer_starts(compiled):
    limits, (_, fields, _) = compiled
    first_buffer = {"dw_exec_event": "filename", "dw_connect_event": "addr",
                    "dw_file_event": "path", "dw_chdir_event": "path"}
    for name, buffer in first_buffer.items():
        assert limits.fixed_struct(name).size == fields[name][buffer][0]


def test_header_struct_matches_c(compiled):
    _, (sizes, fields, _) = compiled
    assert HEADER_STRUCT.size == HEADER_SIZE == sizes["dw_event_header"] == 80
    assert [f for f, _ in HEADER_FIELDS] == list(fields["dw_event_header"])


def test_limits_reach_the_compiler(compiled):
    limits, (_, _, consts) = compiled
    assert consts["DW_PATH_MAX"] == limits.path_max
    assert consts["DW_MAX_ARGS"] == limits.max_args
    assert consts["DW_MAX_ARG_LEN"] == limits.max_arg_len
    assert consts["DW_ARGS_SIZE"] == limits.args_size


def test_default_limits_are_the_header_defaults(tmp_path, gcc_ok):
    """Limits() and the header's #ifndef defaults agree (compile with no -D at all)."""
    src = tmp_path / "d.c"
    src.write_text('#include <stdio.h>\n#include "dw_event.h"\nint main(void) {\n'
                   'printf("%d %d %d %d\\n", DW_PATH_MAX, DW_MAX_ARGS, DW_MAX_ARG_LEN, '
                   "DW_ARGS_SIZE);\nreturn 0;\n}\n")
    subprocess.run(["gcc", "-I", str(PROBES), "-o", str(tmp_path / "d"), str(src)], check=True,
                   capture_output=True, timeout=60)
    out = subprocess.run([str(tmp_path / "d")], check=True, capture_output=True, text=True)
    d = Limits()
    assert out.stdout.split() == [str(d.path_max), str(d.max_args), str(d.max_arg_len),
                                  str(d.args_size)]


def _c_names(consts: dict[str, int], prefix: str, skip: tuple[str, ...] = ()) -> dict[str, int]:
    return {k[len(prefix):]: v for k, v in consts.items()
            if k.startswith(prefix) and k not in skip}


def test_event_kinds_match_c(compiled):
    _, (_, _, consts) = compiled
    c = _c_names(consts, "DW_KIND_", skip=("DW_KIND_MAX",))
    assert c == {k.name: k.value for k in EventKind}
    assert consts["DW_KIND_MAX"] == KIND_MAX == max(EventKind) + 1


def test_counters_match_c(compiled):
    _, (_, _, consts) = compiled
    c = _c_names(consts, "DW_CNT_", skip=("DW_CNT_MAX",))
    assert c == {k.name: k.value for k in Counter}
    assert consts["DW_CNT_MAX"] == COUNTER_MAX == max(Counter) + 1


def test_file_ops_match_c(compiled):
    _, (_, _, consts) = compiled
    assert _c_names(consts, "DW_FILE_") == {k.name: k.value for k in FileOp}
    assert len(FileOp) == 10


def test_flags_match_c(compiled):
    _, (_, _, consts) = compiled
    assert _c_names(consts, "DW_F_") == {k.name: k.value for k in Flag}
    assert len(Flag) == 9


def test_other_constants_match_c(compiled):
    _, (_, _, consts) = compiled
    assert consts["DW_AT_FDCWD"] == AT_FDCWD == -100
    assert consts["DW_COMM_LEN"] == COMM_LEN == 16
    assert consts["DW_UNIX_PATH_LEN"] == UNIX_PATH_LEN == 108
    assert consts["DW_RESULT_UNKNOWN"] == RESULT_UNKNOWN == 0x7FFFFFFF


def test_header_constant_parser_finds_everything():
    """Guards the regexes above: if they found nothing, the enum tests would prove little."""
    groups = _header_constants()
    assert len(groups["DW_KIND_"]) == 8
    assert len(groups["DW_CNT_"]) == 7
    assert len(groups["DW_FILE_"]) == 10
    assert len(groups["DW_F_"]) == 9


# -- Limits validation -------------------------------------------------------


def test_default_limits():
    d = Limits()
    assert d.as_dict() == {"path_max": 512, "max_args": 32, "max_arg_len": 256,
                           "args_size": 4096}
    assert d.cflags() == ["-DDW_PATH_MAX=512", "-DDW_MAX_ARGS=32", "-DDW_MAX_ARG_LEN=256",
                          "-DDW_ARGS_SIZE=4096"]
    assert Limits(**d.as_dict()) == d


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path_max": 500}, "path_max must be a power of two >= 64, got 500"),
        ({"path_max": 32}, "path_max must be a power of two >= 64, got 32"),
        ({"path_max": 0}, "path_max must be a power of two >= 64, got 0"),
        ({"args_size": 3000}, "args_size must be a power of two >= 64, got 3000"),
        ({"args_size": 32, "max_arg_len": 16}, "args_size must be a power of two >= 64, got 32"),
        ({"max_args": 0}, "max_args must be 1..128, got 0"),
        ({"max_args": 129}, "max_args must be 1..128, got 129"),
        ({"max_arg_len": 15}, "max_arg_len must be 16..args_size, got 15"),
        ({"max_arg_len": 4097}, "max_arg_len must be 16..args_size, got 4097"),
        ({"args_size": 1024, "max_arg_len": 2048}, "max_arg_len must be 16..args_size, got 2048"),
    ],
)
def test_limits_validation(kwargs, message):
    with pytest.raises(ValueError) as info:
        Limits(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize("kwargs", [
    {"path_max": 64}, {"args_size": 64, "max_arg_len": 64}, {"max_args": 1}, {"max_args": 128},
    {"max_arg_len": 16}, {"max_arg_len": 4096},
])
def test_limits_boundaries_accepted(kwargs):
    limits = Limits(**kwargs)
    for key, value in kwargs.items():
        assert getattr(limits, key) == value


def test_wake_kinds_become_a_kind_mask_define():
    from driftwarden.core.errors import UsageError
    from driftwarden.probes.loader import SELECTABLE_KINDS, ProbeConfig

    def wake_define(config: ProbeConfig) -> str:
        [flag] = [f for f in config.cflags() if f.startswith("-DDW_WAKE_KINDS=")]
        return flag

    exec_bit = 1 << int(SELECTABLE_KINDS["exec"])
    assert wake_define(ProbeConfig()) == f"-DDW_WAKE_KINDS={exec_bit}"  # execs wake by default
    assert wake_define(ProbeConfig(wake_kinds=frozenset())) == "-DDW_WAKE_KINDS=0"
    both = exec_bit | 1 << int(SELECTABLE_KINDS["connect"])
    assert wake_define(ProbeConfig(wake_kinds=frozenset({"exec", "connect"}))) == (
        f"-DDW_WAKE_KINDS={both}")
    with pytest.raises(UsageError, match=r"^unknown event kind\(s\) \['fork'\] to wake on: "
                                         r"choose from exec,connect,write$"):
        ProbeConfig(wake_kinds=frozenset({"fork"}))
