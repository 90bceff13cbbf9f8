"""``make lab``: JupyterLab on the notebooks, on any machine — root included (containers, cloud VMs).

JupyterLab refuses to start as root unless told ``--allow-root`` ("Running as root is not recommended");
:func:`lab_command` adds it only when the user is root. ``python -m sodlib.studies.lab`` runs it (the
Makefile's ``lab`` target); ``--headless`` starts the server without a browser, as the test does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["lab_command", "main"]


def lab_command(
    notebook_dir: str | Path = "notebooks",
    headless: bool = False,
    port: int | None = None,
    token: str | None = None,
) -> list[str]:
    """The ``jupyter lab`` command line for ``notebook_dir``: ``--allow-root`` when running as root;
    ``headless`` adds ``--no-browser``; ``port`` / ``token`` fix the server's port and access token."""
    cmd = [sys.executable, "-m", "jupyter", "lab", str(notebook_dir)]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    if headless:
        cmd.append("--no-browser")
    if port is not None:
        cmd += [f"--ServerApp.port={port}", "--ServerApp.port_retries=0"]
    if token is not None:
        cmd.append(f"--IdentityProvider.token={token}")
    return cmd


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    headless = "--headless" in args
    folder = next((a for a in args if not a.startswith("--")), "notebooks")
    return subprocess.call(lab_command(folder, headless=headless))


if __name__ == "__main__":
    raise SystemExit(main())
