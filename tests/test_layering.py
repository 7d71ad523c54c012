"""The house's arrows point down (docs/architecture.md): a module imports only from its own
layer or a lower one, lazy imports inside functions included, and never another module's
private (``_name``) helpers. Read from the source (AST), so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import lora_cli

PACKAGE = Path(lora_cli.__file__).parent
# lowest first; a module may import from its own layer and any layer before it
LAYERS = [
    {"<root>", "errors", "numerics", "scratch", "interrupts", "preload"},
    {"io"},
    {"sources", "names"},
    {"adapters"},
    {"merge"},
    {"validate", "extract"},
    {"stages", "args"},
    {"cli", "render", "render_extract", "output", "help_format", "__main__"},
]
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}
# Known upward arrows, each to be removed from here when it is fixed (the test says so):
# the GGUF / mlx exporters take the merge preflight's placement from merge/plan.py, and the
# command-line checks (also used by the merge and validate stages) spell counts with
# output.plural.
KNOWN_UPWARD = {
    ("adapters/to_gguf.py", "merge"),
    ("adapters/to_mlx.py", "merge"),
    ("args.py", "output"),
}


def _room(parts: list[str]) -> str:
    """``lora_cli.merge.plan`` → ``merge``; ``lora_cli`` itself (``__version__``) → <root>."""
    if len(parts) > 1 and ((PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file()):
        return parts[1]
    return "<root>"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every ``lora_cli`` import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_cli"):
            module = node.module or ""
            if module == "lora_cli":  # from lora_cli import interrupts, __version__
                found += [(f"lora_cli.{a.name}", []) for a in node.names]
            else:
                found.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("lora_cli")]
    return found


def _modules() -> list[tuple[str, str, Path]]:
    """(path relative to the package, its room, the file) for every module."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        room = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem
        room = "<root>" if room == "__init__" else room
        out.append((rel.as_posix(), room, path))
    return out


def test_every_module_has_a_layer():
    rooms = {room for _, room, _ in _modules()}
    assert rooms <= set(RANK), f"place these in LAYERS: {sorted(rooms - set(RANK))}"


def test_no_import_points_upward():
    upward = set()
    for rel, room, path in _modules():
        for module, _ in _imports(path):
            target = _room(module.split("."))
            if RANK.get(target, -1) > RANK[room]:
                upward.add((rel, target))
    assert upward - KNOWN_UPWARD == set(), "upward imports (docs/architecture.md)"
    assert KNOWN_UPWARD - upward == set(), "fixed: remove these from KNOWN_UPWARD"


def test_no_private_name_is_imported_from_another_module():
    private = []
    for rel, _, path in _modules():
        for module, names in _imports(path):
            private += [
                f"{rel}: {module}.{n}" for n in names if n.startswith("_") and n[:2] != "__"
            ]
    assert not private, "make them public helpers with a docstring"
