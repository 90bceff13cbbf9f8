"""Models: the parts of RT-DETR (backbones ResNet / ResNet-vd / tiny, hybrid encoder, multi-scale deformable
attention, decoder with denoising queries) and MRQM's blocks (BiFPN + scale-aware encoder, IoU-aware head),
plus :class:`~sodlib.models.detector.RTDETR`, which composes built parts, and the post-processing.

May import: :mod:`sodlib.config`, :mod:`sodlib.box_ops`, :mod:`sodlib.io` and this package. Which parts a
config asks for is decided in :mod:`sodlib.build`, not here.
"""
