"""The layout keeps its plan: packages per layer, imports only downwards, no cycles,
TensorFlow only in the training layer, no module over 400 lines (docs/architecture.md).

Read from the source with ``ast``, every import counted, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "trainjob"

# The layers, lowest first: a module imports modules of its own layer or of lower ones.
LAYERS = [
    {"trainjob", "trainjob.errors"},
    {"trainjob.hooks"},
    {"trainjob.store"},
    {"trainjob.data", "trainjob.termination"},
    {"trainjob.config"},
    {"trainjob.run"},
    {"trainjob.inspect"},
    {"trainjob.train"},
    {"trainjob.job", "trainjob.commands"},
    {"trainjob.cli"},
]
TOP_LEVEL = {"__init__.py", "cli.py", "job.py", "config.py", "errors.py", "hooks.py",
             "termination.py"}
TENSORFLOW = ("tensorflow", "keras", "tf_keras")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names), at any depth of the file."""
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test)
                   for n in ast.walk(block)}  # never imported when the code runs
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports(path) if m in mods and m != name}
            for name, path in mods.items()}


def layer(module: str) -> int:
    for rank, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names if n != "trainjob"):
            return rank
    assert module == "trainjob", f"{module} belongs to no layer: add it to LAYERS"
    return 0


def test_every_import_goes_down_or_across_never_up():
    upward = [(name, dep) for name, deps in graph().items() for dep in deps
              if layer(dep) > layer(name)]
    assert upward == [], "imports from a lower layer into a higher one"


def test_no_import_cycles():
    edges, cycles = graph(), []

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(edges[node]):
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start])
    assert cycles == []


def test_tensorflow_is_imported_only_by_the_training_layer():
    outside = [name for name, path in modules().items()
               if not name.startswith("trainjob.train")
               and any(m.split(".")[0] in TENSORFLOW for m in imports(path))]
    assert outside == []


def test_the_top_holds_six_modules_and_every_package_says_what_it_owns():
    top = {p.name for p in SRC.glob("*.py")}
    assert top == TOP_LEVEL
    for package in [p for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__"]:
        init = package / "__init__.py"
        assert init.is_file(), f"{package.name} is not a package"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{package.name}/__init__.py: say what it may import"


def test_no_module_over_400_lines():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}


def test_test_modules_have_unique_names():
    """The test folders are not packages: pytest imports each test module by its bare name,
    so two ``test_x.py`` in different folders fail collection on a clean checkout."""
    names = [p.name for p in (SRC.parents[1] / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_the_docs_import_modules_that_exist():
    """Every ``import trainjob...`` / ``from trainjob... import x`` in the README and docs/
    names a module (or a module's attribute) that is there: the layout moved them once."""
    import importlib
    import re

    root = SRC.parents[1]
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    found = []
    for path in texts:
        for match in re.finditer(r"from (trainjob[\w.]*) import (\w+)|import (trainjob[\w.]*)",
                                 path.read_text()):
            module = match.group(1) or match.group(3)
            found.append((path.name, module, match.group(2)))
    assert found, "no import in the docs: the pattern is wrong"
    for where, module, name in found:
        imported = importlib.import_module(module)
        if name:
            assert hasattr(imported, name) or importlib.util.find_spec(
                f"{module}.{name}") is not None, f"{where}: from {module} import {name}"
