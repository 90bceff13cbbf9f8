"""Evaluation protocols: COCO (pycocotools / faster-coco-eval), SODA-D's size buckets and VisDrone's
(ignored regions, 500 detections); ``evaluate(gt, detections, protocol)`` is the entry point.

May import: the foundation (:mod:`sodlib.io`) and this package; it scores COCO-format dicts and knows
nothing about models (running a model over a dataset is :func:`sodlib.inference.predict.evaluate_model`).
"""

from sodlib.evaluation.protocols import evaluate

__all__ = ["evaluate"]
