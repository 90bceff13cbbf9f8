"""Paper A's Sample Reweighting (SR) weight generator (§4.3, Eqs. 16-18, Fig. 4).

Inputs are per-query features of the M matched queries of one decoder output: ``h_cls`` [M, C] (the
decoder output fed to the class head) and ``h_reg`` [M, C] (the hidden feature of the box MLP). The
paper's 1×1 convolutions act on one feature vector per query, so they are ``nn.Linear`` layers, and its
BatchNorm normalises over the matched queries (``BatchNorm1d`` on [M, C]).

The generator is a training-time module: it lives in the criterion, never in the detector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FewSampleBatchNorm1d", "SampleWeightGenerator"]


class FewSampleBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` over matched queries that tolerates M <= 1 in training.

    Batch statistics need at least two samples; an output with a single (or no) matched query is
    normalised with the running statistics instead, which are then left unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] <= 1:
            return F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                training=False,
                momentum=0.0,
                eps=self.eps,
            )
        return super().forward(x)


class _WeightBranch(nn.Module):
    """One task's weight: w = σ(BN(Conv3(H ⊗ Conv2(A)))) (Eqs. 17, 18); returns the pre-sigmoid logit."""

    def __init__(self, dim: int, norm_layer: type[nn.Module]):
        super().__init__()
        self.conv2 = nn.Linear(dim, dim)  # Conv2: C×C×1×1
        self.conv3 = nn.Linear(dim, 1)  # Conv3: 1×C×1×1
        self.norm = norm_layer(1)

    def forward(self, h: Tensor, a: Tensor) -> Tensor:
        return self.norm(self.conv3(h * self.conv2(a))).squeeze(-1)  # Eqs. 17/18 before σ: [M]


class SampleWeightGenerator(nn.Module):
    """Fig. 4: A = σ(ReLU(BN(Conv1(cat(H_reg, H_cls))))) (Eq. 16), Conv1: 2C → C;
    w_cls = σ(BN(Conv3(H_cls ⊗ Conv2(A)))) (Eq. 17) and w_reg likewise with its own Conv2/Conv3 (Eq. 18).

    ``forward(h_cls, h_reg)`` with [M, C] inputs returns ``(w_cls, w_reg)``, each [M] in (0, 1);
    :meth:`logits` returns the same before the sigmoid (for a numerically stable BCE on w).
    """

    def __init__(self, dim: int, norm_layer: type[nn.Module] = FewSampleBatchNorm1d):
        super().__init__()
        self.dim = dim
        self.conv1 = nn.Linear(2 * dim, dim)  # Conv1: C×2C×1×1
        self.norm1 = norm_layer(dim)
        self.cls = _WeightBranch(dim, norm_layer)
        self.reg = _WeightBranch(dim, norm_layer)

    def logits(self, h_cls: Tensor, h_reg: Tensor) -> tuple[Tensor, Tensor]:
        if h_cls.dim() != 2 or h_cls.shape != h_reg.shape or h_cls.shape[-1] != self.dim:
            raise ValueError(
                f"SampleWeightGenerator: expected h_cls and h_reg [M, {self.dim}], got "
                f"{tuple(h_cls.shape)} and {tuple(h_reg.shape)}"
            )
        a = torch.sigmoid(F.relu(self.norm1(self.conv1(torch.cat([h_reg, h_cls], -1)))))  # Eq. 16: A
        return self.cls(h_cls, a), self.reg(h_reg, a)  # Eqs. 17, 18 before σ

    def forward(self, h_cls: Tensor, h_reg: Tensor) -> tuple[Tensor, Tensor]:
        logit_cls, logit_reg = self.logits(h_cls, h_reg)
        return logit_cls.sigmoid(), logit_reg.sigmoid()  # Eqs. 17, 18: w = σ(·)
