"""Segmentation losses shared by the CLIP methods trained on synthetic anomalies (MediCLIP, MVFA).

Both follow the definitions in METHODS_CLIP.md ("Shared losses"), which are those of the
official MediCLIP / MVFA code: a focal loss on softmax probabilities with a clamped one-hot
target, and a per-image soft Dice loss with smoothing 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FOCAL_EPS = 1e-5
"""The one-hot clamp and the offset added to p_t (the official code's ``smooth``)."""


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (alpha 1) of class probabilities ``probs`` (B, C, H, W) against labels ``target`` (B, H, W).

    Per pixel: the one-hot of ``target.long()`` clamped to [1e-5, 1 - 1e-5];
    ``pt = sum_c(onehot * probs) + 1e-5``; loss ``-(1 - pt)^gamma * log(pt)``, averaged over
    all pixels. ``probs`` are probabilities (after softmax), not logits.
    """
    if probs.dim() != 4 or target.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(f"focal_loss expects probs (B, C, H, W) and target (B, H, W), got "
                         f"{tuple(probs.shape)} and {tuple(target.shape)}")
    onehot = F.one_hot(target.long(), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    onehot = onehot.clamp(FOCAL_EPS, 1.0 - FOCAL_EPS)
    pt = (onehot * probs).sum(dim=1) + FOCAL_EPS
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(p1: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss of the anomaly probability ``p1`` (B, H, W) against the mask ``target`` (B, H, W).

    Per image ``d = (2 * sum(p1 * y) + 1) / (sum(p1) + sum(y) + 1)``; loss ``1 - mean_batch(d)``.
    """
    if p1.shape != target.shape:
        raise ValueError(f"dice_loss expects p1 and target of one shape, got {tuple(p1.shape)} and {tuple(target.shape)}")
    p = p1.reshape(p1.shape[0], -1)
    y = target.reshape(target.shape[0], -1).to(p.dtype)
    dice = (2.0 * (p * y).sum(dim=1) + 1.0) / (p.sum(dim=1) + y.sum(dim=1) + 1.0)
    return 1.0 - dice.mean()
