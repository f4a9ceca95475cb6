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

# grid_sample's padding modes and cv2's: reflect101 = cv2.BORDER_REFLECT_101 (albumentations 1.x's
# default, the reference run's), reflection = BORDER_REFLECT, border = BORDER_REPLICATE, zeros =
# BORDER_CONSTANT filled with the dataset mean (0 once normalized).
BORDER_MODES = ("reflect101", "reflection", "border", "zeros")


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def _chosen(n: int, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Which of n images a transform with probability p applies to, as a (n, 1, 1, 1) mask."""
    return (torch.rand(n, generator=g, device=device) < p).view(n, 1, 1, 1)


def hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flip each image with probability p, or exactly those where ``mask`` (B,) is true."""
    chosen = _chosen(len(x), p, g, x.device) if mask is None else mask.view(-1, 1, 1, 1)
    return torch.where(chosen, x.flip(3), x)


def affine_warp(x: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                border: str = "reflect101") -> torch.Tensor:
    """Rotate each image by ``angle`` degrees (counter-clockwise) and scale it by ``zoom`` about its
    centre, then shift it by (``dx``, ``dy``) fractions of its width and height: the geometry of
    albumentations' ShiftScaleRotate (cv2.getRotationMatrix2D plus a shift, bilinear), one
    ``grid_sample`` for the batch. Tensors of shape (B,); ``border`` as in ``BORDER_MODES``.
    """
    if border not in BORDER_MODES:
        raise ValueError(f"border mode {border!r}: expected one of {BORDER_MODES}")
    n, _, h, w = x.shape
    a = angle.to(torch.float32) * (math.pi / 180)
    cos, sin = torch.cos(a) / zoom, torch.sin(a) / zoom
    # affine_grid maps output to input coordinates (normalized to [-1, 1] per axis), so theta is
    # the inverse of the image transform: undo the shift, then rotate back and unscale.
    tx, ty = 2 * dx, 2 * dy
    theta = torch.stack([
        torch.stack([cos, -sin * h / w, -cos * tx + sin * ty * h / w], 1),
        torch.stack([sin * w / h, cos, -sin * tx * w / h - cos * ty], 1),
    ], 1)
    pad = 0
    if border == "reflect101":  # cv2.BORDER_REFLECT_101: mirror about the edge pixels, not the edges
        pad = min(16, h - 1, w - 1)
        x = F.pad(x, (pad,) * 4, mode="reflect")
        # Python scalars, not a tensor made from host data (on a GPU that copy waits for the queue)
        theta = torch.cat([theta[:, :1] * (w / (w + 2 * pad)), theta[:, 1:] * (h / (h + 2 * pad))], 1)
    grid = F.affine_grid(theta.to(x.dtype), [n, x.shape[1], h, w], align_corners=False)
    mode = {"reflection": "reflection", "reflect101": "border", "border": "border", "zeros": "zeros"}[border]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=mode, align_corners=False)


def ssr_params(n: int, g: torch.Generator, device: torch.device, shift: float = 0.05, scale: float = 0.05,
               rotate: float = 15.0, p: float = 0.5) -> tuple[torch.Tensor, ...]:
    """ShiftScaleRotate's draws for n images, as the library makes them: whether it applies
    (probability p), an angle in [-rotate, rotate] degrees, a zoom in [1 - scale, 1 + scale] and a
    shift in [-shift, shift] of the width and of the height, each uniform."""
    angle = _uniform(n, -rotate, rotate, g, device)
    zoom = _uniform(n, 1 - scale, 1 + scale, g, device)
    dx, dy = _uniform(n, -shift, shift, g, device), _uniform(n, -shift, shift, g, device)
    return _chosen(n, p, g, device), angle, zoom, dx, dy


def shift_scale_rotate(
    x: torch.Tensor,
    g: torch.Generator,
    shift: float = 0.05,
    scale: float = 0.05,
    rotate: float = 15.0,
    border: str = "reflect101",
    p: float = 0.5,
) -> torch.Tensor:
    """Albumentations' ShiftScaleRotate on each image of the batch (see ``ssr_params``)."""
    apply, angle, zoom, dx, dy = ssr_params(len(x), g, x.device, shift, scale, rotate, p)
    return torch.where(apply, affine_warp(x, angle, zoom, dx, dy, border), x)


def hole_corners(n: int, h: int, w: int, size: int, g: torch.Generator, device: torch.device,
                 inside: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners of one size x size hole per image.

    ``inside=True``: uniform over the positions that keep the hole whole inside the image
    (albumentations' CoarseDropout); ``False``: the centre anywhere, so holes may be clipped at the
    border (DeVries & Taylor's cutout).
    """
    if inside:
        return (torch.randint(0, h - size + 1, (n,), generator=g, device=device),
                torch.randint(0, w - size + 1, (n,), generator=g, device=device))
    return (torch.randint(0, h, (n,), generator=g, device=device) - size // 2,
            torch.randint(0, w, (n,), generator=g, device=device) - size // 2)


def fill_boxes(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int, fill: float = 0.0,
               chosen: torch.Tensor | None = None) -> torch.Tensor:
    """Fill the size x size box at (top, left) of each image (clipped at the border) with ``fill``;
    only where ``chosen`` (B, 1, 1, 1) is true, when given."""
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)
    hole = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)
    return x.masked_fill(hole if chosen is None else hole & chosen, fill)


def erase_boxes(x: torch.Tensor, g: torch.Generator, size: int, fill: float = 0.0, inside: bool = True,
                p: float = 1.0) -> torch.Tensor:
    """One size x size hole per chosen image (probability p), filled with ``fill`` (0 = dataset mean)."""
    n, _, h, w = x.shape
    top, left = hole_corners(n, h, w, size, g, x.device, inside)
    return fill_boxes(x, top, left, size, fill, _chosen(n, p, g, x.device))


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
    # shift-scale-rotate, as the reference run called albumentations (1.3): shift_limit=0.05,
    # scale_limit=0.05, rotate_limit=15, p=0.5, and that version's default border, reflect-101
    shift: float = 0.05  # fraction of the width and of the height
    scale: float = 0.05
    rotate: float = 15.0  # degrees
    ssr_p: float = 0.5
    border: str = "reflect101"
    dropout_size: int = 16  # coarse dropout: one hole, whole inside the image
    dropout_p: float = 0.5
    translate_pad: int = 2
    cutout_size: int = 0  # 0 = no cutout
    cutout_p: float = 1.0
    # AugMix after the policy (data/augmix.py): off | mix (one AugMix view per image) | jsd (the image
    # and two AugMix views, with the Jensen-Shannon consistency loss; three times the images a step)
    augmix: str = "off"
    augmix_severity: int = 3  # the paper's CIFAR value: operation levels drawn from [0.1, severity]
    augmix_width: int = 3  # chains mixed per view
    augmix_depth: int = 0  # operations per chain; 0 = drawn from 1..3 for each chain
    jsd_weight: float = 12.0  # the consistency term's weight (the paper's lambda)
    # batch mixing after everything else (data/mixing.py): off | mixup | cutmix; the targets become
    # class probabilities. alpha: the Beta(alpha, alpha) of the mixing weight; p: share of batches mixed
    mix: str = "off"
    mix_alpha: float = 1.0
    mix_p: float = 1.0


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
