"""The house: a module's import name is its place on disk, and imports go one way.

Roles, bottom to top: core < probes < models < agent | collector < ops < cli. The agent, the
collector and the operator tools never import each other (function-level imports included);
models depend on the core and the event records only; importing the collector loads no probe
code and no bcc.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROLES = ("core", "probes", "models", "agent", "collector", "ops", "cli", "proto")
# what each role may import from driftwarden (besides itself)
ALLOWED = {
    "core": {"core", "proto"},
    "probes": {"core"},
    "models": {"core", "probes.events", "probes._layout"},
    "agent": {"core", "probes", "models", "proto"},
    "collector": {"core", "proto"},
    "ops": {"core", "proto"},
    "cli": {"core", "agent", "collector", "ops"},
    "proto": set(),
}


def modules() -> list[tuple[str, Path]]:
    out = []
    for role in ROLES:
        for path in sorted((REPO / role).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join(("driftwarden", *parts)), path))
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node that runs: all of them but what sits under ``if TYPE_CHECKING:`` (a
    type-only name: core.records names the probes' event type for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def driftwarden_imports(path: Path) -> set[str]:
    """Every driftwarden module a file imports at run time, at any depth (function-level
    imports too)."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("driftwarden."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "driftwarden":
                found.update(f"driftwarden.{a.name}" for a in node.names)
            elif node.module.startswith("driftwarden."):
                found.add(node.module)
    return found


def test_every_package_folder_is_installed_under_its_own_name():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"driftwarden": "."}
    packages = {name for name, path in modules() if path.name == "__init__.py"}
    # a folder left out of this list is missing from every non-editable install (the image)
    assert packages | {"driftwarden"} == set(setuptools["packages"])


@pytest.mark.parametrize("name, path", modules(), ids=lambda v: str(v))
def test_import_name_is_the_place_on_disk(name, path):
    spec = importlib.util.find_spec(name)
    assert spec is not None and Path(spec.origin).resolve() == path.resolve()


@pytest.mark.parametrize("name, path", [(n, p) for n, p in modules()
                                        if not n.startswith("driftwarden.proto")],
                         ids=lambda v: str(v))
def test_imports_go_one_way(name, path):
    role = name.split(".")[1]
    allowed = ALLOWED[role] | {role}
    bad = sorted(m for m in driftwarden_imports(path)
                 if not any(m == f"driftwarden.{a}" or m.startswith(f"driftwarden.{a}.")
                            for a in allowed))
    assert not bad, f"{name} ({role}) imports {bad}; {role} may import only {sorted(allowed)}"


def test_importing_the_collector_loads_no_agent_probe_or_bcc_code():
    code = ("import sys, driftwarden.collector.service, driftwarden.collector.server, "
            "driftwarden.collector.command\n"
            "print('\\n'.join(m for m in sys.modules if m == 'bcc' or m.startswith("
            "('bcc.', 'driftwarden.agent', 'driftwarden.probes', 'driftwarden.ops'))))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == []


def test_the_operator_tools_load_no_agent_or_collector_code():
    code = ("import sys, driftwarden.ops.command\n"
            "print('\\n'.join(m for m in sys.modules if m == 'bcc' or m.startswith("
            "('driftwarden.agent', 'driftwarden.probes', 'driftwarden.collector'))))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == []


def test_a_wheel_carries_every_module_and_the_probe_and_proto_sources(tmp_path):
    """What the image gets (`pip install .`): every module, the BPF C and the .proto files."""
    # built from a copy: setuptools leaves build/ and *.egg-info behind, and a stale build/
    # would hide a package missing from pyproject.toml
    source = tmp_path / "src"
    for role in ROLES:
        shutil.copytree(REPO / role, source / role,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "__main__.py"):
        shutil.copy2(REPO / name, source / name)
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path), str(source)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = tmp_path.glob("driftwarden-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"driftwarden/" + str(path.relative_to(REPO)) for _, path in modules()}
    expected |= {"driftwarden/" + str(p.relative_to(REPO))
                 for pattern in ("probes/*.c", "probes/*.h", "proto/v1/*.proto")
                 for p in REPO.glob(pattern)}
    expected.add("driftwarden/__main__.py")
    assert expected <= names, sorted(expected - names)
