"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2017),
as the course teaches it with the ``torch-lr-finder`` package: ``tinycifar lr-find`` and ``train --lr auto``.

From the recipe's starting point (its network, whitening stem, augmentation, optimizer, label
smoothing), the learning rate grows exponentially from ``start_lr`` to ``end_lr`` over ``steps``
training steps. The loss of each step is smoothed by an exponential moving average (weight 0.05 for
the newest step, bias-corrected, as torch-lr-finder does; fastai's 0.02 lags by a whole decade of
lr over a 100-step test), and the test stops once the smoothed loss exceeds ``diverge``
times its lowest value, or once fp16's gradient scaler has had to bring its scale below 1 (the
gradients overflow fp16 unscaled: steps are being skipped because the loss is blowing up).
The suggested peak learning rate is the one where the smoothed loss falls fastest against log(lr),
the steepest-descent rule of torch-lr-finder, looked for between the first tenth of the steps (the
loss is still settling there) and the lowest loss.

The network and optimizer come back exactly as they were: the test trains a copy of their state.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from ..checkpoint import atomic_write_bytes
from ..config import ConfigError, TrainConfig
from ..data import Split
from ..data.loader import DeviceLoader
from ..evaluate import autocast_context
from ..models.registry import short_name
from .losses import build_criterion
from .train import DistEnv, Optimizer, apply_gradients, build_optimizer, gradient_scaler, prepare, set_lr

RULE = "steepest descent of the smoothed loss against log(lr)"


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    start_lr: float
    end_lr: float
    steps: int
    diverged: bool  # stopped before the last step because the loss blew up
    skipped_steps: int = 0  # fp16: steps the gradient scaler skipped (overflowing gradients)

    rule = RULE

    def summary(self) -> dict:
        return {"suggestion": self.suggestion, "rule": self.rule, "start_lr": self.start_lr, "end_lr": self.end_lr,
                "steps": self.steps, "steps_run": len(self.lrs), "diverged": self.diverged,
                "skipped_steps": self.skipped_steps}


