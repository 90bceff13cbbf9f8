"""Backbones returning multi-scale feature maps: RT-DETR's ResNet-vd, torchvision ResNets and a tiny CPU
backbone.

All return a list of maps ``[C_l, ...]`` for ``return_levels`` (level l has stride 2**l: 2 → 4,
3 → 8, 4 → 16, 5 → 32) and expose ``out_channels`` / ``out_strides`` tuples in the same order.

Nothing is downloaded: pretrained weights come from a local ``state_dict`` file: torchvision's layout for
:class:`ResNetBackbone` (``torch.save(resnet50(weights=...).state_dict(), path)`` on a machine that has
them), RT-DETR's PResNet layout for :class:`PResNet` (the ``ResNet50_vd_ssld_v2_pretrained_from_paddle.pth``
files its configs download).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["PRESNET_DEPTHS", "PResNet", "ResNetBackbone", "TinyBackbone", "load_state_dict_file"]

_RESNETS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50}


def _check_levels(return_levels: tuple[int, ...]) -> tuple[int, ...]:
    levels = tuple(int(lv) for lv in return_levels)
    if not levels or any(lv not in (2, 3, 4, 5) for lv in levels) or list(levels) != sorted(set(levels)):
        raise ValueError(f"return_levels must be increasing values in (2, 3, 4, 5), got {return_levels}")
    return levels


def load_state_dict_file(module: nn.Module, path: str | Path, drop_prefixes: tuple[str, ...] = ()) -> None:
    """Load a ``state_dict`` saved with ``torch.save`` into ``module`` (strict), naming ``path`` on error.

    Keys starting with one of ``drop_prefixes`` (e.g. the classifier ``fc.``) are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TypeError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    state = {
        k.removeprefix("module."): v
        for k, v in state.items()
        if not any(k.startswith(p) for p in drop_prefixes)
    }
    # FrozenBatchNorm2d has no num_batches_tracked; torchvision checkpoints do (its loader drops them)
    expected = {k for k in module.state_dict() if not any(k.startswith(p) for p in drop_prefixes)}
    extra = sorted(k for k in set(state) - expected if not k.endswith("num_batches_tracked"))
    missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
    if missing or extra:
        raise ValueError(
            f"{path}: keys do not match the {type(module).__name__} "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''})"
        )
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{path}: cannot load into {type(module).__name__}: {err}") from err


class ResNetBackbone(nn.Module):
    """torchvision ResNet-18/34/50 body returning C2..C5 (strides 4..32) as selected.

    RT-DETR uses ResNet-**vd** (PaddlePaddle's PResNet): a deep stem of three 3×3 convs (32, 32, 64
    channels, the first with stride 2) instead of one 7×7 conv, and in each downsampling shortcut a
    2×2 average pool (stride 2) followed by a stride-1 1×1 conv instead of a stride-2 1×1 conv (which
    skips 3/4 of the input); for ResNet-50 the stride sits on the 3×3 conv of the bottleneck, as in
    torchvision's v1.5. Here we use torchvision's plain ResNet (7×7 stem, strided 1×1 shortcut), so
    that standard torchvision checkpoints load. Differences: ~19 k fewer parameters for R50 (the stem),
    and ImageNet accuracy ~1 point below vd; RT-DETR's published COCO numbers assume vd weights.

    Args:
        depth: 18, 34 or 50.
        return_levels: which of C2 (stride 4) .. C5 (stride 32) to return.
        freeze_norm: use ``FrozenBatchNorm2d`` (fixed statistics and affine; RT-DETR R50 practice).
            With random initialisation frozen norms are the identity, so set it for pretrained weights.
        freeze_at: -1 trains everything; 0 freezes the stem; k > 0 also the first k stages (RT-DETR
            R50 freezes the stem, R18/R34 nothing).
        pretrained_path: local torchvision ``state_dict`` file ("" = random initialisation).
    """

    def __init__(
        self,
        depth: int = 50,
        return_levels: tuple[int, ...] = (3, 4, 5),
        freeze_norm: bool = True,
        freeze_at: int = -1,
        pretrained_path: str = "",
    ):
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, got {depth}")
        self.return_levels = _check_levels(return_levels)
        norm = FrozenBatchNorm2d if freeze_norm else nn.BatchNorm2d
        net = _RESNETS[depth](weights=None, norm_layer=norm)
        if pretrained_path:
            load_state_dict_file(net, pretrained_path, drop_prefixes=("fc.",))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        expansion = 4 if depth == 50 else 1
        self.out_channels = tuple(64 * 2 ** (lv - 2) * expansion for lv in self.return_levels)
        self.out_strides = tuple(2**lv for lv in self.return_levels)
        _freeze(self.stem, self.stages, freeze_at)

    def forward(self, images: Tensor) -> list[Tensor]:
        return _run_stages(self.stem, self.stages, self.return_levels, images)


