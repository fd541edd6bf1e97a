"""The import graph of lorad's own code, read with `ast` (no module is imported), for
tests/unit/test_layers.py.

Every `import` and `from ... import` counts, at any depth: module level, inside functions and
under `if TYPE_CHECKING:` (a lazy import is still a dependency; lazy imports are how the last
circle stayed hidden). Nodes are modules (`daemon.jobs`, `engines.mflux.engine`); an import of a
package means its `__init__`, and `from pkg import name` means the submodule `pkg.name` when one
exists. Only edges between modules of the scanned tree are kept.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    """`daemon/intake/take.py` -> `daemon.intake.take`; a package's `__init__.py` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def scan(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Every module under the given top-level packages: name -> file."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(path, root)] = path
    return found


def _absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) `from` import names."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a scanned module (`daemon.fsutil.x` -> `daemon.fsutil`)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The scanned modules one module imports (itself and its own parent packages left out:
    importing a submodule runs its package's `__init__` anyway, and that is not a design choice)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(_target(alias.name, modules) or "")
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, name, is_package)
            for alias in node.names:
                found.add(_target(f"{base}.{alias.name}", modules) or _target(base, modules) or "")
    parents = {".".join(name.split(".")[:end]) for end in range(1, name.count(".") + 1)}
    return {target for target in found if target and target != name and target not in parents}


def graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """importer -> the scanned modules it imports."""
    modules = scan(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted: every
    import circle lies inside one of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


@dataclass(frozen=True)
class Layer:
    """One floor of the declared order: the modules on it (a name covers the module and, for a
    package, every module under it; `exact` names cover only the module itself, e.g. a package's
    `__init__`)."""

    name: str
    prefixes: tuple[str, ...]
    exact: tuple[str, ...] = ()


def layer_of(module: str, layers: tuple[Layer, ...]) -> int:
    """The index (0 = ground floor) of the layer whose longest prefix matches the module."""
    best, best_len = -1, -1
    for number, layer in enumerate(layers):
        if module in layer.exact:
            return number
        for prefix in layer.prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = number, len(prefix)
    if best < 0:
        raise LookupError(f"module {module} is on no declared layer: add it to the layer table")
    return best


def upward_edges(edges: dict[str, set[str]], layers: tuple[Layer, ...]) -> list[tuple[str, str]]:
    """Imports from a lower layer to a higher one, sorted."""
    return sorted(
        (importer, target)
        for importer, targets in edges.items()
        for target in targets
        if layer_of(target, layers) > layer_of(importer, layers)
    )


def crossings(edges: dict[str, set[str]], source: str, forbidden: str) -> list[tuple[str, str]]:
    """Edges from modules under `source` to modules under `forbidden` (e.g. engines -> daemon)."""

    def under(module: str, package: str) -> bool:
        return module == package or module.startswith(package + ".")

    return sorted(
        (importer, target)
        for importer, targets in edges.items()
        for target in targets
        if under(importer, source) and under(target, forbidden)
    )
