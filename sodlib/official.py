"""Released RT-DETR checkpoints in sodlib: the official architectures, their key layouts, strict loading.

RT-DETR's own code (lyuwenyu/RT-DETR, ``rtdetr_pytorch``) and transformers' port
(``RTDetrForObjectDetection``) store the same network under different parameter names; sodlib's modules use
a third set. This module maps sodlib's names onto each layout and loads any of them into a detector built
from a :class:`~sodlib.config.ModelConfig`:

* :func:`rtdetr_model_config` — the released R18/R34/R50/R101 architectures (ResNet-vd backbone, encoder
  width and expansion, decoder depth, 300 queries, RT-DETR's position-embedding layout);
* :func:`load_rtdetr` — a checkpoint path (``.pth``/``.pt``/``.bin``/``.safetensors`` file, or a
  transformers folder holding ``model.safetensors`` / ``pytorch_model.bin``) or a state dict, in any
  release format (``{"ema": {"module": sd}}``, ``{"model": sd}``, a bare state dict; sodlib's own
  checkpoints too) → the detector in eval mode, or a ValueError naming the first missing / unexpected
  keys and shape mismatches;
* :func:`convert_state_dict` / :func:`to_layout` — the mapping itself, in both directions.

The mapping is written once, from sodlib's names to the others' (:func:`official_names`,
:func:`hf_names`); loading inverts it over the model's own keys, so a tensor the map does not explain is
reported, never dropped silently. transformers stores the self-attention input projection as three
matrices (q, k, v) where ``nn.MultiheadAttention`` keeps one; the map returns the three names and the
loader concatenates them. Checkpoints written by transformers 4.x use older names (``out_proj``, ``fc1``,
``encoder.encoder``); :func:`_hf_v4_to_v5` renames them as transformers 5 does when it loads them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from sodlib.build import build_detector
from sodlib.config import ModelConfig

__all__ = [
    "LAYOUTS",
    "InitReport",
    "convert_state_dict",
    "detect_layout",
    "hf_names",
    "init_from",
    "load_rtdetr",
    "official_names",
    "read_state_dict",
    "rtdetr_model_config",
    "to_layout",
]

LAYOUTS = ("sodlib", "official", "hf")

# The released RT-DETR configs (rtdetr_pytorch/configs/rtdetr/*.yml): what differs by depth.
_RELEASED = {
    18: {"freeze_norm": False, "freeze_at": -1, "expansion": 0.5, "num_decoder_layers": 3},
    34: {"freeze_norm": False, "freeze_at": -1, "expansion": 0.5, "num_decoder_layers": 4},
    50: {"freeze_norm": True, "freeze_at": 0, "expansion": 1.0, "num_decoder_layers": 6},
    101: {
        "freeze_norm": True,
        "freeze_at": 0,
        "expansion": 1.0,
        "num_decoder_layers": 6,
        "encoder_dim": 384,
        "encoder_ffn": 2048,
    },
}


def rtdetr_model_config(depth: int, num_classes: int = 80, **changes) -> ModelConfig:
    """The released RT-DETR-R``depth`` (18, 34, 50, 101) architecture as a :class:`ModelConfig`.

    Common to all: ResNet-vd backbone (``presnetNNvd``) returning C3..C5, hybrid encoder of width 256 (R101:
    384, FFN 2048) with one AIFI layer and 3 RepVGG blocks per CSP layer, decoder width 256 with 8 heads,
    3 levels × 4 points, FFN 1024, 300 queries, 100 denoising queries, RT-DETR's position-embedding layout.
    By depth: R18/R34 train their BatchNorm (no frozen stem), encoder expansion 0.5, 3 / 4 decoder layers;
    R50/R101 freeze BatchNorm and the stem, expansion 1.0, 6 decoder layers. ``changes`` override fields
    (e.g. ``pretrained_path``).
    """
    if depth not in _RELEASED:
        raise ValueError(f"RT-DETR was released for depths {sorted(_RELEASED)}, got {depth}")
    fields = {
        "backbone": f"presnet{depth}vd",
        "num_classes": num_classes,
        "hidden_dim": 256,
        "num_heads": 8,
        "num_levels": 3,
        "num_points": 4,
        "num_queries": 300,
        "dim_feedforward": 1024,
        "encoder_ffn": 1024,
        "csp_blocks": 3,
        "dropout": 0.0,
        "num_denoising": 100,
        "label_noise_ratio": 0.5,
        "box_noise_scale": 1.0,
        "pos_embed": "rtdetr",
        "encoder": "hybrid",
    }
    fields.update(_RELEASED[depth])
    fields.update(changes)
    return ModelConfig(**fields)


# ---------------------------------------------------------------- name maps (sodlib → theirs)


def _subs(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


# RT-DETR's ConvNormLayer names its parts conv / norm where sodlib's encoder uses Sequential indices; its
# RepVGG block calls the 3×3 branch conv1 and the 1×1 branch conv2 (sodlib: conv3 and conv1); its AIFI FFN
# is linear1 / linear2 inside a TransformerEncoder's `layers`; the decoder layers sit in
# `decoder.decoder.layers`.
_OFFICIAL_RULES = [
    (r"^encoder\.encoder\.(\d+)\.(\d+)\.ffn\.0\.", r"encoder.encoder.\1.layers.\2.linear1."),
    (r"^encoder\.encoder\.(\d+)\.(\d+)\.ffn\.3\.", r"encoder.encoder.\1.layers.\2.linear2."),
    (r"^encoder\.encoder\.(\d+)\.(\d+)\.", r"encoder.encoder.\1.layers.\2."),
    (r"\.blocks\.(\d+)\.conv3\.0\.", r".bottlenecks.\1.conv1.conv."),
    (r"\.blocks\.(\d+)\.conv3\.1\.", r".bottlenecks.\1.conv1.norm."),
    (r"\.blocks\.(\d+)\.conv1\.0\.", r".bottlenecks.\1.conv2.conv."),
    (r"\.blocks\.(\d+)\.conv1\.1\.", r".bottlenecks.\1.conv2.norm."),
    (r"^encoder\.((?:fpn|pan)_blocks\.\d+\.conv\d)\.0\.", r"encoder.\1.conv."),
    (r"^encoder\.((?:fpn|pan)_blocks\.\d+\.conv\d)\.1\.", r"encoder.\1.norm."),
    (r"^encoder\.((?:lateral|downsample)_convs\.\d+)\.0\.", r"encoder.\1.conv."),
    (r"^encoder\.((?:lateral|downsample)_convs\.\d+)\.1\.", r"encoder.\1.norm."),
    (r"^decoder\.input_proj\.(\d+)\.0\.", r"decoder.input_proj.\1.conv."),
    (r"^decoder\.input_proj\.(\d+)\.1\.", r"decoder.input_proj.\1.norm."),
    (r"^decoder\.layers\.", r"decoder.decoder.layers."),
]


def official_names(key: str) -> list[str]:
    """The name(s) of sodlib parameter/buffer ``key`` in RT-DETR's own checkpoints (one name each).

    The backbone (``presnetNNvd``) already uses PResNet's names; encoder and decoder are renamed.
    """
    return [key] if key.startswith("backbone.") else [_subs(key, _OFFICIAL_RULES)]


_HF_BACKBONE_RULES = [
    (r"^backbone\.conv1\.conv1_(\d)\.", lambda m: f"model.backbone.model.embedder.embedder.{int(m[1]) - 1}."),
    (r"^backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.", r"model.backbone.model.encoder.stages.\1.layers.\2."),
    (r"\.branch2a\.", ".layer.0."),
    (r"\.branch2b\.", ".layer.1."),
    (r"\.branch2c\.", ".layer.2."),
    (r"\.short\.conv\.conv\.", ".shortcut.1.conv."),
    (r"\.short\.conv\.norm\.", ".shortcut.1.norm."),
    (r"\.short\.", ".shortcut."),
    (r"\.conv\.(weight)$", r".convolution.\1"),
    (r"\.norm\.(weight|bias|running_mean|running_var|num_batches_tracked)$", r".normalization.\1"),
]
_HF_ATTN = [(r"\.out_proj\.", ".o_proj.")]
_HF_ENCODER_RULES = [
    (r"^encoder\.input_proj\.", "model.encoder_input_proj."),
    (r"^encoder\.encoder\.(\d+)\.(\d+)\.", r"model.encoder.aifi.\1.layers.\2."),
    (r"\.norm1\.", ".self_attn_layer_norm."),
    (r"\.norm2\.", ".final_layer_norm."),
    (r"\.ffn\.0\.", ".mlp.fc1."),
    (r"\.ffn\.3\.", ".mlp.fc2."),
    *_HF_ATTN,
]
_HF_DECODER_RULES = [
    (r"^decoder\.input_proj\.", "model.decoder_input_proj."),
    (r"^decoder\.layers\.", "model.decoder.layers."),
    (r"\.norm1\.", ".self_attn_layer_norm."),
    (r"\.cross_attn\.", ".encoder_attn."),
    (r"\.norm2\.", ".encoder_attn_layer_norm."),
    (r"\.norm3\.", ".final_layer_norm."),
    (r"\.linear1\.", ".mlp.fc1."),
    (r"\.linear2\.", ".mlp.fc2."),
    *_HF_ATTN,
    (r"^decoder\.query_pos_head\.", "model.decoder.query_pos_head."),
    (r"^decoder\.dec_score_head\.", "model.decoder.class_embed."),
    (r"^decoder\.dec_bbox_head\.", "model.decoder.bbox_embed."),
    (r"^decoder\.(denoising_class_embed|enc_output|enc_score_head|enc_bbox_head)\.", r"model.\1."),
]


def hf_names(key: str) -> list[str]:
    """The name(s) of sodlib parameter/buffer ``key`` in transformers' ``RTDetrForObjectDetection``
    (transformers 5 names; a self-attention ``in_proj_weight``/``in_proj_bias`` maps to q, k, v)."""
    if key.startswith("backbone."):
        return [_subs(key, _HF_BACKBONE_RULES)]
    if key.startswith("encoder."):
        # CSP, lateral and downsample convs share RT-DETR's names (conv / norm, bottlenecks.conv1 = 3×3)
        name = (
            _subs(key, _HF_ENCODER_RULES)
            if key.startswith(("encoder.input_proj.", "encoder.encoder."))
            else "model." + official_names(key)[0]
        )
    elif key.startswith("decoder."):
        name = _subs(key, _HF_DECODER_RULES)
    else:
        return [key]
    if name.endswith((".in_proj_weight", ".in_proj_bias")):
        stem, kind = name.rsplit(".in_proj_", 1)
        return [f"{stem}.{p}_proj.{kind}" for p in ("q", "k", "v")]
    return [name]


_HF_V4_RULES = [  # transformers 4.x checkpoint names → transformers 5 (as its conversion mapping does)
    (r"\.out_proj\.", ".o_proj."),
    (r"\.layers\.(\d+)\.fc1\.", r".layers.\1.mlp.fc1."),
    (r"\.layers\.(\d+)\.fc2\.", r".layers.\1.mlp.fc2."),
    (r"encoder\.encoder\.(\d+)\.layers\.", r"encoder.aifi.\1.layers."),
]


def _hf_v4_to_v5(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {_subs(k, _HF_V4_RULES): v for k, v in state.items()}


_NAMES: dict[str, Callable[[str], list[str]]] = {
    "sodlib": lambda key: [key],
    "official": official_names,
    "hf": hf_names,
}

# buffers a layout may carry that sodlib recomputes (anchors, position embeddings) or does not count
_IGNORED = re.compile(
    r"(num_batches_tracked$|^decoder\.(anchors|valid_mask)$|^encoder\.pos_embed\d*$"
    r"|^(class_embed|bbox_embed)\.\d+\.)"
)


# ---------------------------------------------------------------- reading and detecting


def read_state_dict(checkpoint: str | os.PathLike | Mapping) -> dict[str, Tensor]:
    """The model state dict inside ``checkpoint``: a path or an already loaded object, in any release format.

    Nested formats are unwrapped in this order: ``ema.module`` (RT-DETR's and sodlib's EMA weights, what the
    released checkpoints hold), ``model``, ``state_dict``; a ``module.`` prefix (DistributedDataParallel) is
    removed. A folder is read as transformers saves one (``model.safetensors``, else ``pytorch_model.bin``).
    """
    source = "state dict"
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        source = str(path)
        if path.is_dir():
            candidates = [path / "model.safetensors", path / "pytorch_model.bin"]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise FileNotFoundError(
                    f"{path}: a checkpoint folder needs model.safetensors or pytorch_model.bin"
                )
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError as exc:  # pragma: no cover - the dev environment has it
                raise ImportError(f"{path}: reading .safetensors needs `pip install sodlib[hf]`") from exc
            checkpoint = load_file(str(path))
        else:
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # corrupt, truncated, or not a torch file
                raise ValueError(
                    f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''})"
                ) from exc
    state = checkpoint
    for _ in range(3):
        if not isinstance(state, Mapping):
            break
        if isinstance(state.get("ema"), Mapping) and isinstance(state["ema"].get("module"), Mapping):
            state = state["ema"]["module"]
        elif isinstance(state.get("model"), Mapping):
            state = state["model"]
        elif isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        else:
            break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{source}: holds no model state dict (expected tensors, or a dict with 'ema.module', "
            f"'model' or 'state_dict')"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def detect_layout(state: Mapping[str, Tensor]) -> str:
    """``hf`` (transformers), ``official`` (RT-DETR's code) or ``sodlib``, from the key names."""
    keys = list(state)
    if any(k.startswith(("model.backbone.", "model.decoder.", "model.encoder.")) for k in keys):
        return "hf"
    if any(k.startswith("decoder.decoder.layers.") for k in keys):
        return "official"
    if any(k.startswith("decoder.layers.") for k in keys):
        return "sodlib"
    raise ValueError(
        f"cannot tell the layout of this state dict: none of its {len(keys)} keys "
        f"(first: {keys[:3]}) names an RT-DETR decoder layer"
    )


# ---------------------------------------------------------------- converting


def _lookup(state: Mapping[str, Tensor], key: str, layout: str) -> tuple[list[str], Tensor | None]:
    """The checkpoint name(s) of sodlib ``key`` and its tensor (None when a name is absent)."""
    theirs = _NAMES[layout](key)
    if not all(n in state for n in theirs):
        return theirs, None
    return theirs, torch.cat([state[n] for n in theirs]) if len(theirs) > 1 else state[theirs[0]]


def _prepare(state: Mapping[str, Tensor], layout: str | None) -> tuple[Mapping[str, Tensor], str]:
    layout = layout or detect_layout(state)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return (_hf_v4_to_v5(state) if layout == "hf" else state), layout


def convert_state_dict(
    state: Mapping[str, Tensor], model: nn.Module, layout: str | None = None, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """``state`` (any layout; detected when ``layout`` is None) renamed to ``model``'s keys.

    Every tensor of the model must be found with its shape, and every tensor of ``state`` used, except
    the buffers sodlib recomputes (anchors, position embeddings, ``num_batches_tracked``). Otherwise a
    ValueError names ``source``, the layout, and the first missing / unexpected keys and shape mismatches.
    """
    state, layout = _prepare(state, layout)
    out, used, missing, mismatched = {}, set(), [], []
    for key, ref in model.state_dict().items():
        theirs, tensor = _lookup(state, key, layout)
        if tensor is None:
            if not key.endswith("num_batches_tracked"):
                missing.append(theirs[0] if len(theirs) == 1 else f"{key} (as {', '.join(theirs)})")
            continue
        used.update(theirs)
        if tensor.shape != ref.shape:
            mismatched.append(
                f"{theirs[0]}: {tuple(tensor.shape)} in the checkpoint, {tuple(ref.shape)} in the model"
            )
            continue
        out[key] = tensor
    unexpected = [k for k in state if k not in used and not _IGNORED.search(k)]
    if missing or unexpected or mismatched:
        parts = [
            f"{label} ({len(items)}): {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if items
        ]
        raise ValueError(f"{source} ({layout} layout) does not fit the model config: " + "; ".join(parts))
    return out


def to_layout(model: nn.Module | Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """sodlib's state dict (a model or its ``state_dict()``) under another layout's names."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    state = model.state_dict() if isinstance(model, nn.Module) else model
    out = {}
    for key, tensor in state.items():
        theirs = _NAMES[layout](key)
        for name, part in zip(theirs, tensor.chunk(len(theirs)) if len(theirs) > 1 else [tensor]):
            out[name] = part.clone()
    return out


def load_rtdetr(checkpoint: str | os.PathLike | Mapping, model_cfg: ModelConfig) -> nn.Module:
    """A detector built from ``model_cfg`` holding ``checkpoint``'s weights, in eval mode.

    ``checkpoint``: a path or a loaded object in RT-DETR's, transformers' or sodlib's layout (see
    :func:`read_state_dict`). Anything that does not fit ``model_cfg`` is refused with a ValueError naming
    the first missing / unexpected keys and shape mismatches (:func:`convert_state_dict`), and so are
    non-finite weights.
    """

    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"model_cfg must be a ModelConfig, got {type(model_cfg).__name__}")
    source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "state dict"
    state = read_state_dict(checkpoint)
    # the weights replace whatever the config names as pretrained backbone: do not read that file
    model = build_detector(dataclasses.replace(model_cfg, pretrained_path=""))
    model.config = model_cfg
    converted = convert_state_dict(state, model, source=source)
    bad = next(
        (k for k, v in converted.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None
    )
    if bad is not None:  # a model that cannot predict anything: refused, not loaded
        raise ValueError(f"{source}: weight {bad!r} holds NaN or infinite values; the checkpoint is damaged")
    model.load_state_dict(converted, strict=False)
    return model.eval()


@dataclasses.dataclass
class InitReport:
    """What :func:`init_from` did: sodlib keys loaded, re-initialised (shape differs: the class heads when
    the class count changes) and absent from the checkpoint (e.g. MRQM's head on an RT-DETR checkpoint)."""

    source: str
    layout: str
    loaded: list[str]
    reinitialised: list[str]
    absent: list[str]

    def __str__(self) -> str:
        def short(items: list[str]) -> str:
            return f"{len(items)}" + (
                f" ({', '.join(items[:6])}{', ...' if len(items) > 6 else ''})" if items else ""
            )

        return (
            f"initialised from {self.source} ({self.layout} layout): {len(self.loaded)} tensors loaded; "
            f"re-initialised, shape differs: {short(self.reinitialised)}; not in the checkpoint: "
            f"{short(self.absent)}"
        )


def init_from(
    model: nn.Module, checkpoint: str | os.PathLike | Mapping, layout: str | None = None
) -> InitReport:
    """Fine-tuning start, as RT-DETR's tuning mode: load every tensor of ``checkpoint`` (any layout) whose
    name and shape fit ``model``; the others keep their fresh initialisation and are logged.

    A checkpoint of which less than half the tensors fit is refused (ValueError naming it): training from
    scratch by mistake is the failure this guards against. A different class count (the class heads) or an
    added MRQM head fits that rule; a different backbone or width does not.
    """
    source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "state dict"
    state, layout = _prepare(read_state_dict(checkpoint), layout)
    fitting, reinitialised, absent, used = {}, [], [], set()
    for key, ref in model.state_dict().items():
        theirs, tensor = _lookup(state, key, layout)
        if tensor is None:
            if not key.endswith("num_batches_tracked"):
                absent.append(key)
        elif tensor.shape != ref.shape:
            reinitialised.append(key)
        else:
            fitting[key] = tensor
            used.update(theirs)
    counted = [k for k in state if not _IGNORED.search(k)]
    if sum(k in used for k in counted) < 0.5 * len(counted):
        raise ValueError(
            f"{source} ({layout} layout): only {sum(k in used for k in counted)} of its {len(counted)} "
            f"tensors fit the model; it is not a checkpoint of this architecture"
        )
    model.load_state_dict(fitting, strict=False)
    return InitReport(
        source, layout, [k for k in fitting if not k.endswith("num_batches_tracked")], reinitialised, absent
    )
