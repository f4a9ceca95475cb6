"""Accuracy under common corruptions: a checkpoint on CIFAR-10-C-style test sets, and the heat map.

Each (corruption, severity) set is built once by ``data.corruptions`` and cached; the network sees
it through the same device loader and normalization as the clean test set. The summary number is
the mean corruption accuracy (mCA) over every corruption and severity evaluated, beside the clean
accuracy, as Hendrycks & Dietterich report it (their corruption error is 100 - mCA).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from ..data import Split
from ..data.corruptions import cached_corruption
from ..data.loader import DeviceLoader
from ..evaluate import eval_batch_size, evaluate


@dataclass
class CorruptionReport:
    clean: float
    severities: list[int]
    accuracy: dict[str, dict[int, float]] = field(default_factory=dict)  # corruption -> severity -> %
    seed: int = 0

    @property
    def mean_corruption_accuracy(self) -> float:
        values = [a for by_severity in self.accuracy.values() for a in by_severity.values()]
        return sum(values) / max(len(values), 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_corruption_accuracy": round(self.mean_corruption_accuracy, 2)}

    def table(self) -> str:
        head = f"{'corruption':<18}" + "".join(f"{'s' + str(s):>8}" for s in self.severities) + f"{'mean':>8}"
        lines = [head]
        for name, by_severity in self.accuracy.items():
            values = [by_severity[s] for s in self.severities]
            lines.append(f"{name:<18}" + "".join(f"{v:8.2f}" for v in values) + f"{sum(values) / len(values):8.2f}")
        lines.append(f"\nclean accuracy {self.clean:.2f}%, mean corruption accuracy "
                     f"{self.mean_corruption_accuracy:.2f}% ({len(self.accuracy)} corruptions x "
                     f"{len(self.severities)} severities, seed {self.seed})")
        return "\n".join(lines)


def evaluate_corruptions(model: nn.Module, test: Split, mean: list[float], std: list[float], names: list[str],
                         severities: list[int], device: torch.device, precision: str = "fp32", seed: int = 0,
                         batch_size: int | None = None, progress=None) -> CorruptionReport:
    """Accuracy on the clean test set and on each corrupted copy of it, ``batch_size`` images a pass
    (by default the device's, ``eval_batch_size``, as ``tinycifar eval`` passes)."""
    batch_size = batch_size or eval_batch_size(device)

    def accuracy(images: torch.Tensor) -> float:
        loader = DeviceLoader(Split(images, test.labels, test.classes), batch_size, mean, std, device, train=False,
                              channels_last=True)
        return round(evaluate(model, loader, precision).accuracy, 2)

    report = CorruptionReport(accuracy(test.images), severities, seed=seed)
    for name in names:
        report.accuracy[name] = {}
        for severity in severities:
            report.accuracy[name][severity] = accuracy(cached_corruption(test.images, name, severity, seed))
            if progress is not None:
                progress(name, severity, report.accuracy[name][severity])
    return report


def heatmap(report: CorruptionReport, title: str = "") -> Figure:
    """Accuracy per corruption (rows) and severity (columns), each row's mean in a last column, the
    clean accuracy and the mCA in the title."""
    names = list(report.accuracy)
    values = torch.tensor([[report.accuracy[n][s] for s in report.severities] for n in names])
    values = torch.cat([values, values.mean(1, keepdim=True)], 1)
    columns = [str(s) for s in report.severities] + ["mean"]
    fig = Figure(figsize=(0.9 * len(columns) + 3.6, 0.4 * len(names) + 1.5), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(values.numpy(), cmap="RdYlGn", aspect="auto", vmin=max(0.0, float(values.min()) - 5),
                   vmax=report.clean)
    for r in range(len(names)):
        for c in range(len(columns)):
            ax.text(c, r, f"{values[r, c]:.1f}", ha="center", va="center", fontsize=9,
                    fontweight="bold" if c == len(columns) - 1 else "normal")
    ax.axvline(len(columns) - 1.5, color="white", lw=3)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_xlabel("severity")
    ax.set_yticks(range(len(names)), [n.replace("_", " ") for n in names])
    fig.colorbar(im, ax=ax, shrink=0.8, label="test accuracy (%)")
    ax.set_title(f"{title}clean {report.clean:.2f}%, mean under corruption {report.mean_corruption_accuracy:.2f}%",
                 fontsize=11)
    return fig


def save_report(report: CorruptionReport, run_dir: Path, title: str = "") -> tuple[Path, Path]:
    """``corruptions.json`` and ``corruptions.png`` in the run folder, which the HTML report shows."""
    from ..checkpoint import atomic_write_bytes

    data, png = run_dir / "corruptions.json", run_dir / "corruptions.png"
    atomic_write_bytes(data, lambda f: f.write((json.dumps(report.to_dict(), indent=2) + "\n").encode()))
    heatmap(report, title).savefig(png, dpi=110)
    return data, png
