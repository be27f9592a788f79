"""The package's structure: layers with no upward import, no import cycle, short functions.

The layers are written down once, in pyproject.toml (``[tool.importlinter]``); CONTRIBUTING.md shows
them and a test keeps the two equal. Imports inside functions count like any other (grimp reads every
import statement of a module); for layers, so do imports under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import re
import sys
import textwrap
from pathlib import Path

import grimp
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "derestainer"

#: Longest function allowed (lines, decorators excluded), outside data tables.
MAX_FUNCTION_LINES = 80
#: Modules that may run longer than ``MAX_MODULE_LINES``: none today.
MAX_MODULE_LINES = 450
LONG_MODULES: dict[str, str] = {}


def _layer_spec() -> list[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = [c for c in cfg["tool"]["importlinter"]["contracts"] if c["id"] == "layers"]
    return list(contract["layers"])


def _grimp_layers(spec: list[str]) -> list[grimp.Layer]:
    return [grimp.Layer(*[t.strip() for t in entry.split("|")], independent=True) for entry in spec]


def _illegal(package: str, spec: list[str]) -> list[str]:
    graph = grimp.build_graph(package)
    deps = graph.find_illegal_dependencies_for_layers(layers=_grimp_layers(spec), containers={package})
    out = []
    for dep in sorted(deps, key=lambda d: (d.importer, d.imported)):
        for route in dep.routes:
            via = f" via {' -> '.join(route.middle)}" if route.middle else ""
            out += [f"{head} -> {tail}{via}" for head in sorted(route.heads) for tail in sorted(route.tails)]
    return out


def _cycles(package: str) -> list[list[str]]:
    """Every import cycle between modules of ``package`` (Tarjan's strongly connected components).

    Imports under ``if TYPE_CHECKING:`` are left out: they exist for annotations only and are never
    executed (the training steps annotate their ``Trainer`` argument that way).
    """
    graph = grimp.build_graph(package, exclude_type_checking_imports=True)
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            comp = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                comp.append(n)
                if n == m:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for m in modules:
        if m not in index:
            visit(m)
    return found


def test_every_layer_exists_and_every_top_level_module_has_a_layer() -> None:
    spec = _layer_spec()
    tails = {t.strip() for entry in spec for t in entry.split("|")}
    present = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
               if (p.is_file() and p.suffix == ".py" and p.stem not in ("__init__", "__main__"))
               or (p.is_dir() and (p / "__init__.py").is_file())}
    assert tails == present, f"layers {sorted(tails)} vs modules {sorted(present)}"


def test_no_upward_import() -> None:
    illegal = _illegal("derestainer", _layer_spec())
    assert not illegal, "imports from a lower layer into a higher one:\n" + "\n".join(illegal)


def test_no_import_cycle() -> None:
    cycles = _cycles("derestainer")
    assert not cycles, f"import cycles: {cycles}"


def test_package_root_imports_only_the_foundation() -> None:
    graph = grimp.build_graph("derestainer")
    imported = graph.find_modules_directly_imported_by("derestainer")
    assert imported and all(m.startswith("derestainer.core.") for m in imported), imported


def _make_package(tmp_path: Path, files: dict[str, str]) -> str:
    name = "fakepkg_layers"
    for rel, text in files.items():
        p = tmp_path / name / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return name


def test_the_checks_catch_an_upward_import_inside_a_function_and_a_cycle(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks can fail: a lazy upward import and a two-module cycle in a throw-away package."""
    name = _make_package(tmp_path, {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/base.py": "def f():\n    from fakepkg_layers.cli import main  # upward, inside a function\n    return main\n",
        "cli/__init__.py": "from fakepkg_layers.core import base\nmain = base\n",
        "core/a.py": "from fakepkg_layers.core import b\n",
        "core/b.py": "from fakepkg_layers.core import a\n",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    illegal = _illegal(name, ["cli", "core"])
    assert any("fakepkg_layers.core.base -> fakepkg_layers.cli" in line for line in illegal), illegal
    assert [f"{name}.core.a", f"{name}.core.b"] in _cycles(name)


def test_contributing_shows_the_layers_of_pyproject() -> None:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    block = re.search(r"<!-- layers -->\n```text\n(.*?)```", text, re.S)
    assert block, "CONTRIBUTING.md needs the layer block"
    shown = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    shown = [re.sub(r"^\d+\.\s*", "", line) for line in shown if line]
    assert shown == _layer_spec()


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_over_the_limit() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for fn in _functions(ast.parse(path.read_text())):
            n = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if n > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_no_module_over_the_limit() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES and rel not in LONG_MODULES:
            long.append(f"{rel} ({n} lines)")
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_one_error_base_and_no_error_class_outside_core() -> None:
    from derestainer.core import errors

    user_errors = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert all(issubclass(e, errors.DerestainerError) for e in user_errors)
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "core" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith("Error") or b.id == "Exception") for b in node.bases):
                outside.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert not outside, f"exception classes outside derestainer.core.errors: {outside}"


def test_version_matches_pyproject() -> None:
    import derestainer

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert derestainer.__version__ == cfg["project"]["version"]
