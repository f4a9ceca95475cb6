"""TensorBoard event files for a run: ``train --tensorboard`` (the optional extra ``tensorboard``).

Written into ``RUN/tensorboard/`` by rank 0: the loss and learning rate of every step, the train and
test loss and accuracy of every epoch, the resolved config as text, a grid of augmented training
samples (the report's figure) and each epoch's confusion matrix as images. ``tensorboard --logdir
runs`` then shows every run side by side, live while they train.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from ..config import ConfigError, TrainConfig
from ..data import Split


def _pixels(fig: Figure) -> np.ndarray:
    """A figure as HWC uint8 pixels, drawn without pyplot."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return np.asarray(Image.open(buf).convert("RGB"))


def writer_class():
    """torch's SummaryWriter, or one line saying which extra to install (checked before a run starts)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard extra: "
                          "pip install 'tinycifar[tensorboard]'") from None
    return SummaryWriter


class TensorBoardLog:
    def __init__(self, run_dir: Path, cfg: TrainConfig, train_split: Split, mean: list[float], std: list[float]):
        from ..reports.report import augmentation_figure

        self.writer = writer_class()(log_dir=str(Path(run_dir) / "tensorboard"))
        self.classes = train_split.classes
        self.steps: list[tuple[int, torch.Tensor, float]] = []  # (step, loss on the device, lr), not yet written
        self.writer.add_text("config", "```json\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```")
        pick = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(0))[:6]
        grid, _ = augmentation_figure(train_split.images[pick], train_split.labels[pick], cfg.to_dict(), mean, std,
                                      train_split.classes)
        self.writer.add_image("augmented samples", _pixels(grid), 0, dataformats="HWC")

    def step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """Keep the step's loss where it is (reading it now would wait for the device every step);
        the losses are read together when the epoch is logged or the log closes."""
        self.steps.append((step, loss.detach(), lr))

    def write_steps(self) -> None:
        if not self.steps:
            return
        losses = torch.stack([loss for _, loss, _ in self.steps]).float().cpu().tolist()  # one read for all
        for (step, _, lr), loss in zip(self.steps, losses, strict=True):
            self.writer.add_scalar("step/loss", loss, step)
            self.writer.add_scalar("step/lr", lr, step)
        self.steps = []

    def epoch(self, row: dict[str, Any], confusion: torch.Tensor) -> None:
        from ..reports.report import plot_confusion

        self.write_steps()
        epoch = int(row["epoch"])
        for split in ("train", "test"):
            self.writer.add_scalar(f"{split}/loss", row[f"{split}_loss"], epoch)
            self.writer.add_scalar(f"{split}/accuracy", row[f"{split}_acc"], epoch)
        self.writer.add_image("confusion matrix", _pixels(plot_confusion(confusion.numpy(), self.classes)), epoch,
                              dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.write_steps()
        self.writer.close()
