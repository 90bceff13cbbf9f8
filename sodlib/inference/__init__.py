"""Using trained detectors: loading checkpoints (``load_model``), prediction on images (sliced for large
ones) and datasets, attention heatmaps, ONNX export and the SAHI adapter.

May import: the foundation, :mod:`sodlib.data`, :mod:`sodlib.models`, :mod:`sodlib.evaluation`,
:mod:`sodlib.build`, :mod:`sodlib.official` and this package; never training or studies.
"""

from sodlib.inference.predict import load_model

__all__ = ["load_model"]
