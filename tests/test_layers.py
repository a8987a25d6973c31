"""The package's layering (docs/architecture.md): the library never imports the CLI layer, module-level
imports form no cycle, and the pure core never imports the pipelines. Read from the source with ``ast``
(nothing is imported), so a new violation anywhere fails here with the modules named."""

from __future__ import annotations

import ast
from pathlib import Path

import noiserater

PKG = Path(noiserater.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The noiserater modules ``path`` imports (absolute names); with ``top_level_only`` only the imports
    that run when the module is imported (not those inside functions)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = list(ast.walk(tree))
    if top_level_only:  # also imports under module-level if/try blocks
        nodes = [n for top in tree.body for n in ast.walk(top)
                 if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for top in tree.body:
            if isinstance(top, ast.ClassDef):  # class bodies run at import; their methods do not
                nodes += [n for stmt in top.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))
                          for n in ast.walk(stmt)]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("noiserater")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("noiserater"):
                continue
            out.add(mod)
            for a in node.names:  # ``from . import x`` / ``from .pkg import submodule``
                if (PKG.parent / (mod.replace(".", "/") + "/" + a.name + ".py")).exists() or \
                        (PKG.parent / (mod.replace(".", "/") + "/" + a.name)).is_dir():
                    out.add(f"{mod}.{a.name}")
    return out


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def test_no_library_module_imports_the_cli_layer():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("noiserater.commands") or name in ("noiserater.cli", "noiserater.__main__"):
            continue
        bad = sorted(m for m in _imports(path, top_level_only=False)
                     if m.startswith("noiserater.commands") or m == "noiserater.cli")
        if bad:
            offenders.append(f"{name} -> {', '.join(bad)}")
    assert not offenders, "library modules import the CLI layer:\n" + "\n".join(offenders)


def _resolve(mod: str, modules: dict[str, Path]) -> str | None:
    while mod and mod not in modules:
        mod = mod.rpartition(".")[0]
    return mod or None


def test_imports_have_no_cycle():
    """No cycle, counting the imports inside functions too (a lazy import hides a cycle, it does not remove it)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = {_resolve(m, modules) for m in _imports(path, top_level_only=False)}
        # importing a submodule imports its package __init__ first: parents are not a cycle of their own
        graph[name] = {d for d in deps if d and d != name and not name.startswith(d + ".")}
    # a package's __init__ that re-exports its submodules depends on them: fine, unless they import back
    color: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(n: str) -> None:
        color[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if color.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in color:
                visit(d)
        stack.pop()
        color[n] = 2

    for n in sorted(graph):
        if n not in color:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_core_does_not_import_the_pipelines():
    core = ("noiserater.models", "noiserater.meta.losses", "noiserater.meta.gradient", "noiserater.meta.inner_optim",
            "noiserater.meta.oracle", "noiserater.diffusion", "noiserater.objectives", "noiserater.randomness",
            "noiserater.selection", "noiserater.config", "noiserater.data")
    pipelines = ("noiserater.train", "noiserater.metatrain", "noiserater.evaluate", "noiserater.study",
                 "noiserater.analysis", "noiserater.bench", "noiserater.run")
    offenders = []
    for name, path in _modules().items():
        if not name.startswith(core):
            continue
        bad = sorted(m for m in _imports(path, top_level_only=False)
                     if any(m == p or m.startswith(p + ".") for p in pipelines))
        if bad:
            offenders.append(f"{name} -> {', '.join(bad)}")
    assert not offenders, "core modules import pipelines / run infrastructure:\n" + "\n".join(offenders)


def _importers(target: str) -> set[str]:
    """Modules outside ``target`` (a package) that import it or anything in it, anywhere in their code."""
    out = set()
    for name, path in _modules().items():
        if name == target or name.startswith(target + "."):
            continue
        if any(m == target or m.startswith(target + ".") for m in _imports(path, top_level_only=False)):
            out.add(name)
    return out


def test_studies_are_imported_only_by_the_cli_and_analyses_only_by_studies_and_the_cli():
    cli = lambda n: n.startswith("noiserater.commands") or n in ("noiserater.cli", "noiserater.__main__")  # noqa: E731
    assert {n for n in _importers("noiserater.study") if not cli(n)} <= {"noiserater"}  # the lazy top-level exports
    assert {n for n in _importers("noiserater.analysis")
            if not cli(n) and not n.startswith("noiserater.study")} == set()


def test_the_checker_sees_a_planted_violation():
    """The checks above are not vacuous: a planted module importing the CLI is found."""
    planted = PKG / "_planted_layer_violation.py"
    planted.write_text("from .commands import train\n")
    try:
        assert "noiserater.commands" in _imports(planted, top_level_only=True)
        try:
            test_no_library_module_imports_the_cli_layer()
        except AssertionError as e:
            assert "_planted_layer_violation" in str(e)
        else:
            raise AssertionError("the CLI-layer check missed a planted violation")
    finally:
        planted.unlink()


def test_the_cycle_check_sees_a_planted_cycle():
    a, b = PKG / "_planted_cycle_a.py", PKG / "_planted_cycle_b.py"
    a.write_text("from . import _planted_cycle_b\n")
    b.write_text("from ._planted_cycle_a import x\n")
    try:
        try:
            test_imports_have_no_cycle()
        except AssertionError as e:
            assert "_planted_cycle_a" in str(e) and "_planted_cycle_b" in str(e)
        else:
            raise AssertionError("the cycle check missed a planted cycle")
    finally:
        a.unlink()
        b.unlink()
