"""Every recipe snippet in the README and docs/ loads (as torchtune tests its configs): a ```yaml
block is a recipe fragment, merged into the quickstart recipe (a teacher section replaces the
quickstart's teacher; other sections are merged into theirs) and loaded with load_recipe, so a
renamed or removed field, or a value out of range, fails here before a reader copies it."""

import re

import pytest
import yaml

from potstill.recipe import load_recipe

from helpers import QUICKSTART, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPETS = [(doc, n, block) for doc in DOCS
            for n, block in enumerate(re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S))]


def standing_in(value):
    """The fragment with the reader's own folders (``/models/...``, ``path/to/...``) replaced by the
    bundled teacher's folder (a tokenizer and weights), and ``...`` ("and the rest") left out."""
    if isinstance(value, dict):
        return {k: standing_in(v) for k, v in value.items() if k != "..."}
    if isinstance(value, str) and value.startswith(("/models/", "path/to/")):
        return str(QUICKSTART / "teacher")
    return value


def merged(base: dict, fragment: dict) -> dict:
    out = dict(base)
    for key, value in fragment.items():
        if key != "teacher" and isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = merged(base[key], value)
        else:
            out[key] = value
    return out


def same(got, want) -> bool:
    """A loaded value is the snippet's (a relative path is resolved against the recipe's folder)."""
    if hasattr(got, "model_dump"):
        got = got.model_dump()
    if isinstance(want, dict):
        return isinstance(got, dict) and all(same(got.get(k), v) for k, v in want.items())
    if isinstance(want, str) and isinstance(got, str):
        return got == want or got.endswith("/" + want)
    return got == want


def test_the_docs_hold_recipe_snippets():
    assert {doc.name for doc, _, _ in SNIPPETS} >= {"README.md", "http-teachers.md", "audit.md"}


@pytest.mark.parametrize("doc, n, block", SNIPPETS, ids=[f"{d.name}:{n}" for d, n, _ in SNIPPETS])
def test_a_recipe_snippet_loads(tmp_path, doc, n, block):
    fragment = yaml.safe_load(block)
    assert isinstance(fragment, dict), f"{doc.name} yaml block {n} is not a recipe fragment"
    fragment = standing_in(fragment)
    base = yaml.safe_load((QUICKSTART / "recipe.yaml").read_text())
    for folder in ("teacher", "prompts"):  # the quickstart's inputs, where its relative paths look for them
        (tmp_path / folder).symlink_to(QUICKSTART / folder)
    (tmp_path / "release-3.key").write_bytes(b"k" * 32)  # docs/audit.md's key file
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(merged(base, fragment)))
    recipe = load_recipe(path, [f"output_dir={tmp_path / 'run'}"])
    for section, fields in fragment.items():  # what the snippet says is what the recipe holds
        assert same(getattr(recipe, section), fields), (section, getattr(recipe, section), fields)
