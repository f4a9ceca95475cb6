"""Checkpoints to serve in the server's tests: tiny networks trained for one epoch on synthetic data."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tinycifar.config import resolve_config
from tinycifar.train import train


def tiny_run(out: Path, model: str = "fastnet", seed: int = 0) -> Path:
    """A run folder (best.pt, metrics.csv) of ``model`` after two quick epochs; returns best.pt."""
    cfg = resolve_config("fast", overrides={
        "model": model, "dataset": "synthetic", "synthetic_size": 400, "epochs": 2, "batch_size": 100,
        "quiet": True, "threads": 1, "seed": seed, "out": str(out), "low_res": 0})
    train(cfg)
    return out / "best.pt"


def png_bytes(seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
