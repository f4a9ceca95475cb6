"""Batched augmentation on the training device: whole batches, no per-image Python.

Inputs are normalized float batches (B, C, H, W). "Fill with the dataset mean" is
therefore a fill with 0. Every transform draws from an explicit ``torch.Generator``
so that a seed fixes the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BORDER_MODES = ("reflection", "border", "zeros")


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def _chosen(n: int, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Which of n images a transform with probability p applies to, as a (n, 1, 1, 1) mask."""
    return (torch.rand(n, generator=g, device=device) < p).view(n, 1, 1, 1)


def hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flip each image with probability p, or exactly those where ``mask`` (B,) is true."""
    chosen = _chosen(len(x), p, g, x.device) if mask is None else mask.view(-1, 1, 1, 1)
    return torch.where(chosen, x.flip(3), x)


def shift_scale_rotate(
    x: torch.Tensor,
    g: torch.Generator,
    shift: float = 0.1,
    scale: float = 0.1,
    rotate: float = 15.0,
    border: str = "reflection",
    p: float = 0.5,
) -> torch.Tensor:
    """Random affine per image (albumentations' ShiftScaleRotate), one grid_sample for the batch."""
    if border not in BORDER_MODES:
        raise ValueError(f"border mode {border!r}: expected one of {BORDER_MODES}")
    n, dev = len(x), x.device
    angle = _uniform(n, -rotate, rotate, g, dev) * (math.pi / 180)
    zoom = _uniform(n, 1 - scale, 1 + scale, g, dev)
    tx, ty = _uniform(n, -shift, shift, g, dev) * 2, _uniform(n, -shift, shift, g, dev) * 2
    apply = _chosen(n, p, g, dev).view(n)
    # affine_grid maps output to input coordinates: the inverse of the image transform.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, -tx], 1), torch.stack([sin, cos, -ty], 1)], 1)
    identity = torch.tensor([[1.0, 0, 0], [0, 1, 0]], device=dev).expand(n, 2, 3)
    theta = torch.where(apply.view(n, 1, 1), theta, identity)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode=border, align_corners=False)
    return torch.where(apply.view(n, 1, 1, 1), out, x)


def erase_boxes(
    x: torch.Tensor,
    g: torch.Generator,
    size: int,
    fill: float = 0.0,
    inside: bool = True,
    p: float = 1.0,
) -> torch.Tensor:
    """One size x size hole per chosen image, filled with ``fill`` (0 = dataset mean).

    ``inside=True`` keeps the hole whole inside the image (CoarseDropout); ``False`` lets its
    centre go anywhere, so holes may be clipped at the border (DeVries & Taylor's cutout).
    """
    n, _, h, w = x.shape
    dev = x.device
    if inside:
        top = torch.randint(0, h - size + 1, (n,), generator=g, device=dev)
        left = torch.randint(0, w - size + 1, (n,), generator=g, device=dev)
    else:
        top = torch.randint(0, h, (n,), generator=g, device=dev) - size // 2
        left = torch.randint(0, w, (n,), generator=g, device=dev) - size // 2
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)
    hole = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1) & _chosen(n, p, g, dev)
    return x.masked_fill(hole, fill)


def translate(x: torch.Tensor, g: torch.Generator, pad: int = 2, mode: str = "reflect") -> torch.Tensor:
    """Random crop of the padded image: a shift of up to ``pad`` pixels each way."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, mode=mode)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


@dataclass
class AugmentConfig:
    """A policy and its knobs; ``policy`` names the set of transforms."""

    policy: str = "fast"
    flip: float = 0.5  # probability
    alternate_flip: bool = False  # airbench: each image flipped in every other epoch, not at random
    shift: float = 0.1  # shift-scale-rotate: fraction of the image size
    scale: float = 0.1
    rotate: float = 15.0  # degrees
    ssr_p: float = 0.5
    border: str = "reflection"
    dropout_size: int = 16  # coarse dropout: one hole, whole inside the image
    dropout_p: float = 0.5
    translate_pad: int = 2
    cutout_size: int = 0  # 0 = no cutout
    cutout_p: float = 1.0


POLICIES = ("seed", "fast", "none")


def augment(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator,
            flip_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``cfg.policy`` to a normalized batch.

    seed: flip + shift-scale-rotate + coarse dropout (the assignment's albumentations recipe).
    fast: flip + translate + cutout (the fast-training recipe; cheap on a CPU).
    ``flip_mask`` replaces the random flip decisions (the loader's alternating flips).
    """
    if cfg.policy == "none":
        return x
    if cfg.policy == "seed":
        x = hflip(x, g, cfg.flip, flip_mask)
        x = shift_scale_rotate(x, g, cfg.shift, cfg.scale, cfg.rotate, cfg.border, cfg.ssr_p)
        return erase_boxes(x, g, cfg.dropout_size, inside=True, p=cfg.dropout_p)
    if cfg.policy == "fast":
        x = hflip(x, g, cfg.flip, flip_mask)
        if cfg.translate_pad:
            x = translate(x, g, cfg.translate_pad)
        if cfg.cutout_size:
            x = erase_boxes(x, g, cfg.cutout_size, inside=False, p=cfg.cutout_p)
        return x
    raise ValueError(f"unknown augmentation policy {cfg.policy!r}; choose from {POLICIES}")