def check_range(start_lr: float, end_lr: float, steps: int) -> None:
    if not (math.isfinite(start_lr) and start_lr > 0):
        raise ConfigError(f"--start-lr {start_lr}: expected a positive number")
    if not (math.isfinite(end_lr) and end_lr > start_lr):
        raise ConfigError(f"--end-lr {end_lr}: expected a number above --start-lr ({start_lr:g})")
    if steps < 10:
        raise ConfigError(f"--steps {steps}: expected at least 10")


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The lr where the smoothed loss falls fastest, between the first tenth and the lowest loss."""
    lowest = int(np.argmin(smoothed))
    first = min(len(lrs) // 10, max(lowest - 1, 0))
    window = np.asarray(smoothed[first : lowest + 1])
    if len(window) < 3:  # the loss only rose: the lowest point is all there is
        return lrs[lowest]
    slope = np.gradient(window, np.log10(lrs[first : lowest + 1]))
    return float(lrs[first + int(np.argmin(slope))])


def range_test(model: nn.Module, optimizer: Optimizer, loader: DeviceLoader, criterion: nn.Module,
               precision: str, start_lr: float = 1e-5, end_lr: float = 10.0, steps: int = 100,
               beta: float = 0.95, diverge: float = 4.0) -> RangeTest:
    """Run the test on ``model``/``optimizer`` and put both back as they were."""
    check_range(start_lr, end_lr, steps)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    lrs, losses, smoothed = [], [], []
    average, best, diverged, skipped = 0.0, math.inf, False, 0
    scaler = gradient_scaler(loader.device, precision)
    batches = _endless(loader)
    model.train()
    try:
        for i in range(steps):
            lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
            set_lr(optimizer, lr)
            x, y = next(batches)
            with autocast_context(loader.device, precision):
                loss = criterion(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            skipped += not apply_gradients(optimizer, scaler, model, 0.0)
            value = loss.item()
            average = beta * average + (1 - beta) * (value if math.isfinite(value) else 1e9)
            lrs.append(lr)
            losses.append(value)
            smoothed.append(average / (1 - beta ** (i + 1)))
            best = min(best, smoothed[-1])
            if not math.isfinite(value) or smoothed[-1] > diverge * best or overflows_unscaled(scaler):
                diverged = i < steps - 1
                break
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
    return RangeTest(lrs, losses, smoothed, suggest(lrs, smoothed), start_lr, end_lr, steps, diverged, skipped)


def overflows_unscaled(scaler: torch.amp.GradScaler) -> bool:
    """fp16 only: the scaler halves its scale at every skipped step, and a scale below 1 means even the
    true gradients overflow fp16, which a loss that is blowing up does while its value still looks finite."""
    return scaler.is_enabled() and scaler.get_scale() < 1


def _endless(loader: DeviceLoader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def lr_find(cfg: TrainConfig, data: tuple[Split, Split] | None = None, model: nn.Module | None = None,
            start_lr: float = 1e-5, end_lr: float = 10.0, steps: int = 100) -> RangeTest:
    """The range test for a recipe: its data, network (``model`` or ``cfg.model``) and optimizer.

    A network passed as ``model`` is not touched: the test trains a copy of it.
    """
    check_range(start_lr, end_lr, steps)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # every process would train on the same device and write the same files
        raise ConfigError(f"lr-find: not under torchrun ({world} processes); run it as one process, then pass "
                          "its suggestion to the multi-process run as --lr")
    threads = torch.get_num_threads()
    try:
        # a network handed over is left as it is: the test (whitening stem, channels_last) runs on a copy
        p = prepare(cfg, DistEnv(), data, copy.deepcopy(model) if model is not None else None)
        criterion = build_criterion(cfg)
        return range_test(p.model, build_optimizer(p.model, cfg), p.train_loader, criterion, p.precision, start_lr,
                          end_lr, steps)
    finally:
        torch.set_num_threads(threads)


def plot(result: RangeTest, preset_lr: float | None = None) -> Figure:
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="#b9c4d8", linewidth=1, label="loss of each step")
    ax.plot(result.lrs, result.smoothed, color="#2f6fde", linewidth=2, label="smoothed loss")
    ax.axvline(result.suggestion, color="#2c8a4b", linestyle="--", label=f"suggested peak lr {result.suggestion:.3g}")
    if preset_lr:
        ax.axvline(preset_lr, color="#c23b3b", linestyle=":", label=f"the recipe's lr {preset_lr:g}")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    raw = [v for v in result.losses if math.isfinite(v)]
    if finite:
        low = min(min(finite), float(np.percentile(raw, 5)))
        ax.set_ylim(low * 0.95, min(max(finite), 3 * min(finite)) * 1.05)
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss",
           title=f"Learning-rate range test ({len(result.lrs)} steps)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    return fig


def write(result: RangeTest, out: str | Path, preset_lr: float | None = None) -> tuple[Path, Path]:
    """``lr_find.csv`` (lr, loss, smoothed loss per step) and ``lr_find.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "lr", "loss", "smoothed_loss"])
    writer.writerows([i + 1, f"{lr:.6g}", f"{loss:.6f}", f"{s:.6f}"]
                     for i, (lr, loss, s) in enumerate(zip(result.lrs, result.losses, result.smoothed, strict=True)))
    atomic_write_bytes(out / "lr_find.csv", lambda f: f.write(buf.getvalue().encode()))
    png = io.BytesIO()
    plot(result, preset_lr).savefig(png, format="png", dpi=110)
    atomic_write_bytes(out / "lr_find.png", lambda f: f.write(png.getvalue()))
    return out / "lr_find.csv", out / "lr_find.png"


def default_out(cfg: TrainConfig) -> Path:
    return Path("runs") / f"lr-find-{cfg.preset}-{short_name(cfg.model)}-{time.strftime('%Y%m%d-%H%M%S')}"
