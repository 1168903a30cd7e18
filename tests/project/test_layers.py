"""The layers of docs/architecture.md, enforced: every import, lazy ones inside functions included,
points down the list, or stays inside its own package. Stages never import one another, nor do
components: they meet through the ledger, the run folder and the shared bottom."""

import ast
import re
from pathlib import Path

import pytest
from helpers import ROOT

SRC = ROOT / "src" / "potstill"

# top to bottom; a name is a top-level module or package of potstill
LAYERS = {
    "entry": ["cli", "__main__", "quickstart_cross"],
    "pipeline": ["pipeline"],
    "stages": ["generate", "train", "evaluate", "report", "serve", "audit"],
    "components": ["teachers", "receipts", "tasks"],
    "ledger": ["ledger"],
    "recipe": ["recipe"],
    "bottom": ["hf", "records", "redaction", "watermark", "verifiers", "losses", "align", "prompts", "devices",
               "student_config", "provenance", "progress", "errors"],
}
# layers whose members may not import each other (the bottom's pieces may use one another)
SEALED = {"stages", "components"}
LEVEL = {name: (i, layer) for i, (layer, names) in enumerate(LAYERS.items()) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, package: str):
    """(line, module) for every import in ``tree``, at any depth; ``from potstill import x`` names x."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing package
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def unit(module: str) -> str | None:
    """potstill.teachers.openai.wire -> teachers; a name that is not potstill's -> None."""
    parts = module.split(".")
    if parts[0] != "potstill" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LEVEL else None


def wrong_way(importer: str, target: str) -> str | None:
    """Why ``importer`` may not import ``target`` (both top-level units), or None."""
    if importer == target:
        return None
    (mine, my_layer), (theirs, their_layer) = LEVEL[importer], LEVEL[target]
    if theirs < mine:
        return f"up ({my_layer} -> {their_layer})"
    if theirs == mine and my_layer in SEALED:
        return f"sideways ({my_layer})"
    return None


def violations() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        me = unit(name)
        for line, target in imported_modules(ast.parse(path.read_text()), package):
            other = unit(target)
            if me and other and (why := wrong_way(me, other)):
                found.append(f"{path.relative_to(SRC.parent)}:{line} imports {target}: {why}")
    return sorted(set(found))


def test_every_module_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file())) and p.name != "__init__.py"}
    assert names - set(LEVEL) == set(), "a new module needs a layer here and in docs/architecture.md"
    assert set(LEVEL) - names <= {"__main__"}


def test_imports_point_down():
    assert violations() == []


def test_the_docs_list_the_same_layers():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for layer, names in LAYERS.items():
        row = re.search(rf"^\| \d+ \| {layer} \|.*\| (.+?) \|$", text, re.M)
        assert row, f"docs/architecture.md has no row for the {layer} layer"
        listed = set(re.findall(r"`(\w+)`", row.group(1)))
        assert listed == set(names) - {"__main__"}, layer


@pytest.mark.parametrize("source, package, importer, target, why", [
    ("def f():\n    from potstill.teachers.backends import for_recipe\n", "potstill.ledger", "ledger", "teachers",
     "up (ledger -> components)"),
    ("from potstill import train\n", "potstill.evaluate", "evaluate", "train", "sideways (stages)"),
    ("from ..audit import watermark\n", "potstill.teachers", "teachers", "audit", "up (components -> stages)"),
    ("from potstill.hf import prompt_ids\n", "potstill.train", "train", "hf", None),
    ("from potstill.provenance import text_sha256\n", "potstill", "hf", "provenance", None),
])
def test_the_walk_catches_what_it_should(source, package, importer, target, why):
    targets = {unit(m) for _, m in imported_modules(ast.parse(source), package)} - {None}
    assert target in targets
    assert wrong_way(importer, target) == why


def test_the_folder_listing_shows_the_pipeline():
    listing = {p.name.removesuffix(".py") for p in SRC.iterdir() if not p.name.startswith("_")}
    assert {"teachers", "ledger", *LAYERS["stages"], "losses", "receipts"} <= listing