def _freeze(stem: nn.Module, stages, freeze_at: int) -> None:
    """``freeze_at`` -1: train all; 0: freeze the stem; k > 0: also the first k stages."""
    if freeze_at >= 0:
        for module in [stem, *stages[:freeze_at]]:
            module.requires_grad_(False)


def _conv_bn(
    c_in: int,
    c_out: int,
    stride: int = 1,
    act: bool = True,
    norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), norm_layer(c_out)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = _conv_bn(c_in, c_out, stride, act=True, norm_layer=norm_layer)
        self.conv2 = _conv_bn(c_out, c_out, 1, act=False, norm_layer=norm_layer)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm_layer(c_out))
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


def _run_stages(
    stem: Callable[[Tensor], Tensor], stages, return_levels: tuple[int, ...], images: Tensor
) -> list[Tensor]:
    """Stem, then stages C2..C5; collect the requested levels and stop after the last one."""
    x = stem(images)
    outs = []
    for level, stage in zip((2, 3, 4, 5), stages):
        x = stage(x)
        if level in return_levels:
            outs.append(x)
        if level == return_levels[-1]:
            break
    return outs


class TinyBackbone(nn.Module):
    """A small ResNet-like backbone for CPU profiles.

    Stem: 3×3/2 conv (width/2) and 3×3/2 conv (width) → stride 4; then four stages of basic residual
    blocks with widths (w, 2w, 4w, 8w) at strides 4, 8, 16, 32 (C2..C5), ``depths`` blocks each,
    trainable BatchNorm. width=32 costs ~0.45 GMAC per 320×320 image.
    """

    def __init__(
        self,
        width: int = 32,
        return_levels: tuple[int, ...] = (3, 4, 5),
        depths: tuple[int, ...] = (1, 1, 1, 1),
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        if len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"depths must be 4 positive block counts, got {depths}")
        self.return_levels = _check_levels(return_levels)
        stem_w = max(width // 2, 8)
        self.stem = nn.Sequential(
            _conv_bn(3, stem_w, 2, norm_layer=norm_layer), _conv_bn(stem_w, width, 2, norm_layer=norm_layer)
        )
        widths = (width, 2 * width, 4 * width, 8 * width)
        stages, c_in = [], width
        for i, (c_out, n) in enumerate(zip(widths, depths)):
            blocks = [
                _BasicBlock(
                    c_in if j == 0 else c_out,
                    c_out=c_out,
                    stride=2 if (i > 0 and j == 0) else 1,
                    norm_layer=norm_layer,
                )
                for j in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(widths[lv - 2] for lv in self.return_levels)
        self.out_strides = tuple(2**lv for lv in self.return_levels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> list[Tensor]:
        return _run_stages(self.stem, self.stages, self.return_levels, images)


# ---------------------------------------------------------------- ResNet-vd (RT-DETR's PResNet)

PRESNET_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class _ConvNorm(nn.Module):
    """conv (no bias, "same" padding) → norm → optional ReLU; submodules ``conv`` and ``norm`` (PResNet's
    names)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int,
        norm_layer: Callable[[int], nn.Module],
        act: bool,
    ):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, bias=False)
        self.norm = norm_layer(c_out)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class _VdBlock(nn.Module):
    """A ResNet-vd residual block: basic (two 3×3 convs: ``branch2a``, ``branch2b``) or bottleneck (1×1, 3×3
    carrying the stride, 1×1 to 4× the width: ``branch2a..c``), then ReLU(branch + shortcut).

    The first block of every stage has a projection shortcut ``short`` (even where the widths already agree,
    as in ResNet-18/34's first stage); where that block halves the resolution the shortcut is "variant d":
    2×2 average pooling, then a stride-1 1×1 conv (``short.pool``, ``short.conv``), so that no input pixel is
    skipped. The other blocks add their input unchanged.
    """

    def __init__(
        self,
        c_in: int,
        width: int,
        stride: int,
        project: bool,
        bottleneck: bool,
        norm_layer: Callable[[int], nn.Module],
    ):
        super().__init__()
        c_out = width * (4 if bottleneck else 1)
        if bottleneck:
            self.branch2a = _ConvNorm(c_in, c_out=width, kernel=1, stride=1, norm_layer=norm_layer, act=True)
            self.branch2b = _ConvNorm(
                width, c_out=width, kernel=3, stride=stride, norm_layer=norm_layer, act=True
            )
            self.branch2c = _ConvNorm(
                width, c_out=c_out, kernel=1, stride=1, norm_layer=norm_layer, act=False
            )
        else:
            self.branch2a = _ConvNorm(
                c_in, c_out=width, kernel=3, stride=stride, norm_layer=norm_layer, act=True
            )
            self.branch2b = _ConvNorm(
                width, c_out=width, kernel=3, stride=1, norm_layer=norm_layer, act=False
            )
        self.short: nn.Module | None = None
        if project and stride == 2:
            self.short = nn.Sequential(
                OrderedDict(
                    pool=nn.AvgPool2d(2, 2, 0, ceil_mode=True),
                    conv=_ConvNorm(c_in, c_out=c_out, kernel=1, stride=1, norm_layer=norm_layer, act=False),
                )
            )
        elif project:
            self.short = _ConvNorm(
                c_in, c_out=c_out, kernel=1, stride=stride, norm_layer=norm_layer, act=False
            )
        self.branches = [self.branch2a, self.branch2b] + ([self.branch2c] if bottleneck else [])

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for branch in self.branches:
            out = branch(out)
        return F.relu(out + (x if self.short is None else self.short(x)))


class _VdStage(nn.Module):
    def __init__(self, blocks: list[_VdBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PResNet(nn.Module):
    """ResNet-vd as RT-DETR builds it ("PResNet", from PaddleDetection): R18/R34/R50/R101, C2..C5 as selected.

    Differences from torchvision's ResNet (:class:`ResNetBackbone`): a deep stem of three 3×3 convs
    (3→32 with stride 2, 32→32, 32→64; ``conv1.conv1_1..3``) before the 3×3/2 max pool; average-pool
    shortcuts in the downsampling blocks (see :class:`_VdBlock`); the bottleneck's stride on its 3×3 conv.
    Parameter and buffer names follow RT-DETR's PResNet (``conv1.conv1_1.conv.weight``,
    ``res_layers.2.blocks.0.short.conv.norm.running_var``, ...), so its ImageNet checkpoints load as they
    are through ``pretrained_path`` and the backbone part of a released RT-DETR checkpoint maps one to one.

    Args:
        depth: 18, 34, 50 or 101.
        return_levels: which of C2 (stride 4) .. C5 (stride 32) to return (RT-DETR: C3..C5).
        freeze_norm: ``FrozenBatchNorm2d`` everywhere (RT-DETR-R50/R101); else trainable BatchNorm (R18/R34).
        freeze_at: -1 trains everything; 0 freezes the stem (R50/R101); k > 0 also the first k stages.
        pretrained_path: local state_dict file in PResNet's layout ("" = random initialisation).
    """

    def __init__(
        self,
        depth: int = 50,
        return_levels: tuple[int, ...] = (3, 4, 5),
        freeze_norm: bool = True,
        freeze_at: int = -1,
        pretrained_path: str = "",
    ):
        super().__init__()
        if depth not in PRESNET_DEPTHS:
            raise ValueError(f"PResNet depth must be one of {sorted(PRESNET_DEPTHS)}, got {depth}")
        self.return_levels = _check_levels(return_levels)
        norm = FrozenBatchNorm2d if freeze_norm else nn.BatchNorm2d
        self.conv1 = nn.Sequential(
            OrderedDict(
                conv1_1=_ConvNorm(3, c_out=32, kernel=3, stride=2, norm_layer=norm, act=True),
                conv1_2=_ConvNorm(32, c_out=32, kernel=3, stride=1, norm_layer=norm, act=True),
                conv1_3=_ConvNorm(32, c_out=64, kernel=3, stride=1, norm_layer=norm, act=True),
            )
        )
        bottleneck = depth >= 50
        expansion = 4 if bottleneck else 1
        widths = (64, 128, 256, 512)
        stages, c_in = [], 64
        for i, (width, count) in enumerate(zip(widths, PRESNET_DEPTHS[depth])):
            stride = 1 if i == 0 else 2
            blocks = [
                _VdBlock(
                    c_in if j == 0 else width * expansion,
                    width,
                    stride if j == 0 else 1,
                    project=j == 0,
                    bottleneck=bottleneck,
                    norm_layer=norm,
                )
                for j in range(count)
            ]
            stages.append(_VdStage(blocks))
            c_in = width * expansion
        self.res_layers = nn.ModuleList(stages)
        self.out_channels = tuple(widths[lv - 2] * expansion for lv in self.return_levels)
        self.out_strides = tuple(2**lv for lv in self.return_levels)
        if pretrained_path:
            load_state_dict_file(self, pretrained_path)
        _freeze(self.conv1, self.res_layers, freeze_at)

    def forward(self, images: Tensor) -> list[Tensor]:
        return _run_stages(self._stem, self.res_layers, self.return_levels, images)

    def _stem(self, images: Tensor) -> Tensor:
        return F.max_pool2d(self.conv1(images), 3, 2, 1)
