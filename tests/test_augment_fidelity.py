"""The batched ``seed`` policy against albumentations itself, the library it stands for.

Transform by transform with the same parameters (a flip is exact; shift-scale-rotate agrees to
floating-point rounding on float images; coarse dropout puts the same hole), then statistically:
our draws have the ranges and probabilities of the reference run's pipeline.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

A = pytest.importorskip("albumentations")
cv2 = pytest.importorskip("cv2")

from tinycifar.data.augment import (  # noqa: E402
    BORDER_MODES,
    AugmentConfig,
    affine_warp,
    erase_boxes,
    fill_boxes,
    hflip,
    hole_corners,
    ssr_params,
)
from tinycifar.data.pipeline import CV2_BORDERS, policy_pipeline  # noqa: E402

# The reference run's pipeline (ERA V1 session 9 notebook, albumentations 1.3), in 2.x's spelling:
# HorizontalFlip(), ShiftScaleRotate(shift_limit=0.05, scale_limit=0.05, rotate_limit=15, p=0.5)
# (1.3's default border: reflect-101), CoarseDropout(1 hole of 16x16, fill = the mean), default p=0.5.
REFERENCE = {"flip_p": 0.5, "shift": 0.05, "scale": 0.05, "rotate": 15.0, "ssr_p": 0.5,
             "border": cv2.BORDER_REFLECT_101, "hole": 16, "dropout_p": 0.5}
MEAN = (125.3, 123.0, 113.9)


def smooth_image(seed: int = 0, size: int = 32) -> np.ndarray:
    """A float32 HxWx3 image with detail at every scale up to a few pixels (bicubic-upsampled noise)."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (size // 4, size // 4, 3)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 255)


def chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()


def hwc(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).numpy()


