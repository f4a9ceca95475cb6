"""How the GPU path uses the device, on a real CUDA device: no host syncs inside training steps, the
whitening sample's bounded memory at 128 px, and the API on a network left on the GPU.

Marked ``cuda`` and skipped, with the reason, where torch sees no CUDA device (this project's machines
and CI have none); ``benchmarks/gpu_check.sh`` runs the ``cuda`` tests on a lent GPU. The CPU proofs of
the same code are beside the modules (test_train.py's host-read count, test_layers.py, test_api.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import tinycifar
from tinycifar.config import resolve_config
from tinycifar.models import build_model
from tinycifar.models.layers import init_whitening
from tinycifar.training import train as train_mod

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "needs a CUDA device; benchmarks/gpu_check.sh runs these on a lent GPU"))]


def syncs_of_one_epoch(tmp_path: Path, monkeypatch, images: int, aug: dict) -> int:
    """The synchronizing CUDA calls of one training epoch, as torch's sync debug mode warns of them."""
    real, counts = train_mod.train_one_epoch, []

    def counted(run, epoch: int):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                stats = real(run, epoch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
        return stats

    monkeypatch.setattr(train_mod, "train_one_epoch", counted)
    cfg = resolve_config("fast", overrides={
        "dataset": "synthetic", "synthetic_size": images, "epochs": 1, "batch_size": 10, "device": "cuda",
        "precision": "bf16", "ema_decay": 0.9, "grad_clip": 1.0, "quiet": False, "aug": aug,
        "out": str(tmp_path / f"{images}")})
    train_mod.train(cfg)
    return counts[0]


@pytest.mark.parametrize("aug", [{"policy": "fast", "augmix": "mix"}, {"policy": "seed", "mix": "cutmix"}],
                         ids=["augmix", "cutmix"])
def test_training_steps_do_not_synchronize(tmp_path, monkeypatch, aug):
    """12 steps and 24 make the same synchronizing calls: those of the epoch's start and end only."""
    assert syncs_of_one_epoch(tmp_path, monkeypatch, 120, aug) == syncs_of_one_epoch(tmp_path, monkeypatch, 240, aug)


def test_whitening_a_128px_sample_takes_a_bounded_share_of_gpu_memory():
    """5000 images at 128 px: 8.6 GB of patches at once before; now one chunk of 2**20 patches at a time."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(5000, 3, 128, 128, generator=g)  # stays on the CPU
    conv = nn.Conv2d(3, 24, 3, bias=False).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    init_whitening(conv, sample)
    assert torch.cuda.max_memory_allocated() - before < 1 << 30
    assert torch.isfinite(conv.weight).all()


def test_the_api_works_on_the_moving_average_a_gpu_fit_leaves_on_the_gpu(tmp_path):
    net, _ = build_model("era9", {})
    run = tinycifar.fit(net, preset="fast", dataset="synthetic", synthetic_size=640, epochs=1, batch_size=64,
                        device="cuda", quiet=True, out=str(tmp_path / "api"))
    assert net.features[0][0].weight.device.type == "cpu" and net.features[0][0].weight.is_contiguous()
    assert next(run.model.parameters()).device.type == "cuda"  # the EMA copy stays where it was trained
    assert tinycifar.summary(run.model)["params"] == run.summary["params"]
    report = tinycifar.check(run.model)
    assert report.empirical_receptive_field == report.receptive_field  # the gradient cross-check ran
