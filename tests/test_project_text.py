"""The project describes itself as it is: no numbered work periods, tracker numbers, machine nicknames,
migration notes or references to documents outside the repository, in any tracked text file."""

import re
import subprocess

import pytest

from sodlib.io import SOURCE_ROOT

HISTORY = re.compile(
    r"\b(?:issues?|sessions?) ?(?:#|<=|>=)? ?\d+"  # a tracker number or a numbered work period
    r"|\b(?:earlier|previous|past|later)\s+(?:work\s+)?sessions?\b"  # a work period, unnumbered
    r"|\bthis\s+VM\b"  # the machine a measurement happened to run on, instead of its cores and CPU features
    r"|\bDESIGN\.md\b"  # a document that is not in the repository
    r"|\bwas `sodlib",  # a migration note: there is no released version to migrate from
    re.IGNORECASE,
)
TEXT_SUFFIXES = (".py", ".md", ".ipynb", ".toml", ".yml", ".yaml", ".txt", ".csv", ".cfg")
# what runs and executed notebooks write (configs, logs, outputs) is data, not the project's prose
NOT_SCANNED = ("results/runs/", "results/notebooks/", "results/machines/")


def tracked_text_files() -> list[str]:
    files = subprocess.run(
        ["git", "ls-files"], cwd=SOURCE_ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return [
        f
        for f in files
        if not f.startswith(NOT_SCANNED) and (f.endswith(TEXT_SUFFIXES) or f in ("Makefile", ".ci/run"))
    ]


def test_no_development_history_in_the_project():
    files = tracked_text_files()
    assert {"README.md", "results/README.md", "Makefile", "sodlib/config.py"} <= set(files)
    assert any(f.startswith("results/tables/") for f in files) and any(
        f.startswith("notebooks/") for f in files
    )
    found = []
    for name in files:
        if name.endswith("test_project_text.py"):
            continue
        text = (SOURCE_ROOT / name).read_text(encoding="utf-8", errors="replace")
        found += [f"{name}: {m.group(0)!r}" for m in HISTORY.finditer(text)]
    assert not found, "history in the project's text: " + "; ".join(found[:10])


@pytest.mark.parametrize(
    "word, number", [("session", "13"), ("issue", "16"), ("sessions", "<= 8"), ("issue", "#4")]
)
def test_the_pattern_finds_what_it_should(word, number):
    assert HISTORY.search(
        f"as in {word} {number}"
    )  # phrases built here, so this file never states one itself
    assert HISTORY.search("on this\tVM") and HISTORY.search("see " + "DESIGN" + ".md")
    assert HISTORY.search("(was " + "`sodlib.deform_attn`)")
    assert HISTORY.search("the reading of the earlier " + "sessions") and HISTORY.search(
        "a previous " + "session"
    )
    assert not HISTORY.search("the regression issue of a session") and not HISTORY.search(
        "keys renamed to `x`"
    )
