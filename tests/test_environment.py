"""The environment files agree with each other: pyproject ranges, the lock's pins, environment.yml."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _lock_versions():
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return {p["name"]: p["version"] for p in lock["package"]}


def test_lock_pins_torch_and_torchvision():
    v = _lock_versions()
    assert v["torch"] == "2.13.0"
    assert v["torchvision"] == "0.28.0"


def test_pyproject_ranges_admit_older_torch():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0]: d for d in deps}
    assert spec["torch"] == "torch>=2.11"
    assert spec["torchvision"] == "torchvision>=0.26"


def test_every_dependency_is_locked():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [
        re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower()
        for d in py["dependencies"] + py["optional-dependencies"]["dev"]
    ]
    locked = _lock_versions()
    assert [n for n in names if n not in locked] == []


def test_environment_yml_installs_the_same_package():
    text = (ROOT / "environment.yml").read_text()
    assert re.search(r"^\s*-\s*python=3\.11\s*$", text, re.MULTILINE)
    assert re.search(r'^\s*-\s*-e\s+"?\.\[dev\]"?\s*$', text, re.MULTILINE), (
        "environment.yml must pip-install -e .[dev]"
    )
    req = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert ">=3.10" in req and "<3.14" in req
