"""AugMix on the device: its operations match PIL's, its views are reproducible mixtures, and a
run trains with it (the loss in test_losses.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from host_reads import HostReads
from PIL import Image, ImageOps
from tiny_run import train_tiny_run

from tinycifar.config import ConfigError, resolve_config
from tinycifar.data import augmix as augmix_module
from tinycifar.data import synthetic_cifar10
from tinycifar.data.augment import AugmentConfig
from tinycifar.data.augmix import (
    OPS,
    augmix,
    augmix_views,
    autocontrast,
    chain_step,
    equalize,
    geometric_thetas,
    posterize,
    solarize,
)
from tinycifar.data.loader import DeviceLoader, channel_stats
from tinycifar.reports.report import read_history

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN = torch.tensor([125.0, 123.0, 114.0]).view(1, 3, 1, 1)
STD = torch.tensor([63.0, 62.0, 66.0]).view(1, 3, 1, 1)


def images(n: int = 6, seed: int = 0) -> np.ndarray:
    """uint8 HWC images with the cases PIL treats specially: full range, a narrow range, a constant
    channel, a peaked histogram."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, (max(n, 4), 32, 32, 3), dtype=np.uint8)
    out[1] = out[1] // 4 + 50
    out[2, :, :, 0] = 7
    out[3] = np.clip(rng.normal(100, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
    return out[:n]


def as_batch(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(hwc).permute(0, 3, 1, 2).float()


def through_pil(hwc: np.ndarray, op) -> torch.Tensor:
    return as_batch(np.stack([np.asarray(op(Image.fromarray(img))) for img in hwc]))


def normalized(n: int = 16, seed: int = 0) -> torch.Tensor:
    return (as_batch(images(n, seed)) - MEAN) / STD


def test_equalize_posterize_and_solarize_are_pils_exactly():
    hwc = images()
    p = as_batch(hwc)
    n = len(p)
    assert torch.equal(equalize(p), through_pil(hwc, ImageOps.equalize))
    assert torch.equal(posterize(p, torch.full((n,), 3)), through_pil(hwc, lambda i: ImageOps.posterize(i, 3)))
    assert torch.equal(solarize(p, torch.full((n,), 200)), through_pil(hwc, lambda i: ImageOps.solarize(i, 200)))


def test_autocontrast_matches_pil_but_keeps_fractions():
    hwc = images()
    ours, pil = autocontrast(as_batch(hwc)), through_pil(hwc, ImageOps.autocontrast)
    assert (ours - pil).abs().max() <= 1.001  # PIL truncates to integers
    assert torch.equal(ours[2, 0], as_batch(hwc)[2, 0])  # a constant channel is left alone
    assert ours.amin((2, 3))[0].eq(0).all() and ours.amax((2, 3))[0].eq(255).all()


@pytest.mark.parametrize("name, pil_data", [("translate_x", (1, 0, 3, 0, 1, 0)), ("translate_y", (1, 0, 0, 0, 1, 3))])
def test_translation_is_pils_affine_transform(name, pil_data):
    hwc = images(3)
    op = torch.full((3,), OPS.index(name))
    theta = geometric_thetas(op, torch.full((3,), 3.0), 32, 32)
    p = as_batch(hwc)
    ours = F.grid_sample(p, F.affine_grid(theta, list(p.shape), align_corners=False), align_corners=False)
    pil = through_pil(hwc, lambda i: i.transform((32, 32), Image.AFFINE, pil_data, resample=Image.BILINEAR))
    assert torch.allclose(ours, pil, atol=1e-3)


@pytest.mark.parametrize("name, magnitude, pil_op", [
    ("rotate", 9.0, lambda i: i.rotate(9, resample=Image.BILINEAR)),
    ("shear_x", 0.09, lambda i: i.transform((32, 32), Image.AFFINE, (1, 0.09, 0, 0, 1, 0), resample=Image.BILINEAR)),
    ("shear_y", 0.09, lambda i: i.transform((32, 32), Image.AFFINE, (1, 0, 0, 0.09, 1, 0), resample=Image.BILINEAR)),
])
def test_rotation_and_shear_go_the_way_pils_do(name, magnitude, pil_op):
    """Bilinear resampling differs in detail at the borders; the direction and size must agree."""
    hwc = images(3)
    p = as_batch(hwc)

    def ours(m: float) -> torch.Tensor:
        theta = geometric_thetas(torch.full((3,), OPS.index(name)), torch.full((3,), m), 32, 32)
        return F.grid_sample(p, F.affine_grid(theta, list(p.shape), align_corners=False), align_corners=False)

    pil = through_pil(hwc, pil_op)
    error = (ours(magnitude) - pil).abs().mean()
    assert error < 3  # of 0..255, where the untransformed image is ~50 away
    assert error < (ours(-magnitude) - pil).abs().mean() / 5 and error < (p - pil).abs().mean() / 5


def test_augmix_is_reproducible_for_a_generator_and_changes_images():
    x = normalized()
    a = augmix(x, MEAN, STD, torch.Generator().manual_seed(3))
    b = augmix(x, MEAN, STD, torch.Generator().manual_seed(3))
    c = augmix(x, MEAN, STD, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a - x).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.9
    pixels = a * STD + MEAN
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3  # a convex mix of images in range


def test_views_are_independent_and_keep_the_batch_order():
    """View-major: row k * n + i comes from image i. On smooth images (structure that the operations
    keep) each view correlates best with its own image."""
    g = torch.Generator().manual_seed(0)
    p = F.interpolate(torch.rand(8, 3, 4, 4, generator=g) * 255, size=32, mode="bilinear", align_corners=False)
    x = (p - MEAN) / STD
    two = augmix(x, MEAN, STD, g, views=2)
    assert two.shape == (16, *x.shape[1:])
    assert not torch.allclose(two[:8], two[8:])

    def standardized(t: torch.Tensor) -> torch.Tensor:
        t = t.flatten(1)
        return (t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True)

    for view in (two[:8], two[8:]):
        correlation = standardized(view) @ standardized(x).T
        assert torch.equal(correlation.argmax(1), torch.arange(8))


def test_a_chain_step_applies_each_images_own_operation():
    p = as_batch(images(4))
    op = torch.tensor([-1, OPS.index("equalize"), OPS.index("solarize"), OPS.index("translate_x")])
    level = torch.tensor([2.0, 2.0, 2.0, 2.0])
    out = chain_step(p.clone(), op, level, torch.Generator().manual_seed(0))  # in place
    assert torch.equal(out[0], p[0])  # -1: a chain that already ended
    assert torch.equal(out[1], equalize(p[1:2])[0])
    assert torch.equal(out[2], solarize(p[2:3], torch.tensor([256 - 51]))[0])  # 256 - int(25.6 * 2)
    shifted = (out[3, :, :, 4:-4] - p[3, :, :, 6:-2]).abs().max(), (out[3, :, :, 4:-4] - p[3, :, :, 2:-6]).abs().max()
    assert min(shifted) < 1e-3  # moved by int(2 * 32 / 30) = 2 pixels, one way or the other


def test_the_gpu_way_of_picking_images_is_the_cpu_ways_result_without_host_reads(monkeypatch):
    """On a GPU every operation runs on the whole batch (no per-step read of who drew what); run that
    way on the CPU, it gives the indexed way's views bit for bit and reads nothing back."""
    x = normalized()
    indexed = augmix_views(x, "jsd", MEAN, STD, torch.Generator().manual_seed(5))
    monkeypatch.setattr(augmix_module, "PICK_BY_INDEX_ON", ())
    with HostReads() as reads:
        whole_batch = augmix_views(x, "jsd", MEAN, STD, torch.Generator().manual_seed(5))
    assert torch.equal(whole_batch, indexed)
    assert reads.seen == []


@pytest.mark.parametrize("mode, factor", [("off", 1), ("mix", 1), ("jsd", 3)])
def test_modes_make_the_batch_the_loss_expects(mode, factor):
    x = normalized(8)
    out = augmix_views(x, mode, MEAN, STD, torch.Generator().manual_seed(0))
    assert len(out) == factor * len(x)
    if mode == "off":
        assert out is x
    if mode == "jsd":
        assert torch.equal(out[:8], x)  # the clean images come first


def test_loader_yields_three_views_per_label_with_jsd():
    train, _ = synthetic_cifar10(64)
    mean, std = channel_stats(train.images)
    loader = DeviceLoader(train, 16, mean, std, aug=AugmentConfig(policy="fast", augmix="jsd"), seed=1)
    x, y = next(iter(loader))
    assert x.shape[0] == 3 * len(y) == 48
    again, _ = next(iter(loader))
    assert torch.equal(x, again)  # seeded by (seed, epoch)


def test_config_refuses_bad_augmix_values():
    with pytest.raises(ConfigError, match="aug.augmix: expected one of off, mix, jsd"):
        resolve_config("fast", overrides={"aug": {"augmix": "yes"}})
    with pytest.raises(ConfigError, match="aug.augmix_severity"):
        resolve_config("fast", overrides={"aug": {"augmix_severity": 0}})
    with pytest.raises(ConfigError, match="--augmix: expected off with --aug-pipeline"):
        resolve_config("fast", overrides={"aug": {"augmix": "mix"}, "aug_pipeline": "p.json"})


@pytest.mark.parametrize("mode", ["mix", "jsd"])
def test_a_run_trains_with_augmix(tmp_path, mode):
    run = train_tiny_run(tmp_path / "run", aug={"policy": "fast", "augmix": mode})
    (epoch,) = read_history(run, {})  # one epoch, one row
    assert 0 <= epoch["train_acc"] <= 100  # counted over the labelled images, not the views
