"""AugMix (Hendrycks et al., ICLR 2020), batched on the training device.

Each image gets ``width`` chains of one to three random operations; the chains are mixed with
Dirichlet(1) weights and the mixture is blended with the image by a Beta(1, 1) weight. The
operations are the paper's CIFAR set, which leaves out everything that overlaps the CIFAR-10-C
corruptions (contrast, brightness, colour, sharpness; no noise, blur or JPEG), so accuracy on
CIFAR-10-C measures generalisation to unseen shifts:

    autocontrast, equalize, posterize, solarize, rotate, shear_x, shear_y, translate_x, translate_y

with the paper's magnitudes: a level drawn uniformly in [0.1, severity] per operation, rotate up to
int(3 * level) degrees, shear up to 0.03 * level, translate up to int(level * size / 30) pixels, posterize to
4 - int(0.4 * level) bits, solarize above 256 - int(25.6 * level); geometric operations get a random
sign and fill with black, as PIL's do.

Batched: the ``width`` chains of every image are stacked into one batch, so a chain step is one
pass of each operation over the images that drew it (the geometric ones share one ``grid_sample``),
not per-image Python; on a GPU, one pass over the whole batch, each image keeping its own
operation's result, so that no step reads anything back to the host.

Differences from the PIL reference: pixel values stay floats between
operations (PIL rounds to uint8 after each), shear is about the top-left corner in continuous
coordinates, and rotation and shear resample bilinearly like PIL's BILINEAR.

Modes (``AugmentConfig.augmix``): ``mix`` replaces each training image by one AugMix view;
``jsd`` feeds the clean image and two AugMix views, and the loss adds the Jensen-Shannon
consistency between the three predictions (``losses.AugMixConsistency``), which the paper found
worth most of AugMix's gain; it triples each step's images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPS = ("autocontrast", "equalize", "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x",
       "translate_y")
_FIRST_GEOMETRIC = OPS.index("rotate")
MODES = ("off", "mix", "jsd")


def views_per_image(mode: str) -> int:
    """How many images a training step sees per labelled image: 3 with the consistency loss."""
    return 3 if mode == "jsd" else 1


def autocontrast(p: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to the full 0..255 range (PIL's autocontrast, no cutoff)."""
    lo, hi = p.amin((2, 3), keepdim=True), p.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (p - lo) * (255 / (hi - lo).clamp_min(1e-3)), p)


def equalize(p: torch.Tensor) -> torch.Tensor:
    """Histogram equalization of each channel of each image, with PIL's lookup table:
    step = (pixels - count of the top level) // 255, level i -> (step // 2 + pixels below i) // step."""
    n, c, h, w = p.shape
    q = p.round().clamp(0, 255).long().view(n, c, h * w)
    hist = torch.zeros(n, c, 256, dtype=torch.long, device=p.device).scatter_add_(2, q, torch.ones_like(q))
    levels = torch.arange(256, device=p.device)
    top = torch.where(hist > 0, levels, -1).amax(2, keepdim=True)
    step = (h * w - hist.gather(2, top)) // 255
    below = hist.cumsum(2) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(max=255)
    lut = torch.where(step > 0, lut, levels)
    return lut.gather(2, q).view(n, c, h, w).to(p.dtype)


