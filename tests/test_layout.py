"""The package's layout: layers import downward only (no import cycle, lazy imports included)
and no module grows past about 400 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adapter_plus_jax"
MAX_LINES = 420


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere (but under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found - {_module_name(path)}


def test_no_import_cycles() -> None:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(paths)) for name, path in paths.items()}
    # A package's __init__ may re-export its submodules; the edge back from them is implicit.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    done, stack = set(), []

    def visit(name: str) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(name):], name]))
        if name in done:
            return
        stack.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_modules_stay_small() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {name: n for name, n in sizes.items() if n > MAX_LINES}


# ----------------------------------------------------------------------------------------------
# The README's module table: complete, and in the order of the imports.

README = PACKAGE.parent / "README.md"


def _table_order() -> list[str]:
    """The units of the README's module table in order: module names ('adapter_plus_jax.x'),
    or a package ('adapter_plus_jax.data') for a row entry ending in '/'."""
    text = README.read_text()
    table = text.split("| file | what it holds |", 1)[1].split("\n\n", 1)[0]
    order = []
    for row in table.splitlines()[2:]:
        for entry in re.findall(r"`([\w/]+(?:\.py)?)`", row.split("|")[1]):
            if entry.endswith("/") and (PACKAGE / entry).is_dir():
                order.append(f"adapter_plus_jax.{entry.rstrip('/')}")
            elif (PACKAGE / entry).is_file():
                order.append(f"adapter_plus_jax.{entry.removesuffix('.py')}")
            else:  # files outside the package (main.py, docs/, tests/)
                assert (PACKAGE.parent / entry).exists(), f"README's table names {entry}"
    return order


def _unit(name: str, order: list[str]) -> str:
    """The table entry that holds module `name` (itself, or its package's row)."""
    return next(u for u in order if name == u or name.startswith(u + "."))


def test_readme_module_table_is_complete_and_in_import_order() -> None:
    """Every module of the package is in the README's table (bar `__init__` and `__main__`,
    which import the rest), and imports only modules of the rows above it or of its own
    package: the table's claim 'each module imports only the ones above it'."""
    order = _table_order()
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    entry_points = {"adapter_plus_jax", "adapter_plus_jax.__main__"}
    listed = {m for m in paths if m not in entry_points}
    missing = sorted(m for m in listed if not any(m == u or m.startswith(u + ".") for u in order))
    assert not missing, f"README's module table lacks {missing}"
    upward = []
    for name in sorted(listed):
        unit = _unit(name, order)
        for dep in sorted(_imports(paths[name], set(paths)) - entry_points):
            dep_unit = _unit(dep, order)
            if dep_unit != unit and order.index(dep_unit) > order.index(unit):
                upward.append(f"{name} imports {dep}")
    assert not upward, upward


# ----------------------------------------------------------------------------------------------
# Comments and docstrings say what and why; measured figures live in docs/.

# Measurements: timings, throughput, speed ratios, memory sizes, dates, machines.
FIGURES = re.compile(
    r"\b\d+(?:\.\d+)?\s?(?:ms|µs|s|min|minutes|hours)\b"
    r"|\b(?:img|images|examples|steps)/s\b|FLOP/s"
    r"|\b\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?x\b"
    r"|\b\d+(?:\.\d+)?\s?(?:kB|KB|MB|GB|KiB|MiB|GiB)\b"
    r"|\b\d+(?:\.\d+)?%"
    r"|\b20\d\d-\d\d-\d\d\b"
    r"|\b(?:EPYC|Xeon|H100|H200|A100|V100|Firecracker)\b"
)


def _comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    import io
    import tokenize

    source = path.read_text()
    found = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    found.append((body[0].lineno, body[0].value.value))
    return found


def test_no_measured_figures_in_comments_or_docstrings() -> None:
    """Benchmark figures, dates and machine names are kept in docs/performance.md (or the
    README), where they are dated and sourced; the package's comments and docstrings refer
    there instead of repeating numbers that go stale."""
    hits = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {match.group(0)!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, text in _comments_and_docstrings(path)
        for match in FIGURES.finditer(text)
    ]
    assert not hits, "\n".join(hits)
