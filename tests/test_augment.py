"""Batched augmentation: each transform does what it says, on whole batches, reproducibly."""

from __future__ import annotations

import pytest
import torch

from tinycifar.data.augment import (
    POLICIES,
    AugmentConfig,
    augment,
    erase_boxes,
    hflip,
    shift_scale_rotate,
    translate,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n: int = 64, seed: int = 123, dtype=torch.float32) -> torch.Tensor:
    """A normalized-looking batch with no exact zeros or repeated values to confuse hole detection."""
    return torch.randn(n, 3, 32, 32, generator=gen(seed), dtype=dtype)


def ramps(n: int) -> torch.Tensor:
    """Channel 0 = column index, channel 1 = row index, channel 2 = constant: bilinear sampling is exact on it."""
    cols = torch.arange(32.0).expand(32, 32)
    x = torch.stack([cols, cols.t(), torch.full((32, 32), 7.0)])
    return x.expand(n, 3, 32, 32).contiguous()


def holes(out: torch.Tensor, fill: float) -> torch.Tensor:
    """(N, H, W) mask of pixels equal to ``fill`` in every channel."""
    return (out == fill).all(1)


def box_of(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """Bounding box (top, left, height, width) of a non-empty (H, W) mask."""
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


# ---------------------------------------------------------------------------- hflip


def test_hflip_p1_flips_every_image():
    x = batch()
    assert torch.equal(hflip(x, gen(), p=1.0), x.flip(3))


def test_hflip_p0_is_identity():
    x = batch()
    assert torch.equal(hflip(x, gen(), p=0.0), x)


def test_hflip_half_flips_about_half_and_nothing_else():
    x = batch(400)
    out = hflip(x, gen(), p=0.5)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert (same | flipped).all()  # each image is either untouched or exactly mirrored
    assert 0.35 < flipped.float().mean() < 0.65


# ---------------------------------------------------------------------------- shift, scale, rotate


def test_ssr_p0_is_identity():
    x = batch()
    assert torch.equal(shift_scale_rotate(x, gen(), p=0.0), x)


@pytest.mark.parametrize("border", ["reflection", "border", "zeros"])
def test_ssr_with_nothing_to_do_is_identity(border):
    x = batch()
    out = shift_scale_rotate(x, gen(), shift=0.0, scale=0.0, rotate=0.0, border=border, p=1.0)
    assert torch.allclose(out, x, atol=1e-5)


def test_ssr_pure_shift_moves_content_by_at_most_shift_times_size():
    n, shift = 256, 0.1
    x = ramps(n)
    out = shift_scale_rotate(x, gen(), shift=shift, scale=0.0, rotate=0.0, p=1.0)
    m = 5  # interior: farther from the border than the largest shift (3.2 px), so no reflection
    inner = (slice(None), slice(m, 32 - m), slice(m, 32 - m))
    dx = (x[:, 0] - out[:, 0])[inner]  # content moved right by dx: out(j) = in(j - dx)
    dy = (x[:, 1] - out[:, 1])[inner]
    # a pure translation: one offset per image, the same at every interior pixel
    assert torch.allclose(dx, dx[:, :1, :1].expand_as(dx), atol=1e-3)
    assert torch.allclose(dy, dy[:, :1, :1].expand_as(dy), atol=1e-3)
    dx, dy = dx[:, 0, 0], dy[:, 0, 0]
    limit = shift * 32
    assert dx.abs().max() <= limit + 1e-3 and dy.abs().max() <= limit + 1e-3
    # ...and the offsets fill the range both ways (a factor-2 slip in the scaling would show)
    assert dx.max() > 0.8 * limit and dx.min() < -0.8 * limit
    assert dy.max() > 0.8 * limit and dy.min() < -0.8 * limit
    assert not torch.allclose(dx, dy)  # independent per axis
    assert torch.allclose(out[:, 2], x[:, 2], atol=1e-5)  # reflection keeps a constant channel constant


def _fit_affine(out: torch.Tensor, half: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares map (row, col) -> (out row-ramp, out col-ramp) over the central square, per image."""
    c = 15.5
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    keep = ((rows - c).abs() <= half) & ((cols - c).abs() <= half)
    design = torch.stack([rows[keep] - c, cols[keep] - c, torch.ones(int(keep.sum()))], 1).double()
    target = torch.stack([out[:, 1][:, keep], out[:, 0][:, keep]], 2).double() - c  # (N, P, 2)
    sol = torch.linalg.lstsq(design.expand(len(out), -1, -1), target).solution  # (N, 3, 2)
    resid = design @ sol - target
    return sol, resid


def test_ssr_rotation_and_scale_stay_within_limits():
    n, scale, rotate = 200, 0.1, 15.0
    out = shift_scale_rotate(ramps(n), gen(3), shift=0.0, scale=scale, rotate=rotate, p=1.0)
    sol, resid = _fit_affine(out)
    assert resid.abs().max() < 1e-3  # an affine map of the image, exactly
    a = sol[:, :2, :].transpose(1, 2)  # d(input coords)/d(output coords)
    zoom = 1 / torch.sqrt(torch.linalg.det(a))
    angle = torch.rad2deg(torch.atan2(a[:, 1, 0], a[:, 0, 0])).abs()
    assert torch.allclose(a[:, 0, 0], a[:, 1, 1], atol=1e-4)  # rotation + uniform zoom, no shear
    assert torch.allclose(a[:, 0, 1], -a[:, 1, 0], atol=1e-4)
    assert zoom.min() >= 1 - scale - 1e-4 and zoom.max() <= 1 + scale + 1e-4
    assert angle.max() <= rotate + 1e-3
    assert angle.max() > 0.8 * rotate and zoom.max() - zoom.min() > scale  # the ranges are used
    assert sol[:, 2, :].abs().max() < 1e-3  # about the centre: no shift when shift=0


def test_ssr_half_applies_to_about_half():
    x = batch(400)
    out = shift_scale_rotate(x, gen(), p=0.5)
    untouched = (out == x).flatten(1).all(1)
    assert 0.35 < untouched.float().mean() < 0.65


def test_ssr_bad_border_mode():
    with pytest.raises(ValueError, match=r"border mode 'wrap'"):
        shift_scale_rotate(batch(2), gen(), border="wrap")


# ---------------------------------------------------------------------------- erase boxes


@pytest.mark.parametrize("size", [16, 8, 1, 32])
def test_erase_inside_makes_one_whole_hole(size):
    x = batch(300)
    fill = 5.5
    out = erase_boxes(x, gen(), size, fill=fill, inside=True, p=1.0)
    mask = holes(out, fill)
    assert mask.flatten(1).sum(1).eq(size * size).all()  # exactly size x size pixels per image
    for i in range(len(x)):
        top, left, h, w = box_of(mask[i])
        assert (h, w) == (size, size)  # one solid box, not scattered pixels
        assert 0 <= top <= 32 - size and 0 <= left <= 32 - size
    assert torch.equal(out[~mask.unsqueeze(1).expand_as(out)], x[~mask.unsqueeze(1).expand_as(x)])
    tops = torch.stack([mask[i].any(1).nonzero()[0, 0] for i in range(len(x))])
    if size < 32:
        assert tops.unique().numel() > 1  # positions vary


def test_erase_cutout_holes_are_clipped_at_the_border():
    size, fill = 16, -3.25
    x = batch(400)
    out = erase_boxes(x, gen(), size, fill=fill, inside=False, p=1.0)
    mask = holes(out, fill)
    clipped = 0
    for i in range(len(x)):
        assert mask[i].any()  # the centre is always inside the image, so the hole is never empty
        top, left, h, w = box_of(mask[i])
        assert h <= size and w <= size
        assert int(mask[i].sum()) == h * w  # a solid rectangle
        # a hole smaller than size x size must touch the border on the clipped side
        if h < size:
            assert top == 0 or top + h == 32
        if w < size:
            assert left == 0 or left + w == 32
        clipped += (h < size) or (w < size)
    assert clipped > 100  # with centres anywhere, most 16x16 holes on 32x32 images are clipped


def test_erase_probability():
    x = batch(400)
    out = erase_boxes(x, gen(), 8, fill=9.0, p=0.5)
    erased = holes(out, 9.0).flatten(1).any(1)
    assert 0.35 < erased.float().mean() < 0.65
    assert torch.equal(out[~erased], x[~erased])


def test_erase_does_not_modify_its_input():
    x = batch(8)
    before = x.clone()
    erase_boxes(x, gen(), 16, p=1.0)
    assert torch.equal(x, before)


# ---------------------------------------------------------------------------- translate


@pytest.mark.parametrize("pad", [1, 2, 4])
def test_translate_is_a_shift_within_pad(pad):
    x = batch(200)
    out = translate(x, gen(), pad)
    assert out.shape == x.shape and out.dtype == x.dtype
    inner = slice(pad, 32 - pad)
    seen = set()
    for i in range(len(x)):
        # which shift (dy, dx) reproduces the interior exactly? there must be exactly one
        matches = [
            (dy, dx)
            for dy in range(-pad, pad + 1)
            for dx in range(-pad, pad + 1)
            if torch.equal(out[i, :, inner, inner], x[i, :, pad + dy : 32 - pad + dy, pad + dx : 32 - pad + dx])
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    # the whole range is used, both ways, on both axes
    assert {dy for dy, _ in seen} == set(range(-pad, pad + 1)) == {dx for _, dx in seen}


def test_translate_pad0_is_identity():
    x = batch(10)
    assert torch.equal(translate(x, gen(), 0), x)


def test_translate_borders_are_reflected():
    out = translate(ramps(100), gen(), 2)
    # reflect padding never invents values: every column value stays a column index in range
    assert out[:, 0].min() >= 0 and out[:, 0].max() <= 31
    assert torch.equal(out[:, 2], torch.full_like(out[:, 2], 7.0))


# ---------------------------------------------------------------------------- seeds


TRANSFORMS = {
    "hflip": lambda x, g: hflip(x, g),
    "ssr": lambda x, g: shift_scale_rotate(x, g),
    "erase": lambda x, g: erase_boxes(x, g, 16, p=0.5),
    "cutout": lambda x, g: erase_boxes(x, g, 8, inside=False),
    "translate": lambda x, g: translate(x, g, 2),
    "seed": lambda x, g: augment(x, AugmentConfig(policy="seed"), g),
    "fast": lambda x, g: augment(x, AugmentConfig(policy="fast", cutout_size=8), g),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_same_seed_same_batch_other_seed_other_batch(name):
    f = TRANSFORMS[name]
    x = batch(64)
    a, b, c = f(x, gen(1)), f(x, gen(1)), f(x, gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


# ---------------------------------------------------------------------------- policies


def test_policy_none_is_identity():
    x = batch()
    assert augment(x, AugmentConfig(policy="none"), gen()) is x


def test_unknown_policy():
    with pytest.raises(ValueError, match=r"unknown augmentation policy 'albumentations'"):
        augment(batch(2), AugmentConfig(policy="albumentations"), gen())


def test_policies_listed():
    assert set(POLICIES) == {"seed", "fast", "none"}
    for policy in POLICIES:
        augment(batch(4), AugmentConfig(policy=policy), gen())


def test_seed_policy_knobs_are_used():
    x = batch(100)
    # only coarse dropout: exactly one whole 12x12 zero hole per image, nothing else touched
    cfg = AugmentConfig(policy="seed", flip=0.0, ssr_p=0.0, dropout_size=12, dropout_p=1.0)
    out = augment(x, cfg, gen())
    mask = holes(out, 0.0)
    assert mask.flatten(1).sum(1).eq(144).all()
    assert torch.equal(out[~mask.unsqueeze(1).expand_as(out)], x[~mask.unsqueeze(1).expand_as(x)])
    # only flips
    cfg = AugmentConfig(policy="seed", flip=1.0, ssr_p=0.0, dropout_p=0.0)
    assert torch.equal(augment(x, cfg, gen()), x.flip(3))
    # only shift-scale-rotate, every image
    cfg = AugmentConfig(policy="seed", flip=0.0, ssr_p=1.0, dropout_p=0.0)
    changed = (augment(x, cfg, gen()) != x).flatten(1).any(1)
    assert changed.all()


def test_fast_policy_knobs_are_used():
    x = batch(100)
    cfg = AugmentConfig(policy="fast", flip=1.0, translate_pad=0, cutout_size=0)
    assert torch.equal(augment(x, cfg, gen()), x.flip(3))
    cfg = AugmentConfig(policy="fast", flip=0.0, translate_pad=0, cutout_size=8, cutout_p=1.0)
    mask = holes(augment(x, cfg, gen()), 0.0)
    sizes = mask.flatten(1).sum(1)
    assert (sizes > 0).all() and (sizes <= 64).all() and (sizes < 64).any()  # cutout: clipped at times
    cfg = AugmentConfig(policy="fast", flip=0.0, translate_pad=3, cutout_size=0)
    r = ramps(100)
    shift = (augment(r, cfg, gen()) - r)[:, :2, 3:29, 3:29]  # interior: whole-pixel offsets, one per image
    assert torch.equal(shift, shift[:, :, :1, :1].expand_as(shift))
    assert shift.abs().max() == 3 and shift.min() == -3


def test_default_fast_config_has_no_cutout():
    x = batch(200)
    out = augment(x, AugmentConfig(policy="fast"), gen())
    assert not holes(out, 0.0).any()


# ---------------------------------------------------------------------------- whole batches


@pytest.mark.parametrize("policy", ["seed", "fast"])
def test_large_batch_keeps_dtype_device_shape(policy):
    x = batch(4096, seed=7)
    before = x.clone()
    out = augment(x, AugmentConfig(policy=policy, cutout_size=8), gen())
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.isfinite(out).all()
    assert torch.equal(x, before)  # the input batch is not modified in place
    changed = (out != x).flatten(1).any(1).float().mean()
    assert changed > 0.5


@pytest.mark.parametrize("policy", ["seed", "fast"])
def test_float64_batches_stay_float64(policy):
    x = batch(32, dtype=torch.float64)
    out = augment(x, AugmentConfig(policy=policy, cutout_size=8), gen())
    assert out.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["seed", "fast"])
def test_cuda_batches_stay_on_cuda(policy):
    x = batch(512).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = augment(x, AugmentConfig(policy=policy, cutout_size=8), g)
    assert out.device == x.device and out.dtype == x.dtype


def test_images_in_a_batch_get_their_own_draws():
    x = ramps(64)  # 64 identical images
    out = shift_scale_rotate(x, gen(), p=1.0)
    assert torch.unique(out.flatten(1), dim=0).shape[0] == 64
