"""The import graph of the library, read from the source with `ast`: arrows point down (DESIGN.md), no cycles."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# layer -> the layers its modules may import (besides their own); a module's layer is its first name under
# minimodels (minimodels/models/gpt.py: models)
ALLOWED = {
    "schema": set(),  # YAML -> dataclasses, one-line errors
    "protocols": {"schema"},  # what a model or a task may provide, with defaults
    "nn": set(),
    "moe": {"nn"},
    "models": {"moe", "nn", "protocols", "schema"},
    "data": {"protocols", "schema"},
    "hf": {"models", "nn"},
    "config": {"data", "models", "schema"},
    "train": {"config", "data", "models", "moe", "nn", "protocols", "schema"},
    "cli": {"config", "data", "protocols", "train"},
}


def modules() -> dict[str, Path]:
    """minimodels.x.y -> its file."""
    out = {}
    for path in sorted((ROOT / "minimodels").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, bool]]:
    """(module of minimodels, at top level?) for every import in `path`, in functions too."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from minimodels.moe import parallel` imports a module; `from minimodels.moe import MoE` a name
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        found += [(name, id(node) in top) for name in names]
    return found


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_import_points_down_or_stays_in_its_layer():
    known = modules()
    wrong = []
    for module, path in known.items():
        for target, _ in imports(path, known):
            if target.startswith("minimodels.") and layer(target) != layer(module) \
                    and layer(target) not in ALLOWED[layer(module)]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong
    assert set(ALLOWED) == {layer(m) for m in known if m != "minimodels"}  # every layer is placed


def test_no_import_cycles():
    known = modules()
    edges = {m: {t for t, _ in imports(p, known) if t in known and t != m} for m, p in known.items()}
    done, on_path = set(), []

    def visit(m):
        if m in on_path:
            pytest.fail("import cycle: " + " -> ".join(on_path[on_path.index(m):] + [m]))
        if m in done:
            return
        on_path.append(m)
        for t in sorted(edges[m]):
            visit(t)
        on_path.pop()
        done.add(m)

    for m in sorted(known):
        visit(m)


def test_transformers_is_imported_only_where_it_is_used():
    """The optional extra stays optional: no module imports transformers when it is imported."""
    known = modules()
    eager = [m for m, p in known.items() if ("transformers", True) in imports(p, known)]
    assert eager == []
