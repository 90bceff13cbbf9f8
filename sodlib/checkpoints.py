"""Checkpoint files: one ``torch.save`` dict with a format version, written atomically, read tensors-only.

Foundation layer: imports only :mod:`sodlib.io`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from sodlib.io import atomic_write_bytes

CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, **state) -> Path:
    buf = io.BytesIO()
    torch.save({"version": CHECKPOINT_VERSION, **state}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
