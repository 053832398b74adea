"""The package as a whole: its import graph has no cycle, modules stay readable, and the command
line starts without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "cdmbench"
MAX_LINES = 500  # a longer module says why at its top ("Longer than ...")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """cdmbench modules ``path`` imports anywhere in it (inside functions too: a deferred import
    still ties the modules together); ``from pkg import name`` counts pkg.name when that is a
    module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) for name, path in found.items()}


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["cdmbench.errors"] = graph["cdmbench.errors"] | {"cdmbench.recipe.schema"}
    cycle = find_cycle(graph)
    assert cycle and cycle[0] == cycle[-1] and "cdmbench.errors" in cycle


def test_imports_of_resolves_relative_and_deferred_imports(tmp_path, monkeypatch):
    source = tmp_path / "cdmbench" / "training" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("from ..runtime import distributed\n\ndef f():\n    from cdmbench.errors import CdmbenchError\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    known = {"cdmbench.runtime", "cdmbench.runtime.distributed", "cdmbench.errors"}
    assert imports_of(source, known) == known


def test_modules_are_short_or_say_why():
    long = [name for name, path in modules().items()
            if len(path.read_text().splitlines()) > MAX_LINES and "Longer than" not in path.read_text()[:2000]]
    assert not long, f"over {MAX_LINES} lines without a reason at the top: {long}"


def test_every_module_has_a_docstring():
    missing = [name for name, path in modules().items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["ls", "--help"]])
def test_command_line_starts_without_torch(args):
    """`cdmbench --help` (and a command's help) imports neither torch nor pandas: 4-5 s of CPU
    before, for a line of text."""
    code = ("import sys\nfrom cdmbench.cli import main\nsys.argv = ['cdmbench', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
            "heavy = sorted(m for m in ('torch', 'pandas', 'numpy', 'timm') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout
    assert "HEAVY []" in out.stdout, out.stdout.splitlines()[-1]
