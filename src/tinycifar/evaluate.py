"""Evaluation: loss, accuracy, per-class accuracy, confusion matrix, calibration, test-time augmentation.

Under ``torch.distributed`` each rank evaluates its own slice of the test set and the
counts are summed, so every test image is counted exactly once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .models.layers import fold_batch_norms

TTA_MODES = ("none", "flip", "flip+translate")
CALIBRATION_BINS = 15  # equal-width confidence bins, the usual choice for ECE (Guo et al., 2017)
FOLD_PROBE_IMAGES = 8  # the folded network must give these the unfolded one's logits (models.layers)


def eval_batch_size(device: torch.device) -> int:
    """Test images a forward pass takes: on a CPU 250, whose activations stay in the caches (a flip-TTA
    pass over 10,000 images took 5.7 s against 9.8 s at 1000 on a 2-core Zen 3, fp32); on a GPU
    1000, as many as fill it without costing memory that training needs."""
    return 250 if device.type == "cpu" else 1000


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = CALIBRATION_BINS) -> torch.Tensor:
    """(3, bins): per confidence bin, the number of predictions, their summed confidence (the top
    softmax probability) and how many were right. Sums, so that batches and ranks add up."""
    confidence, predicted = probs.max(1)
    index = (confidence * bins).long().clamp(max=bins - 1)
    return torch.stack([torch.bincount(index, minlength=bins).double(),
                        torch.bincount(index, weights=confidence.double(), minlength=bins),
                        torch.bincount(index, weights=(predicted == labels).double(), minlength=bins)])


def expected_calibration_error(bins: torch.Tensor) -> float:
    """ECE in percent: the gap between accuracy and mean confidence in each bin, weighted by the
    bin's share of the predictions. 0 is perfect calibration; over-confidence and under-confidence
    both count (``mean_overconfidence`` gives the sign)."""
    count, confidence, correct = bins
    return float(100 * (confidence - correct).abs().sum() / count.sum().clamp(min=1))


def mean_overconfidence(bins: torch.Tensor) -> float:
    """Mean confidence minus accuracy, in percent points: positive when the network is over-confident."""
    count, confidence, correct = bins
    return float(100 * (confidence.sum() - correct.sum()) / count.sum().clamp(min=1))


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast on the training device, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate by (dy, dx) pixels, reflecting at the border."""
    p = max(abs(dy), abs(dx))
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    h, w = x.shape[-2:]
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """Views whose logits are averaged: flip doubles the views, translate adds 1-pixel shifts."""
    if mode not in TTA_MODES:
        raise ValueError(f"test-time augmentation {mode!r}: expected one of {TTA_MODES}")
    if mode == "none":
        return [x]
    views = [x, x.flip(-1)]
    if mode == "flip+translate":
        views += [shift(v, s, s) for v in views[:2] for s in (-1, 1)]
    return views


@dataclass
class EvalResult:
    loss: float
    correct: int
    total: int
    confusion: torch.Tensor  # (classes, classes): rows true class, columns predicted
    calibration: torch.Tensor  # (3, CALIBRATION_BINS): see calibration_bins

    @property
    def ece(self) -> float:
        """Expected calibration error over 15 bins, in percent."""
        return expected_calibration_error(self.calibration)

    @property
    def overconfidence(self) -> float:
        """Mean confidence minus accuracy, in points: positive over-confident, negative under-."""
        return mean_overconfidence(self.calibration)

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / max(self.total, 1)

    @property
    def per_class(self) -> list[float]:
        counts = self.confusion.sum(1).clamp(min=1)
        return (100.0 * self.confusion.diag() / counts).tolist()

    def line(self) -> str:
        """The reference run's per-epoch line."""
        return (f"Test set: Average loss: {self.loss:.4f}, "
                f"Accuracy: {self.correct}/{self.total} ({self.accuracy:.2f}%)")


@torch.no_grad()
def evaluate(model: nn.Module, loader, precision: str = "fp32", tta: str = "none",
             num_classes: int | None = None) -> EvalResult:
    """Loss, accuracy and confusion over the loader; the class count is the logits' width unless given."""
    return evaluate_views(model, loader, precision, tta, num_classes)[0]


@torch.no_grad()
def evaluate_views(model: nn.Module, loader, precision: str = "fp32", tta: str = "none",
                   num_classes: int | None = None) -> tuple[EvalResult, EvalResult]:
    """The result with ``tta`` and the plain one (the identity view alone) from the same forward
    passes, so a run that reports both pays for the views once."""
    net = None  # folded at the first batch, checked on its first images; ``model`` keeps its mode
    device = loader.device
    loss_sums = torch.zeros(2, device=device, dtype=torch.float64)
    calibration = torch.zeros(2, 3, CALIBRATION_BINS, device=device, dtype=torch.float64)
    confusion = None
    for x, y in loader:
        if net is None:
            net = fold_batch_norms(model, probe=x[:FOLD_PROBE_IMAGES])
        with autocast_context(x.device, precision):
            views = [net(v).float() for v in tta_views(x, tta)]
        scored = [views[0]] if len(views) == 1 else [torch.stack(views).mean(0), views[0]]  # no TTA: one tally
        for i, logits in enumerate(scored):
            if confusion is None:
                num_classes = num_classes or logits.shape[1]
                confusion = torch.zeros(2, num_classes * num_classes, device=device, dtype=torch.long)
            loss_sums[i] += F.cross_entropy(logits, y, reduction="sum").double()
            confusion[i] += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes**2)
            calibration[i] += calibration_bins(logits.softmax(1), y)
    if confusion is None:  # an empty loader
        num_classes = num_classes or 0
        confusion = torch.zeros(2, num_classes * num_classes, device=device, dtype=torch.long)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loss_sums)
        dist.all_reduce(confusion)
        dist.all_reduce(calibration)
    results = []
    for loss_sum, matrix, bins in zip(loss_sums.tolist(), confusion.cpu(), calibration.cpu(), strict=True):
        matrix = matrix.view(num_classes, num_classes)
        total = int(matrix.sum())
        results.append(EvalResult(loss_sum / max(total, 1), int(matrix.diag().sum()), total, matrix, bins))
    return results[0], results[1] if tta != "none" else results[0]
