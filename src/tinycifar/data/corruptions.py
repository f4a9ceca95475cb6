"""Common corruptions of 32x32 images, as CIFAR-10-C made them (Hendrycks & Dietterich, 2019).

The 15 corruptions of the benchmark (noise, blur, weather, digital) at 5 severities, with the
parameters of its CIFAR script (``make_cifar_c.py``), which are milder than ImageNet-C's because
the images are 32x32. Written here with numpy, scipy.ndimage and Pillow, image by image, each
drawing from its own generator seeded by (seed, corruption, severity, image index), so a corrupted
test set is the same on every machine and every run. Where this differs from the original:

- motion blur (and the streaks of snow): the original called ImageMagick's ``motion_blur``; here a
  one-sided line kernel with Gaussian weights of the same radius and sigma at the same random angle.
- frost: the original blended crops of six frost photographs shipped with its code; here an
  ice texture grown from the same plasma fractal as fog, thresholded into crystals and blurred.
- elastic transform: the original's OpenCV affine warp is ``scipy.ndimage.affine_transform`` with
  the mirror border (OpenCV's reflect-101).

``corrupt_split`` builds a whole corrupted set in worker processes; ``cached_corruption`` keeps it
in the user's cache folder, keyed by the test images themselves, so the next evaluation only reads it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CACHE_VERSION = 1
# a corruption whose images changed gets a new revision, so only its cached sets are built again
REVISIONS = {"glass_blur": 2}
Rng = np.random.Generator


def _unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError:
        raise ImportError("corruptions need scipy: pip install 'tinycifar[robustness]'") from None
    return ndimage


def _per_channel(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.stack([fn(x[..., c]) for c in range(x.shape[-1])], axis=-1)


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    return _per_channel(x, lambda ch: _ndimage().gaussian_filter(ch, sigma, mode="nearest", truncate=4.0))


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre by ``factor`` (>= 1), keeping the size."""
    h = x.shape[0]
    ch = int(math.ceil(h / factor))
    top = (h - ch) // 2
    crop = x[top:top + ch, top:top + ch]
    zoomed = _ndimage().zoom(crop, (factor, factor) + (1,) * (x.ndim - 2), order=1)
    trim = (zoomed.shape[0] - h) // 2
    return zoomed[trim:trim + h, trim:trim + h]


def plasma_fractal(rng: Rng, mapsize: int = 256, wibbledecay: float = 3.0) -> np.ndarray:
    """A (mapsize, mapsize) cloud in 0..1 by the diamond-square algorithm (mapsize a power of 2):
    each round sets the centres of the squares, then the midpoints of their edges, to the mean of
    their four neighbours plus noise whose scale shrinks by ``wibbledecay`` per round."""
    grid = np.zeros((mapsize, mapsize), dtype=np.float64)
    step, wibble = mapsize, 100.0
    while step >= 2:
        half = step // 2

        def noisy_mean(total: np.ndarray, wibble: float = wibble) -> np.ndarray:
            return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

        corners = grid[0:mapsize:step, 0:mapsize:step]
        square = corners + np.roll(corners, -1, axis=0)
        grid[half:mapsize:step, half:mapsize:step] = noisy_mean(square + np.roll(square, -1, axis=1))
        centres = grid[half:mapsize:step, half:mapsize:step]
        grid[0:mapsize:step, half:mapsize:step] = noisy_mean(
            centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1))
        grid[half:mapsize:step, 0:mapsize:step] = noisy_mean(
            centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0))
        step, wibble = half, wibble / wibbledecay
    grid -= grid.min()
    return grid / max(grid.max(), 1e-12)


def motion_kernel(radius: float, sigma: float, angle: float) -> np.ndarray:
    """A one-sided blur along ``angle`` degrees: Gaussian weights over ``radius`` pixels."""
    size = int(2 * math.ceil(radius) + 1)
    kernel = np.zeros((size, size), dtype=np.float32)
    centre = size // 2
    a = math.radians(angle)
    for d in np.linspace(0, radius, int(4 * radius) + 1):
        r, c = centre - d * math.sin(a), centre + d * math.cos(a)
        r0, c0 = int(math.floor(r)), int(math.floor(c))
        weight = math.exp(-d * d / (2 * sigma * sigma))
        for rr, cc, w in ((r0, c0, (1 - (r - r0)) * (1 - (c - c0))), (r0 + 1, c0, (r - r0) * (1 - (c - c0))),
                          (r0, c0 + 1, (1 - (r - r0)) * (c - c0)), (r0 + 1, c0 + 1, (r - r0) * (c - c0))):
            if 0 <= rr < size and 0 <= cc < size:
                kernel[rr, cc] += weight * w
    return kernel / kernel.sum()


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return _per_channel(x, lambda ch: _ndimage().convolve(ch, kernel, mode="mirror"))


