"""Code, tests and notebooks describe the project as it is: no numbered work periods, tracker numbers or machine
nicknames."""

import re
import subprocess

import pytest

from sodlib.io import SOURCE_ROOT

HISTORY = re.compile(r"\b(?:issues?|sessions?) ?(?:#|<=|>=)? ?\d+|\bthis\s+VM\b", re.IGNORECASE)
SCANNED = ("sodlib", "tests", "notebooks", "Makefile", ".ci")


def test_no_development_history_in_code_tests_or_notebooks():
    files = subprocess.run(
        ["git", "ls-files", *SCANNED], cwd=SOURCE_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert files, "no tracked files found"
    found = []
    for name in files:
        if name.endswith("test_project_text.py"):
            continue
        text = (SOURCE_ROOT / name).read_text(encoding="utf-8", errors="replace")
        found += [f"{name}: {m.group(0)!r}" for m in HISTORY.finditer(text)]
    assert not found, "history in the project's text: " + "; ".join(found[:10])


@pytest.mark.parametrize("word, number", [("session", "13"), ("issue", "16"), ("sessions", "<= 8")])
def test_the_pattern_finds_what_it_should(word, number):
    assert HISTORY.search(
        f"as in {word} {number}"
    )  # phrases built here, so this file never states one itself
    assert HISTORY.search("on this\tVM") and not HISTORY.search("the regression issue of a session")
