"""Checkpoints and images for the server's tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from tiny_run import train_tiny_run


def served_checkpoint(out: Path, model: str = "fastnet", seed: int = 0) -> Path:
    """best.pt of ``model`` after two quick epochs on 400 synthetic images (a 100-image test set)."""
    return train_tiny_run(out, model=model, seed=seed, synthetic_size=400, epochs=2, batch_size=100, low_res=0,
                          precision="auto") / "best.pt"


def png_bytes(seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    """A random RGB image of ``size`` (width, height) as PNG bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