def library_ssr(img: np.ndarray, angle: float, zoom: float, dx: float, dy: float, border: str) -> np.ndarray:
    """albumentations' ShiftScaleRotate with every range collapsed to one value, always applied."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = A.ShiftScaleRotate(shift_limit_x=(dx, dx), shift_limit_y=(dy, dy), scale_limit=(zoom - 1, zoom - 1),
                               rotate_limit=(angle, angle), border_mode=CV2_BORDERS[border], fill=0, p=1.0)
    return t(image=img)["image"]


def ours(img: np.ndarray, angle: float, zoom: float, dx: float, dy: float, border: str) -> np.ndarray:
    t = [torch.tensor([float(v)]) for v in (angle, zoom, dx, dy)]
    return hwc(affine_warp(chw(img), *t, border=border))


def test_flip_is_exact():
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    expected = A.HorizontalFlip(p=1.0)(image=img)["image"]
    out = hflip(chw(img), torch.Generator(), mask=torch.tensor([True]))
    assert np.array_equal(hwc(out).astype(np.uint8), expected)


# (angle degrees, zoom, dx, dy): shifts are whole pixels (n / 32), see the next test for why
CASES = [(0, 1, 0, 0), (15, 1, 0, 0), (-15, 1, 0, 0), (0, 1.05, 0, 0), (0, 0.95, 0, 0), (0, 1, 1 / 32, 0),
         (0, 1, 0, -2 / 32), (12.3, 0.96, 1 / 32, -1 / 32), (-40, 1.1, -2 / 32, 2 / 32), (7.5, 1.03, 0, 1 / 32)]


@pytest.mark.parametrize("border", BORDER_MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "a{}_z{}_dx{:.3f}_dy{:.3f}".format(*c))
def test_shift_scale_rotate_matches_the_library(case, border):
    """Same image within float rounding, borders included. On float32 images OpenCV's warpAffine
    interpolates in floating point like grid_sample, so 0.05 of 255 is far above the rounding we
    see (~2e-4) and far below any geometric slip (a 1/32-pixel offset moves this image's pixels by
    >= 1 level)."""
    img = smooth_image()
    assert np.abs(ours(img, *case, border) - library_ssr(img, *case, border)).max() < 0.05


def test_uint8_images_agree_within_opencv_fixed_point():
    """On uint8 images OpenCV quantizes sample positions to 1/32 pixel and rounds the result:
    a level or two here and there, never a shifted image."""
    img = smooth_image(2).round().astype(np.uint8)
    case = (12.3, 0.96, 1 / 32, -1 / 32)
    diff = np.abs(ours(img.astype(np.float32), *case, "reflect101").round() - library_ssr(img, *case, "reflect101"))
    assert diff.max() <= 3 and diff.mean() < 0.5


def test_library_truncates_fractional_shifts_to_whole_pixels():
    """albumentations 2.x shifts by int(dx * width) pixels; 1.x (the reference run's) and our
    policy shift by dx * width exactly. Shown here, and said in the README."""
    img = smooth_image(3)
    lib = library_ssr(img, 0, 1, 0.05, -0.05, "reflect101")  # 1.6 px
    assert np.abs(ours(img, 0, 1, 1 / 32, -1 / 32, "reflect101") - lib).max() < 0.05
    assert np.abs(ours(img, 0, 1, 0.05, -0.05, "reflect101") - lib).max() > 10


def find_hole(before: np.ndarray, after: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero((before != after).any(-1))
    return rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_coarse_dropout_puts_the_same_hole():
    rng = np.random.default_rng(4)
    for seed in range(20):
        img = rng.integers(1, 255, (32, 32, 3), dtype=np.uint8)
        t = A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16), hole_width_range=(16, 16),
                            fill=(0, 0, 0), p=1.0)
        t.set_random_seed(seed)
        expected = t(image=img)["image"]
        top, left, h, w = find_hole(img, expected)
        assert (h, w) == (16, 16)  # whole, inside the image
        out = fill_boxes(chw(img), torch.tensor([top]), torch.tensor([left]), 16, fill=0.0)
        assert np.array_equal(hwc(out).astype(np.uint8), expected)


def test_hole_positions_have_the_library_range():
    """Corners uniform over 0..16 on both sides, for ours and for the library."""
    t = A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(16, 16), hole_width_range=(16, 16), p=1.0)
    t.set_random_seed(0)
    theirs = np.array([t.get_params_dependent_on_data({"shape": (32, 32, 3)}, {})["holes"][0][:2]
                       for _ in range(4000)])
    top, left = hole_corners(20000, 32, 32, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    for mine, lib in ((top.numpy(), theirs[:, 1]), (left.numpy(), theirs[:, 0])):
        assert set(np.unique(mine)) == set(np.unique(lib)) == set(range(17))
        assert abs(mine.mean() - 8) < 0.1 and abs(lib.mean() - 8) < 0.25


def test_exported_seed_policy_is_the_reference_pipeline():
    flip, ssr, dropout = policy_pipeline(AugmentConfig(policy="seed"), MEAN).transforms
    assert isinstance(flip, A.HorizontalFlip) and flip.p == REFERENCE["flip_p"]
    assert ssr.p == REFERENCE["ssr_p"] and ssr.border_mode == REFERENCE["border"]
    assert ssr.rotate_limit == (-REFERENCE["rotate"], REFERENCE["rotate"])
    assert ssr.shift_limit_x == ssr.shift_limit_y == (-REFERENCE["shift"], REFERENCE["shift"])
    assert ssr.scale_limit == pytest.approx((1 - REFERENCE["scale"], 1 + REFERENCE["scale"]))  # stored as zooms
    assert dropout.p == REFERENCE["dropout_p"] and dropout.num_holes_range == (1, 1)
    assert dropout.hole_height_range == dropout.hole_width_range == (REFERENCE["hole"], REFERENCE["hole"])
    assert tuple(dropout.fill) == MEAN


def test_seed_policy_draws_have_the_reference_ranges_and_probabilities():
    n, g, cpu = 200_000, torch.Generator().manual_seed(0), torch.device("cpu")
    cfg = AugmentConfig(policy="seed")
    apply, angle, zoom, dx, dy = ssr_params(n, g, cpu, cfg.shift, cfg.scale, cfg.rotate, cfg.ssr_p)
    sd = 3 * math.sqrt(0.25 / n)  # three standard deviations of a fraction at p=0.5
    assert abs(apply.float().mean().item() - REFERENCE["ssr_p"]) < sd
    for values, bound, centre in ((angle, REFERENCE["rotate"], 0.0), (dx, REFERENCE["shift"], 0.0),
                                  (dy, REFERENCE["shift"], 0.0), (zoom, REFERENCE["scale"], 1.0)):
        lo, hi = (values - centre).min().item(), (values - centre).max().item()
        assert -bound <= lo < -0.999 * bound and 0.999 * bound < hi <= bound  # uniform fills the range
        assert abs((values - centre).std().item() - bound / math.sqrt(3)) < 0.01 * bound  # uniform's spread
    x = torch.ones(n, 1, 4, 4)
    flipped = hflip(torch.arange(2.0).view(1, 1, 1, 2).expand(n, 1, 1, 2), g, cfg.flip)[:, 0, 0, 0] == 1
    assert abs(flipped.float().mean().item() - REFERENCE["flip_p"]) < sd
    holed = (erase_boxes(x, g, 2, inside=True, p=cfg.dropout_p) == 0).flatten(1).any(1)
    assert abs(holed.float().mean().item() - REFERENCE["dropout_p"]) < sd