def posterize(p: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` (n,) bits of each 8-bit value."""
    step = (2.0 ** (8 - bits)).view(-1, 1, 1, 1).to(p.dtype)
    return torch.div(p.round().clamp(0, 255), step, rounding_mode="floor") * step


def solarize(p: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the values at or above ``threshold`` (n,)."""
    # arithmetic, not torch.where: with a broadcast mask that was far slower on CPU
    return p + (p >= threshold.view(-1, 1, 1, 1)) * (255 - 2 * p)


def geometric_thetas(op: torch.Tensor, magnitude: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``affine_grid`` matrices (output -> input, normalized coordinates) for rotate, shear and
    translate, from each image's operation index and signed magnitude (degrees, shear factor, pixels);
    the identity for any other operation. Selected with ``torch.where``, not boolean indexing, which
    would read the masks back to the host."""
    angle = torch.deg2rad(magnitude)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = op == OPS.index("rotate")
    sx, sy = op == OPS.index("shear_x"), op == OPS.index("shear_y")  # x_in = x + s * y, from the top-left
    tx, ty = op == OPS.index("translate_x"), op == OPS.index("translate_y")
    zero = torch.zeros_like(magnitude)
    shear_x, shear_y = torch.where(sx, magnitude * h / w, zero), torch.where(sy, magnitude * w / h, zero)
    rows = [
        torch.where(rot, cos, 1.0), torch.where(rot, -sin * h / w, shear_x),
        torch.where(tx, 2 * magnitude / w, shear_x),
        torch.where(rot, sin * w / h, shear_y), torch.where(rot, cos, 1.0),
        torch.where(ty, 2 * magnitude / h, shear_y),
    ]
    return torch.stack(rows, 1).view(-1, 2, 3)


# Device types where a chain step picks the images that drew each operation by index: cheapest, and on
# the CPU reading the picks back costs nothing. Elsewhere (a GPU) that read would stall the queue at every
# step, so every operation runs on the whole batch and each image keeps its own's result (fixed shapes).
PICK_BY_INDEX_ON = ("cpu",)


def pixel_operation(k: int, p: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """The ``k``-th of the non-geometric operations on every image, at each image's ``level``."""
    name = OPS[k]
    if name == "autocontrast":
        return autocontrast(p)
    if name == "equalize":
        return equalize(p)
    if name == "posterize":
        return posterize(p, 4 - (level * 0.4).long())
    return solarize(p, 256 - (level * 25.6).long())


def warp(p: torch.Tensor, op: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Rotate, shear or translate each image as its ``op`` says (the identity for the others), by
    the paper's magnitude at ``level`` with ``sign``, resampled bilinearly with a black fill."""
    # per unit of level: rotate int_parameter(level, 30) degrees, shear float_parameter(level, 0.3),
    # translate int_parameter(level, size / 3) pixels (Python scalars: no tensor made from host data)
    shear = (op == OPS.index("shear_x")) | (op == OPS.index("shear_y"))
    translate = (op == OPS.index("translate_x")) | (op == OPS.index("translate_y"))
    per_level = torch.where(op == OPS.index("rotate"), 3.0,
                            torch.where(shear, 0.03, torch.where(translate, p.shape[3] / 30, 0.0)))
    magnitude = level * per_level
    magnitude = sign * torch.where(shear, magnitude, magnitude.floor())  # whole degrees and pixels
    theta = geometric_thetas(op, magnitude, p.shape[2], p.shape[3])
    grid = F.affine_grid(theta.to(p.dtype), list(p.shape), align_corners=False)
    return F.grid_sample(p, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def chain_step(p: torch.Tensor, op: torch.Tensor, level: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Apply to each image (0..255 floats) the operation ``op`` (n,) names at ``level`` (n,); op -1
    leaves an image as it is (its chain is shorter). Both ways of picking the images (see
    ``PICK_BY_INDEX_ON``) give the same result; the indexed one writes into ``p``."""
    sign = torch.randint(0, 2, (len(op),), generator=g, device=p.device) * 2 - 1
    groups = [(op == k, lambda x, _o, lv, _s, k=k: pixel_operation(k, x, lv)) for k in range(_FIRST_GEOMETRIC)]
    groups.append((op >= _FIRST_GEOMETRIC, warp))
    by_index, out = p.device.type in PICK_BY_INDEX_ON, p
    for drew, operation in groups:
        if by_index:
            idx = drew.nonzero().squeeze(1)
            if len(idx):
                out[idx] = operation(p[idx], op[idx], level[idx], sign[idx])
        else:
            out = torch.where(drew.view(-1, 1, 1, 1), operation(p, op, level, sign), out)
    return out


def augmix(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, g: torch.Generator, severity: int = 3,
           width: int = 3, depth: int = 0, views: int = 1) -> torch.Tensor:
    """``views`` independent AugMix views of each image of a normalized batch, as one normalized
    batch of ``views * len(x)`` images (view-major). ``mean`` and ``std`` are (1, C, 1, 1) on the
    0..255 scale; ``depth`` 0 draws each chain's length from 1..3."""
    n = len(x)
    pixels = (x * std + mean).clamp(0, 255)
    chains = pixels.repeat(views * width, 1, 1, 1)  # (views * width * n, C, H, W), chain-major
    m = len(chains)
    lengths = (torch.randint(1, 4, (m,), generator=g, device=x.device) if depth <= 0
               else torch.full((m,), depth, device=x.device))
    for step in range(depth if depth > 0 else 3):  # the longest a chain can be: no host read of lengths
        op = torch.randint(0, len(OPS), (m,), generator=g, device=x.device)
        op = torch.where(lengths > step, op, -1)
        level = torch.rand(m, generator=g, device=x.device) * (severity - 0.1) + 0.1
        chains = chain_step(chains, op, level, g)
    # Dirichlet(1, ..., 1) weights are normalized unit exponentials; Beta(1, 1) is uniform.
    weights = torch.empty(views, width, n, device=x.device).exponential_(generator=g)
    weights = (weights / weights.sum(1, keepdim=True)).view(views, width, n, 1, 1, 1)
    mixed = (weights * chains.view(views, width, n, *x.shape[1:])).sum(1)
    blend = torch.rand(views, n, 1, 1, 1, generator=g, device=x.device)
    out = (1 - blend) * pixels + blend * mixed
    return ((out - mean) / std).view(views * n, *x.shape[1:])


def augmix_views(x: torch.Tensor, mode: str, mean: torch.Tensor, std: torch.Tensor, g: torch.Generator,
                 severity: int = 3, width: int = 3, depth: int = 0) -> torch.Tensor:
    """The training batch a mode makes from a (policy-augmented) normalized batch: ``off`` the batch
    itself, ``mix`` one AugMix view per image, ``jsd`` the batch followed by two AugMix views."""
    if mode == "off":
        return x
    if mode == "mix":
        return augmix(x, mean, std, g, severity, width, depth)
    if mode == "jsd":
        return torch.cat([x, augmix(x, mean, std, g, severity, width, depth, views=2)])
    raise ValueError(f"unknown AugMix mode {mode!r}; choose from {MODES}")
