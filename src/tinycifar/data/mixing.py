"""Batch mixing on the training device: mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019).

A mixed batch blends each image with another image of the same batch (a shuffled copy): mixup
averages the two with weight ``lam ~ Beta(alpha, alpha)``, CutMix pastes a box of the other image
covering ``1 - lam`` of the area. The targets become the same blend of the two one-hot labels,
which ``nn.CrossEntropyLoss`` takes as class probabilities (label smoothing still applies on top).
One ``lam`` and one box per batch, as both papers do; a batch is mixed with probability ``p``.
"""

from __future__ import annotations

import numpy as np
import torch

MODES = ("off", "mixup", "cutmix")


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Rows [top, bottom) and columns [left, right) of a box of about ``1 - lam`` of the image,
    centred anywhere in it and clipped at its edges (so it may come out smaller)."""
    ratio = np.sqrt(1.0 - lam)
    box_h, box_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h - box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w - box_w // 2, width)
    return top, bottom, left, right


def mix_batch(x: torch.Tensor, labels: torch.Tensor, num_classes: int, mode: str, alpha: float, p: float,
              g: torch.Generator, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch mixed by ``mode`` and its targets as class probabilities (N, num_classes).

    ``g`` (on the batch's device) draws the pairing, ``rng`` the mixing weight and the box; both
    are seeded per epoch by the loader, so a resumed run mixes as the original did.
    """
    if mode not in MODES:
        raise ValueError(f"unknown batch mixing {mode!r}; choose from {', '.join(MODES)}")
    # one_hot checks the labels' range by reading them back (.item()) on the CPU; scatter does not
    targets = torch.zeros(len(labels), num_classes, device=labels.device).scatter_(1, labels[:, None], 1.0)
    if mode == "off" or rng.random() >= p:
        return x, targets
    partner = torch.randperm(len(labels), generator=g, device=x.device)
    lam = float(rng.beta(alpha, alpha))
    if mode == "mixup":
        x = lam * x + (1 - lam) * x[partner]
    else:
        height, width = x.shape[-2:]
        top, bottom, left, right = cutmix_box(height, width, lam, rng)
        x = x.clone()
        x[..., top:bottom, left:right] = x[partner][..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (height * width)  # the area actually kept
    return x, lam * targets + (1 - lam) * targets[partner]
