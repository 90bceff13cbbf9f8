"""sodlib: end-to-end small object detection research code."""

import importlib

__version__ = "0.1.0"

# Top-level builders, imported on first use so that `import sodlib` stays light (no torch import).
_LAZY_EXPORTS = {
    "build_criterion": "sodlib.build",
    "build_detector": "sodlib.build",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'sodlib' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY_EXPORTS))
