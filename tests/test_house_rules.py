"""The house rules of DESIGN.md, enforced: no import cycle between modules, no private name imported
from another module, no file over 500 lines and no function over 60 lines outside the allowlist
below (each entry says why), and no absolute machine path in src/, tests/ or bench/.

The import graph counts every import, module-level or inside a function: a lazy import still ties
the two modules together for a reader. A package ``__init__`` that imports its own submodules is an
edge like any other, so a submodule importing its package back is a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "bitsmith"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60

# path (relative to the repository) or path:function -> why it may be longer
ALLOWLIST: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges() -> tuple[dict[str, set[str]], list[str]]:
    """module -> the bitsmith modules it imports, and every ``from X import _private`` across modules."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges[module].update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(module, path, node)
                if not target or target not in mods:
                    continue
                for alias in node.names:
                    child = f"{target}.{alias.name}"
                    if child in mods:
                        edges[module].add(child)
                        continue
                    edges[module].add(target)
                    if alias.name.startswith("_") and target != module:
                        private.append(f"{module} imports {target}.{alias.name}")
    for module in edges:
        edges[module].discard(module)
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    edges, _ = import_edges()
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_private_names_imported_across_modules():
    _, private = import_edges()
    assert not private, "\n".join(private)


def _source_files():
    for pattern in ("*.py", "*.cpp", "*.h"):
        yield from PACKAGE.rglob(pattern)


def test_files_are_short():
    long = []
    for path in _source_files():
        rel = str(path.relative_to(ROOT))
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES and rel not in ALLOWLIST:
            long.append(f"{rel}: {lines} lines")
    assert not long, f"files over {MAX_FILE_LINES} lines (split them, or allowlist with a reason):\n" + "\n".join(long)


def test_functions_are_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in ALLOWLIST:
                    long.append(f"{rel}:{node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_allowlist_entries_are_still_needed():
    """An entry whose file or function got short again is stale: the list stays a list of real exceptions."""
    stale = []
    for key in ALLOWLIST:
        rel, _, function = key.partition(":")
        path = ROOT / rel
        if not path.exists():
            stale.append(f"{key}: no such file")
            continue
        if not function:
            if len(path.read_text().splitlines()) <= MAX_FILE_LINES:
                stale.append(f"{key}: now short")
            continue
        nodes = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name == function]
        if not nodes or all(n.end_lineno - n.lineno + 1 <= MAX_FUNCTION_LINES for n in nodes):
            stale.append(f"{key}: now short or gone")
    assert not stale, "\n".join(stale)


# Paths of this or any other machine: a fresh clone must run without them.
MACHINE_PATH = re.compile(r"""(?<![\w.])(/work/|/root/|/home/\w|/Users/\w|\.\./shared|/tmp/)|["']shared["']\s*/|/\s*["']shared["']""")


def test_no_machine_paths_in_the_project():
    hits = []
    for folder in ("src", "tests", "bench"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".sh", ".cpp", ".h", ".toml", ".cfg") or path == Path(__file__).resolve():
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if MACHINE_PATH.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "absolute or machine-specific paths:\n" + "\n".join(hits)


def test_tests_import_no_private_names() -> None:
    """Tests hold the public surface: a private name they need is a name to make public."""
    private = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bitsmith"):
                private += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, "\n".join(private)
