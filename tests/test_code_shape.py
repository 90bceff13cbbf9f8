"""The library's code stays readable: no function over 80 lines, ruff clean at the configured line length
(the notebooks' code cells included)."""

import ast
import subprocess
import sys

from sodlib.io import SOURCE_ROOT

MAX_FUNCTION_LINES = 80


def long_functions(root=SOURCE_ROOT / "sodlib", limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (N lines)`` of every function or method (nested ones too) longer than ``limit`` lines,
    counted from its ``def`` to its last line (decorators excluded)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_in_the_library_is_longer_than_80_lines():
    assert long_functions() == []


def test_the_measure_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    found = long_functions(tmp_path)
    assert len(found) == 1 and found[0].endswith("long (81 lines)")


def test_ruff_is_clean_at_the_configured_line_length():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--output-format", "concise", "sodlib", "tests", "notebooks"],
        cwd=SOURCE_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
