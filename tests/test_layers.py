"""The package's layers, read from its source with ``ast``: no import points up, no cycle.

A *unit* is a subpackage (``cache``, ``evaluate``, ...) or a top-level module (``config``,
``errors``, ...) of ``regionspot_cache``; an edge is an import of one unit by another, at module
level or inside a function (a lazy import is still a dependency, so both count; the messages say
which it is). A unit may import units of its own layer or of layers below, never above.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import regionspot_cache

PACKAGE = Path(regionspot_cache.__file__).parent
ROOT = "__init__"  # the package's own __init__ (it holds __version__)

# Bottom to top.
LAYERS: list[set[str]] = [
    {ROOT, "errors"},  # import nothing of the package
    {
        "choices",
        "validated",
        "config",
        "view_specs",
        "identity",
        "runtime",
        "progress",
        "drawing",
    },  # leaves: settings and helpers
    {"data"},  # datasets, boxes, images, views
    {"encoders", "cache"},  # the frozen models; the cache format (neither imports the other)
    {"head", "regions"},  # the trained head; masks and open-set rules on regions
    {"extract", "propose", "train", "evaluate", "search", "predict"},  # the phases
    {"demo"},
    {"cli", "__main__"},
]

# Pairs of units in one layer that must not import each other, in either direction.
APART = [("encoders", "cache"), ("predict", "evaluate"), ("extract", "evaluate")]

# Edges that break the rules today, with the reason they remain. A test fails when one of them
# is gone, so that the entry is removed with it.
KNOWN: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Edge:
    source: str  # importing unit
    target: str  # imported unit
    where: str  # file:line
    lazy: bool  # inside a function

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({'in a function' if self.lazy else 'module level'}, {self.where})"


def unit_of(module: str) -> str | None:
    """``regionspot_cache.cache.reader`` -> ``cache``; None outside the package."""
    parts = module.split(".")
    if parts[0] != "regionspot_cache":
        return None
    return parts[1] if len(parts) > 1 else ROOT


def is_unit(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file()


def imported_modules(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolve against the importing module's package
        base = module.split(".")[: -node.level]
        node_module = ".".join(base + ([node.module] if node.module else []))
    else:
        node_module = node.module or ""
    if node_module == "regionspot_cache":  # ``from regionspot_cache import cli`` names a unit
        return [f"regionspot_cache.{a.name}" if is_unit(a.name) else node_module for a in node.names]
    return [node_module]


class ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, path: Path):
        self.module, self.path, self.depth, self.found = module, path, 0, []

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for name in imported_modules(node, self.module):
            self.found.append((name, node.lineno, self.depth > 0))

    visit_ImportFrom = visit_Import


def package_edges() -> list[Edge]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(relative.parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if path.name == "__init__.py":
            module += ".__init__"  # so that relative imports resolve against the package itself
        visitor = ImportVisitor(module, path)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
        source = unit_of(module.removesuffix(".__init__"))
        for name, line, lazy in visitor.found:
            target = unit_of(name)
            if target is not None and target != source:
                edges.append(Edge(source, target, f"{path.relative_to(PACKAGE.parent)}:{line}", lazy))
    return edges


def layer_of(unit: str) -> int:
    return next(index for index, layer in enumerate(LAYERS) if unit in layer)


def units() -> set[str]:
    found = {path.stem for path in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    return found


def breaks(edge: Edge) -> str | None:
    """Why an edge breaks the layering, or None."""
    if layer_of(edge.target) > layer_of(edge.source):
        return "points up"
    if (edge.source, edge.target) in APART or (edge.target, edge.source) in APART:
        return "joins units kept apart"
    return None


def test_every_unit_has_a_layer():
    assert units() - set().union(*LAYERS) == set(), "add the new unit to LAYERS"


def test_no_import_points_up_or_joins_units_kept_apart():
    found = [f"{edge}: {breaks(edge)}" for edge in package_edges() if breaks(edge) and (edge.source, edge.target) not in KNOWN]
    assert found == [], "\n".join(found)


def test_known_exceptions_are_still_there():
    present = {(edge.source, edge.target) for edge in package_edges()}
    gone = [f"{pair}: {why}" for pair, why in KNOWN.items() if pair not in present]
    assert gone == [], "these edges are gone: remove them from KNOWN\n" + "\n".join(gone)


def test_no_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for edge in package_edges():
        graph.setdefault(edge.source, set()).add(edge.target)

    def reaches(start: str, goal: str) -> bool:
        seen, stack = set(), [start]
        while stack:
            unit = stack.pop()
            if unit == goal:
                return True
            if unit not in seen:
                seen.add(unit)
                stack.extend(graph.get(unit, ()))
        return False

    cycles = sorted(
        {tuple(sorted((source, target))) for source, targets in graph.items() for target in targets if reaches(target, source)}
    )
    assert cycles == [], f"units that import each other (directly or through others): {cycles}"


def test_nothing_below_the_apps_imports_them():
    apps = {"cli", "demo", "__main__"}
    found = [str(edge) for edge in package_edges() if edge.target in apps and edge.source not in apps]
    found += [str(edge) for edge in package_edges() if edge.source == "demo" and edge.target in {"cli", "__main__"}]
    assert found == [], "\n".join(found)


def test_the_edges_are_found():
    """The graph itself: a few edges known to exist, module level and lazy."""
    edges = {(edge.source, edge.target, edge.lazy) for edge in package_edges()}
    assert ("cache", "data", False) in edges and ("config", "errors", False) in edges
    assert any(source == "cli" and lazy for source, _, lazy in edges)


def test_importing_evaluate_loads_no_encoder_and_reads_no_image():
    """The cache-only evaluation is the front door: SAM, CLIP and image reading load only inside
    the methods that need them (baselines, masks)."""
    import subprocess
    import sys

    code = (
        "import regionspot_cache.evaluate, sys; "
        "print(sorted(m for m in sys.modules if m.startswith('regionspot_cache.encoders'))); "
        "print(sorted(m for m in sys.modules if m in {'regionspot_cache.data.images', 'regionspot_cache.evaluate.with_images', "
        "'regionspot_cache.evaluate.baselines', 'open_clip', 'segment_anything', 'sam2'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["[]", "[]"], done.stdout