@functools.cache
def disk(radius: float, alias_blur: float) -> np.ndarray:
    span = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    xx, yy = np.meshgrid(span, span)
    kernel = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
    kernel /= kernel.sum()
    return _ndimage().gaussian_filter(kernel, alias_blur, truncate=1.0 / max(alias_blur, 1e-6))


# ---------------------------------------------------------------------------- the 15 corruptions
# Each takes an HxWx3 uint8 image, a severity 1..5 and a generator; returns floats in 0..1.


def gaussian_noise(x, s, rng):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    return np.clip(_unit(x) + rng.normal(size=x.shape, scale=c), 0, 1)


def shot_noise(x, s, rng):
    c = [500, 250, 100, 75, 50][s - 1]
    return np.clip(rng.poisson(_unit(x) * c) / c, 0, 1)


def impulse_noise(x, s, rng):
    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    out = _unit(x).copy()
    hit = rng.random(x.shape) < c
    out[hit] = rng.random(int(hit.sum())) < 0.5  # salt or pepper, half each
    return out


def defocus_blur(x, s, rng):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    return np.clip(_convolve(_unit(x), disk(radius, alias)), 0, 1)


def glass_blur(x, s, rng):
    """Blur, jitter each pixel by at most one step up or left, blur again.

    The original loop meant to swap each pixel with a random neighbour, but its tuple assignment of
    numpy views (``x[h, w], x[h', w'] = x[h', w'], x[h, w]``) copies the neighbour into the pixel and
    leaves the neighbour as it was. Its offsets are -1 or 0 and it walks from the bottom-right, so each
    pixel reads a neighbour not yet visited: one gather per pass gives CIFAR-10-C's images. A true swap
    would carry pixels across the whole image, a far harsher corruption than the benchmark's.
    """
    sigma, passes = [(0.05, 1), (0.25, 1), (0.4, 1), (0.25, 2), (0.4, 2)][s - 1]
    img = (_gaussian(_unit(x), sigma) * 255).astype(np.uint8)
    rows, cols = np.indices(img.shape[:2])
    visited = (rows >= 2) & (cols >= 2)  # the original loop leaves the first two rows and columns alone
    for _ in range(passes):
        drow, dcol = rng.integers(-1, 1, size=(2, *img.shape[:2])) * visited
        img = img[rows + drow, cols + dcol]
    return np.clip(_gaussian(_unit(img), sigma), 0, 1)


def motion_blur(x, s, rng):
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][s - 1]
    return np.clip(_convolve(_unit(x), motion_kernel(radius, sigma, rng.uniform(-45, 45))), 0, 1)


def zoom_blur(x, s, rng):
    top = [1.06, 1.11, 1.16, 1.21, 1.26][s - 1]
    img = _unit(x)
    factors = np.arange(1, top, 0.01)
    out = sum(clipped_zoom(img, f) for f in factors)
    return np.clip((img + out) / (len(factors) + 1), 0, 1)


def snow(x, s, rng):
    c = [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
         (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][s - 1]
    img = _unit(x)
    layer = rng.normal(size=img.shape[:2], loc=c[0], scale=c[1])
    layer = clipped_zoom(layer, c[2]) if c[2] > 1 else layer
    layer[layer < c[3]] = 0
    layer = np.clip(layer, 0, 1)[..., None]
    layer = _convolve(layer, motion_kernel(c[4], c[5], rng.uniform(-135, -45)))
    gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = c[6] * img + (1 - c[6]) * np.maximum(img, gray[..., None] * 1.5 + 0.5)
    return np.clip(img + layer + np.rot90(layer, k=2), 0, 1)


def frost(x, s, rng):
    weight, amount = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][s - 1]
    cloud = plasma_fractal(rng, 64, 1.5)[:32, :32]
    crystals = np.clip((cloud - 0.45) * 3, 0, 1) ** 0.7
    ice = _gaussian(np.repeat(crystals[..., None], 3, -1), 0.6) * np.array([0.86, 0.92, 1.0], dtype=np.float32)
    return np.clip(weight * _unit(x) + amount * ice * 1.4, 0, 1)


def fog(x, s, rng):
    amount, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    img = _unit(x)
    top = img.max()
    img = img + amount * plasma_fractal(rng, 256, decay)[:32, :32][..., None]
    return np.clip(img * top / (top + amount), 0, 1)


def brightness(x, s, rng):
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    hsv = rgb_to_hsv(_unit(x))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.clip(hsv_to_rgb(hsv), 0, 1)


def contrast(x, s, rng):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    img = _unit(x)
    means = img.mean(axis=(0, 1), keepdims=True)
    return np.clip((img - means) * c + means, 0, 1)


