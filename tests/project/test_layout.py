"""The folder listing is the data flow: prompts -> teacher -> ledger -> train -> eval -> report.
Stages meet only through the ledger, the teacher backends and the run folder, so no stage module
imports another stage, not even inside a function."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "potstill"
STAGES = ("generate", "train", "evaluate", "report", "serve")


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "potstill" and parts[1] in STAGES else None


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, package: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing package
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            yield node.lineno, base
            for alias in node.names:  # `from potstill import train` imports the stage itself
                yield node.lineno, f"{base}.{alias.name}"


def cross_stage_imports() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        name = module_name(path)
        own = stage_of(name)
        if own is None:
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for line, target in imported_modules(ast.parse(path.read_text()), package):
            other = stage_of(target)
            if other and other != own:
                found.append(f"{path.relative_to(SRC.parent)}:{line} ({own}) imports {target} ({other})")
    return found


def test_no_stage_imports_another_stage():
    assert cross_stage_imports() == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    tree = ast.parse("def f():\n    from potstill.generate import recipe_requests\n")
    assert [stage_of(m) for _, m in imported_modules(tree, "potstill.train")] == ["generate", "generate"]
    assert stage_of("potstill.train.loop") == "train" and stage_of("potstill.ledger") is None


def test_the_folder_listing_shows_the_pipeline():
    listing = {p.name.removesuffix(".py") for p in SRC.iterdir() if not p.name.startswith("_")}
    assert {"teachers", "ledger", *STAGES, "losses", "receipts"} <= listing
