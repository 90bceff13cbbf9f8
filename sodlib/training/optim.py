"""Optimisation pieces of RT-DETR's recipe: AdamW parameter groups, linear warmup, model EMA."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from sodlib.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, extra: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW with groups: backbone (lr × lr_backbone_mult), no-decay (norms, biases), rest.

    RT-DETR's configs set weight decay 0 on the encoder/decoder norm layers; we extend that to every
    1-D parameter (norm weights and biases), the usual DETR-family practice. ``extra`` holds
    training-only modules with parameters (the SR weight generator in the criterion).
    """
    groups = {"backbone": [], "backbone_no_decay": [], "no_decay": [], "default": []}
    named = list(_unwrap(model).named_parameters())
    if extra is not None:
        named += [(f"extra.{n}", p) for n, p in extra.named_parameters()]
    for name, p in named:
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1
        if name.startswith("backbone."):
            groups["backbone_no_decay" if no_decay else "backbone"].append(p)
        else:
            groups["no_decay" if no_decay else "default"].append(p)
    lr_bb = cfg.lr * cfg.lr_backbone_mult
    spec = {
        "backbone": {"lr": lr_bb, "weight_decay": cfg.weight_decay},
        "backbone_no_decay": {"lr": lr_bb, "weight_decay": 0.0},
        "no_decay": {"lr": cfg.lr, "weight_decay": 0.0},
        "default": {"lr": cfg.lr, "weight_decay": cfg.weight_decay},
    }
    param_groups = [{"params": ps, "name": k, **spec[k]} for k, ps in groups.items() if ps]
    for g in param_groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


def lr_factor(iteration: int, cfg: TrainConfig, total_iters: int | None = None) -> float:
    """Linear warmup from 0 over ``warmup_iters`` (RT-DETR), then constant or cosine to 10%."""
    warm = min(1.0, (iteration + 1) / cfg.warmup_iters) if cfg.warmup_iters > 0 else 1.0
    if cfg.lr_schedule == "cosine" and total_iters:
        progress = min(1.0, max(0.0, (iteration - cfg.warmup_iters) / max(1, total_iters - cfg.warmup_iters)))
        return warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return warm


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Scale every group's base rate by ``factor``; return the rate of the main (``default``) group — the
    ``train.lr`` schedule that log.csv reports, not the backbone's ``lr_backbone_mult`` share of it."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    main = next((g for g in optimizer.param_groups if g.get("name") == "default"), optimizer.param_groups[0])
    return main["lr"]


class ModelEMA:
    """Exponential moving average of weights with RT-DETR's ramp: d = decay·(1 − exp(−updates/warmups))."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 2000):
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmups, self.updates = decay, warmups, 0

    def current_decay(self) -> float:
        return self.decay * (1 - math.exp(-self.updates / self.warmups)) if self.warmups else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        src = _unwrap(model).state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(src[k].detach(), alpha=1 - d)
            else:
                v.copy_(src[k])

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