def elastic_transform(x, s, rng):
    size = x.shape[0]
    alpha, sigma, affine = [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                            (0.1, 0.03, 0.03)][s - 1]
    alpha, sigma, affine = alpha * size, sigma * size, affine * size
    nd = _ndimage()
    img = _unit(x)
    centre, square = size // 2, size // 3
    src = np.float32([[centre + square, centre + square], [centre + square, centre - square],
                      [centre - square, centre - square]])
    dst = src + rng.uniform(-affine, affine, size=src.shape).astype(np.float32)
    # the affine map dst -> src (x, y order), applied per channel in (row, col) order
    a = np.linalg.solve(np.c_[dst, np.ones(3)], np.c_[src, np.ones(3)])[:, :2].T  # 2x3: src = a @ [dst, 1]
    matrix = np.array([[a[1, 1], a[1, 0]], [a[0, 1], a[0, 0]]])
    offset = np.array([a[1, 2], a[0, 2]])
    img = _per_channel(img, lambda ch: nd.affine_transform(ch, matrix, offset, order=1, mode="mirror"))
    dx = nd.gaussian_filter(rng.uniform(-1, 1, size=(size, size)), sigma, mode="reflect", truncate=3) * alpha
    dy = nd.gaussian_filter(rng.uniform(-1, 1, size=(size, size)), sigma, mode="reflect", truncate=3) * alpha
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    coords = [rows + dy, cols + dx]
    return np.clip(_per_channel(img, lambda ch: nd.map_coordinates(ch, coords, order=1, mode="reflect")), 0, 1)


def pixelate(x, s, rng):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    size = x.shape[0]
    img = Image.fromarray(x).resize((int(size * c), int(size * c)), Image.BOX).resize((size, size), Image.BOX)
    return _unit(np.asarray(img))


def jpeg_compression(x, s, rng):
    quality = [80, 65, 58, 50, 40][s - 1]
    buffer = io.BytesIO()
    Image.fromarray(x).save(buffer, "JPEG", quality=quality)
    return _unit(np.asarray(Image.open(buffer).convert("RGB")))


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, Rng], np.ndarray]] = {f.__name__: f for f in (
    gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur, snow, frost, fog,
    brightness, contrast, elastic_transform, pixelate, jpeg_compression)}
FAMILIES = {"noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
            "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
            "weather": ("snow", "frost", "fog", "brightness"),
            "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression")}


def parse_corruptions(text: str) -> list[str]:
    """'all', a family name, or comma-separated corruption names."""
    names: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            names += list(CORRUPTIONS)
        elif part in FAMILIES:
            names += FAMILIES[part]
        elif part in CORRUPTIONS:
            names.append(part)
        else:
            raise ValueError(f"--corruptions: unknown {part!r}; choose all, {', '.join(FAMILIES)} or "
                             f"{', '.join(CORRUPTIONS)}")
    return list(dict.fromkeys(names))


def parse_severities(text: str) -> list[int]:
    """'1-5', '3' or '1,3,5'."""
    values: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            values += list(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ValueError(f"--severities: expected e.g. 1-5, 3 or 1,3,5; got {text!r}") from None
    if not values or min(values) < 1 or max(values) > 5:
        raise ValueError(f"--severities: severities run from 1 to 5; got {text!r}")
    return sorted(set(values))


def corrupt_image(image: np.ndarray, name: str, severity: int, seed: int, index: int) -> np.ndarray:
    """One HxWx3 uint8 image corrupted; the same (seed, index) gives the same result anywhere."""
    rng = np.random.default_rng([seed, list(CORRUPTIONS).index(name), severity, index])
    out = CORRUPTIONS[name](image, severity, rng)
    return np.clip(np.asarray(out, dtype=np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)


def _corrupt_chunk(args: tuple[np.ndarray, str, int, int, int]) -> np.ndarray:
    images, name, severity, seed, start = args
    return np.stack([corrupt_image(img, name, severity, seed, start + i) for i, img in enumerate(images)])


def corrupt_split(images: torch.Tensor, name: str, severity: int, seed: int = 0, workers: int = 0) -> torch.Tensor:
    """uint8 (N, 3, H, W) images corrupted, in ``workers`` processes (0: all cores)."""
    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    chunks = [(hwc[i:i + 500], name, severity, seed, i) for i in range(0, len(hwc), 500)]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(chunks) == 1:
        parts = [_corrupt_chunk(c) for c in chunks]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_corrupt_chunk, chunks))
    return torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2).contiguous()


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinycifar" / "corruptions"


def cached_corruption(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``corrupt_split`` once per (images, corruption, severity, seed); later calls read the cache."""
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]
    revision = f"r{REVISIONS[name]}" if name in REVISIONS else ""
    path = cache_folder() / f"v{CACHE_VERSION}-{digest}-{name}{revision}-s{severity}-seed{seed}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if cached.shape == images.shape and cached.dtype == torch.uint8:
                return cached
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt
            pass
    corrupted = corrupt_split(images, name, severity, seed)
    try:
        from ..checkpoint import atomic_write_bytes

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, lambda f: torch.save(corrupted, f))
    except OSError:
        pass  # no cache: the next evaluation corrupts again
    return corrupted
