"""Data: SynthSOD (generator and scenes), COCO / VisDrone / Pascal VOC readers, datasets, transforms, tiling
of large images into patches, and the real sample data beside the repository.

May import: :mod:`sodlib.config`, :mod:`sodlib.io` (the foundation) and this package; nothing about models,
losses or training. :func:`shared_data_dir` is the one place that says where the real sample data lives.
"""

from __future__ import annotations

import os
from pathlib import Path

from sodlib.io import SOURCE_ROOT

SHARED_DATA_ENV = "SODLIB_SHARED_DATA"


def shared_data_dir() -> Path:
    """The folder of real sample data (``visdrone_mini``, ``neon_trees``, ``visdrone_val_annotations``):
    ``$SODLIB_SHARED_DATA`` when set, else ``shared/data`` beside the source checkout (``../shared/data`` from
    the repository root). The folder may be absent: callers skip or say so."""
    env = os.environ.get(SHARED_DATA_ENV, "")
    if env:
        return Path(env).expanduser()
    return SOURCE_ROOT.parent / "shared" / "data"
