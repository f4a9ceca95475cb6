"""A real run folder in seconds: era9 trained on a little synthetic data (shared by several test files)."""

from __future__ import annotations

from pathlib import Path

from tinycifar.config import resolve_config
from tinycifar.training.train import train


def train_tiny_run(out: Path, **overrides) -> Path:
    """Train one epoch on 200 synthetic images with one thread; returns the run folder."""
    values = dict(model="era9", dataset="synthetic", synthetic_size=200, epochs=1, batch_size=50, lr=0.02,
                  precision="fp32", device="cpu", threads=1, quiet=True, eval_every=1, out=str(out))
    values.update(overrides)
    return train(resolve_config("fast", overrides=values)).run_dir


def train_learned_run(out: Path, **overrides) -> Path:
    """era9 for 3 epochs on 512 synthetic images: 95% on its 128 test images (measured), where
    ``train_tiny_run``'s is at chance; for tests that need an accuracy to lose (int8's check). Its 34
    steps need Muon's lr above the fp32 recipe's 0.02, which suits thousands (16% at 0.02)."""
    values = dict(synthetic_size=512, batch_size=32, lr=0.05, muon_lr=0.1, aug={"policy": "none"}, epochs=3)
    return train_tiny_run(out, **{**values, **overrides})
