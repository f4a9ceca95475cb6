"""A real run folder in seconds: era9 trained on a little synthetic data (shared by several test files)."""

from __future__ import annotations

from pathlib import Path

from tinycifar.config import resolve_config
from tinycifar.training.train import train

# one epoch on 200 synthetic images with one thread, in fp32 (so with the fast preset's fp32 table)
TINY_RUN = dict(model="era9", dataset="synthetic", synthetic_size=200, epochs=1, batch_size=50, lr=0.02,
                precision="fp32", device="cpu", threads=1, quiet=True, eval_every=1)
# era9 for 3 epochs on 512 synthetic images: 95% on its 128 test images (measured), where the tiny run's
# is at chance. Its 34 steps need Muon's lr above the fp32 table's 0.02, which suits thousands (16% at 0.02).
LEARNED_RUN = {**TINY_RUN, "synthetic_size": 512, "batch_size": 32, "lr": 0.05, "muon_lr": 0.1,
               "aug": {"policy": "none"}, "epochs": 3}


def train_tiny_run(out: Path, **overrides) -> Path:
    """Train ``TINY_RUN`` (with ``overrides``); returns the run folder."""
    return train(resolve_config("fast", overrides={**TINY_RUN, "out": str(out), **overrides})).run_dir


def train_learned_run(out: Path, **overrides) -> Path:
    """``LEARNED_RUN``: for tests that need an accuracy to lose (int8's check)."""
    return train_tiny_run(out, **{**LEARNED_RUN, **overrides})
