"""Batch mixing (mixup, CutMix): the targets are the same blend as the images, and a run trains with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_run import train_tiny_run

from tinycifar.config import ConfigError, resolve_config
from tinycifar.data import synthetic_cifar10
from tinycifar.data.augment import AugmentConfig
from tinycifar.data.loader import DeviceLoader, channel_stats
from tinycifar.data.mixing import cutmix_box, mix_batch
from tinycifar.reports.report import read_history

pytestmark = pytest.mark.usefixtures("one_thread")


def constant_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i and has label i % 10: a pixel says whose it is."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    return x, torch.arange(n) % 10


def mixed(mode: str, seed: int = 0, n: int = 10, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, labels = constant_images(n)
    out, targets = mix_batch(x, labels, 10, mode, kw.get("alpha", 1.0), kw.get("p", 1.0),
                             torch.Generator().manual_seed(seed), np.random.default_rng(seed))
    return x, out, targets


def test_mixup_targets_are_the_images_blend():
    # image i is filled with i and labelled i: a blended image's value is its target's mean class
    for seed in range(3):
        _, out, targets = mixed("mixup", seed=seed)
        assert torch.allclose(targets.sum(1), torch.ones(10))
        assert (targets > 0).sum(1).max() == 2  # two images blended
        assert torch.allclose(out[:, 0, 0, 0], targets @ torch.arange(10.0), atol=1e-5)
        assert torch.allclose(out.amax((1, 2, 3)), out.amin((1, 2, 3)))  # the same weight everywhere


def test_cutmix_pastes_one_box_and_weighs_the_targets_by_its_area():
    for seed in range(5):
        x, out, targets = mixed("cutmix", seed=seed)
        assert torch.allclose(out.mean((1, 2, 3)), targets @ torch.arange(10.0), atol=1e-5)
        changed = (out != x).any(0).any(0)  # pixels changed in some image: one rectangle
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        assert len(rows) > 0
        assert changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_cutmix_box_has_about_the_asked_area_and_stays_inside():
    rng = np.random.default_rng(0)
    for lam in (0.2, 0.5, 0.9):
        top, bottom, left, right = cutmix_box(32, 32, lam, rng)
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        assert (bottom - top) * (right - left) <= round((1 - lam) * 32 * 32) + 2 * 32


def test_p_zero_leaves_the_batch_alone_with_one_hot_targets():
    x, out, targets = mixed("cutmix", p=0.0)
    assert torch.equal(out, x)
    assert torch.equal(targets.argmax(1), torch.arange(10) % 10) and torch.equal(targets.sum(1), torch.ones(10))


def test_loader_mixes_reproducibly_per_epoch_and_only_when_training():
    train, _ = synthetic_cifar10(64)
    mean, std = channel_stats(train.images)
    aug = AugmentConfig(policy="none", mix="mixup")
    loader = DeviceLoader(train, 16, mean, std, aug=aug, seed=1)
    x, y = next(iter(loader))
    assert y.shape == (16, 10) and torch.allclose(y.sum(1), torch.ones(16))
    again, y_again = next(iter(loader))
    assert torch.equal(x, again) and torch.equal(y, y_again)
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], x)
    evaluation = DeviceLoader(train, 16, mean, std, train=False, aug=aug)
    assert next(iter(evaluation))[1].ndim == 1


def test_config_refuses_bad_mixing_values():
    with pytest.raises(ConfigError, match="aug.mix: expected one of off, mixup, cutmix"):
        resolve_config("fast", overrides={"aug": {"mix": "both"}})
    with pytest.raises(ConfigError, match="aug.mix_alpha: expected a positive number"):
        resolve_config("fast", overrides={"aug": {"mix": "mixup", "mix_alpha": 0}})
    with pytest.raises(ConfigError, match="aug.mix: expected off with augmix=jsd"):
        resolve_config("fast", overrides={"aug": {"mix": "cutmix", "augmix": "jsd"}})
    with pytest.raises(ConfigError, match="aug.mix: expected off with --aug-pipeline"):
        resolve_config("fast", overrides={"aug": {"mix": "cutmix"}, "aug_pipeline": "p.json"})


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_a_run_trains_with_batch_mixing(tmp_path, mode):
    run = train_tiny_run(tmp_path / "run", aug={"policy": "fast", "mix": mode})
    (epoch,) = read_history(run, {})
    assert epoch["train_loss"] > 0 and 0 <= epoch["train_acc"] <= 100
