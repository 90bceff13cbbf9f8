"""How a predicted score moves under a Scale-aligned Target (notebook 01, Eq. 15).

:func:`score_trajectory` runs plain gradient descent on one logit against the target t of Eq. 15, recomputed
at every step from the current score: with ``mode="label"`` (t = c, s read as the one-hot label) the score
settles at c; with ``mode="pred"`` (t = c·s, s the detached prediction) every step pulls it towards c·s < s,
so the only fixed point is 0 — the reason sodlib trains with ``loss.st_mode=label``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sodlib.losses.formulas import scale_aligned_target, varifocal_loss


def score_trajectory(
    u: float,
    rho: float,
    mode: str,
    s0: float,
    loss: str = "BCE",
    steps: int = 3000,
    lr: float = 2.0,
    beta: float = 0.73,
    theta: float = 6.0,
) -> np.ndarray:
    """Scores σ(x) after each of ``steps`` gradient steps (learning rate ``lr``) on one logit x, starting at
    σ(x) = ``s0``, for a prediction of IoU ``u`` and area ratio ``rho`` with the ground truth.

    ``mode``: Eq. 15's reading (``label`` | ``pred``); ``loss``: ``BCE`` (binary cross-entropy with the soft
    target) or ``VFL`` (varifocal loss with the sample as a positive). Returns an array of ``steps`` scores.
    """
    if loss not in ("BCE", "VFL"):
        raise ValueError(f"loss must be BCE or VFL, got {loss!r}")
    u_t, rho_t, one = torch.tensor(u), torch.tensor(rho), torch.tensor(1.0)
    x = torch.logit(torch.tensor(s0, dtype=torch.float64)).requires_grad_()
    scores = []
    for _ in range(steps):
        s = x.sigmoid()
        t = scale_aligned_target(
            u_t, rho_t, one, score=s if mode == "pred" else None, beta=beta, theta=theta, mode=mode
        )
        value = (
            F.binary_cross_entropy_with_logits(x, t)
            if loss == "BCE"
            else varifocal_loss(x, t, positive_mask=torch.tensor(True))
        )
        x.data -= lr * torch.autograd.grad(value, x)[0]
        scores.append(float(s.detach()))
    return np.array(scores)
