"""The learning-rate range test: its curve, its suggestion, what it leaves behind, and `train --lr auto`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from cli_helpers import one_line, run_main
from torch import nn

from tinycifar.config import apply_precision_recipe, resolve_config
from tinycifar.data import synthetic_cifar10
from tinycifar.data.loader import DeviceLoader, channel_stats
from tinycifar.models import create_model
from tinycifar.training import train as train_module
from tinycifar.training.lr_find import lr_find, range_test, suggest
from tinycifar.training.sgd import SGD
from tinycifar.training.train import resolve_precision

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"dataset": "synthetic", "synthetic_size": 400, "batch_size": 50, "threads": 1, "quiet": True,
         "precision": "fp32"}


@pytest.fixture(scope="module")
def result():
    cfg = resolve_config("fast", overrides={**SMALL, "model": "fastnet"})
    return lr_find(cfg, start_lr=1e-4, end_lr=100.0, steps=80)


def test_the_lr_grows_exponentially_over_the_range(result):
    ratios = np.diff(np.log(result.lrs))
    assert result.lrs[0] == pytest.approx(1e-4) and np.allclose(ratios, np.log(1e6) / 79)


def test_the_curve_falls_then_diverges_and_the_suggestion_lies_on_the_fall(result):
    smoothed = np.asarray(result.smoothed)
    lowest = int(smoothed.argmin())
    assert 0 < lowest < len(smoothed) - 1
    assert smoothed[lowest] < 0.9 * smoothed[0]  # it learned something on the way down
    assert result.diverged and smoothed[-1] > 4 * smoothed[lowest] and len(result.lrs) < 80
    assert result.start_lr <= result.suggestion <= result.lrs[lowest]


def test_suggest_picks_the_steepest_fall():
    lrs = list(np.logspace(-4, 0, 41))
    loss = [2.0 - 1.5 / (1 + np.exp(-(np.log10(lr) + 2) * 4)) for lr in lrs[:35]] + [3.0] * 6  # steepest at 1e-2
    assert suggest(lrs, loss) == pytest.approx(1e-2, rel=0.3)
    assert suggest([1e-3, 1e-2, 1e-1], [1.0, 2.0, 3.0]) == 1e-3  # only rising: the lowest point


def test_range_test_gives_back_the_model_and_optimizer_as_they_were():
    train, _ = synthetic_cifar10(200, 50, seed=0)
    mean, std = channel_stats(train.images)
    torch.manual_seed(0)
    model = create_model("era9")
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # some momentum state to keep
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    loader = DeviceLoader(train, 50, mean, std, train=True, drop_last=True)
    range_test(model, optimizer, loader, nn.CrossEntropyLoss(), "fp32", 1e-3, 1.0, 12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(m, optimizer.state[p]["momentum_buffer"]) for m, p in zip(momentum, model.parameters(),
                                                                                     strict=True))


def test_a_network_handed_over_is_not_touched():
    cfg = resolve_config("fast", overrides={**SMALL, "model": "fastnet"})
    torch.manual_seed(1)
    model = create_model("fastnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr_find(cfg, model=model, steps=12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # the whitening stem froze only the copy
    assert model.features[0][0][0].weight.is_contiguous()  # and channels_last too


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--start-lr", "0"], "--start-lr 0.0: expected a positive number"),
    (["--start-lr", "1", "--end-lr", "0.5"], "--end-lr 0.5: expected a number above --start-lr (1)"),
    (["--steps", "5"], "--steps 5: expected at least 10"),
    (["--lr", "auto"], "lr-find is what finds it"),
])
def test_bad_ranges_are_one_line(capsys, extra, fragment):
    rc, _, err = run_main(capsys, ["lr-find", "--dataset", "synthetic", *extra])
    one_line(rc, err, fragment)


def recipe_lr() -> float:
    """The fast preset's peak lr on this machine: its fp32 table has its own (CPUs without bf16)."""
    cfg = resolve_config("fast")
    apply_precision_recipe(cfg, resolve_precision("auto", torch.device("cpu")))
    return cfg.lr


def test_cli_writes_the_plot_and_the_csv(tmp_path, capsys):
    rc, out, _ = run_main(capsys, ["lr-find", "--dataset", "synthetic", "--set", "synthetic_size=400",
                                   "--batch-size", "50", "--threads", "1", "--steps", "30", "--out", tmp_path])
    assert rc == 0 and "suggested peak lr:" in out and f"the fast preset uses {recipe_lr():g}" in out
    with open(tmp_path / "lr_find.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 10 and list(rows[0]) == ["step", "lr", "loss", "smoothed_loss"]
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000


@pytest.mark.parametrize("bf16_cpu", [True, False], ids=["bf16-cpu", "fp32-cpu"])
def test_train_lr_auto_uses_and_records_the_suggestion(tmp_path, capsys, monkeypatch, bf16_cpu):
    """On a CPU without bf16 the preset's fp32 table has an lr of its own: the suggestion must still win."""
    monkeypatch.setattr(train_module, "cpu_supports_bf16", lambda: bf16_cpu)
    rc, out, _ = run_main(capsys, ["train", "--lr", "auto", "--dataset", "synthetic", "--set", "synthetic_size=400",
                                   "--batch-size", "50", "--epochs", "1", "--threads", "1", "--out", tmp_path / "run"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    found = config["lr_range_test"]
    assert rc == 0 and "learning-rate range test: peak lr" in out
    assert config["lr"] == found["suggestion"] and found["preset_lr"] == recipe_lr()
    assert found["rule"].startswith("steepest")
    assert 1e-5 <= found["suggestion"] <= 10
    rc, _, err = run_main(capsys, ["train", "--resume", "--out", tmp_path / "run", "--lr", "auto"])
    one_line(rc, err, "a resumed run keeps the learning rate")


class Exploding(nn.CrossEntropyLoss):
    """A finite loss whose gradients overflow fp16 at every scale: what a blowing-up fp16 run looks like
    while its loss still reads as a number."""

    def forward(self, logits, target):
        return super().forward(logits, target) * 1e30


def test_fp16_steps_the_scaler_skips_are_counted_and_end_the_test_as_diverged():
    train, _ = synthetic_cifar10(100, 20, seed=0)
    mean, std = channel_stats(train.images)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    loader = DeviceLoader(train, 25, mean, std, train=True, drop_last=True)
    result = range_test(model, SGD(model.parameters(), lr=0.1), loader, Exploding(), "fp16", 1e-3, 1.0, 40)
    assert all(np.isfinite(result.losses))
    # the scale starts at 2**16 and halves at each skipped step: below 1 after 17 of them
    assert result.diverged and result.skipped_steps == len(result.lrs) == 17
    assert result.summary()["skipped_steps"] == 17


def test_lr_find_under_torchrun_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, _, err = run_main(capsys, ["lr-find", "--dataset", "synthetic", "--out", tmp_path / "lr"])
    one_line(rc, err, "lr-find: not under torchrun (2 processes)")
    assert not (tmp_path / "lr").exists()
