"""`make lab` starts on any machine (root included): the server comes up headless and lists the notebooks."""

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from sodlib.studies.lab import lab_command

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_allow_root_only_for_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert "--allow-root" in lab_command("notebooks")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cmd = lab_command("notebooks", headless=True, port=8899, token="t")
    assert "--allow-root" not in cmd and "--no-browser" in cmd and "--ServerApp.port=8899" in cmd


@pytest.mark.slow
def test_lab_server_lists_the_notebooks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
    }
    cmd = lab_command(NOTEBOOKS, headless=True, port=port, token="sodlib-test") + ["--ServerApp.ip=127.0.0.1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/api/contents?token=sodlib-test"
    try:
        listing = None
        for _ in range(120):
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    listing = json.load(response)
                break
            except OSError:
                time.sleep(0.5)
        assert listing is not None, "the server did not answer within 60 s"
        names = {item["name"] for item in listing["content"]}
        assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} <= names
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
