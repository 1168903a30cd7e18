"""No function in potstill is longer than a screen and a half (80 lines, its def to its last line):
a longer one is split into named steps that read top to bottom (shared/STYLE.md)."""

import ast
from pathlib import Path

from helpers import ROOT

LIMIT = 80


def long_functions(src: Path = ROOT / "src" / "potstill", limit: int = LIMIT) -> list[str]:
    found = []
    for path in sorted(src.rglob("*.py")):
        for node in sorted(ast.walk(ast.parse(path.read_text())), key=lambda n: getattr(n, "lineno", 0)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(src)}:{node.lineno} {node.name}: {n} lines")
    return found


def test_no_function_is_over_80_lines():
    assert long_functions() == []


def test_the_count_sees_a_long_method(tmp_path):
    (tmp_path / "m.py").write_text("class A:\n    @property\n    def f(self):\n" + "        x = 1\n" * 78 + "\n"
                                   "def g():\n" + "    x = 1\n" * 79)
    assert long_functions(tmp_path, limit=78) == ["m.py:3 f: 79 lines", "m.py:83 g: 80 lines"]
    assert long_functions(tmp_path, limit=79) == ["m.py:83 g: 80 lines"]
    assert long_functions(tmp_path) == []
