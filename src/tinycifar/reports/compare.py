"""``tinycifar compare RUN_DIR...``: runs side by side, one table and overlaid curves.

Everything comes from what each run folder holds: ``config.json`` (recipe, resolved parameters
and device), ``metrics.csv`` (per epoch, so unfinished and killed runs have curves too) and
``summary.json`` (written when a run ends). A folder with neither a config nor metrics is not
a run: it is named and skipped, the others are still compared.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from ..checkpoint import atomic_write_bytes
from .report import PAGE_CSS, STYLE, html_table, read_history

COLUMNS = ["run", "preset", "network", "params", "epochs", "best_acc", "best_epoch", "final_acc", "final_acc_tta",
           "train_seconds", "images_per_second", "status"]


class NotARun(ValueError):
    """The folder holds no run; the message says what is missing."""


@dataclass
class RunInfo:
    run: str
    preset: str | None
    network: str | None
    params: int | None
    epochs: str  # "finished of planned", e.g. "7 of 10"
    best_acc: float | None
    best_epoch: int | None
    final_acc: float | None
    final_acc_tta: float | None
    train_seconds: float | None
    images_per_second: float | None
    status: str  # finished | unfinished
    seed: int | None = None
    batch_size: int | None = None
    threads: int | None = None
    eval_seconds: float = 0.0
    final_ece: float | None = None  # expected calibration error (15 bins), percent; with TTA below
    final_ece_tta: float | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in COLUMNS}


def _json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_run(run_dir: str | Path) -> RunInfo:
    """What one run folder says about its run, finished or not; NotARun when it holds none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotARun(f"{run_dir}: not a folder")
    config, summary = _json(run_dir / "config.json"), _json(run_dir / "summary.json")
    history = read_history(run_dir, {}) if (run_dir / "metrics.csv").is_file() else []
    if config is None and not history:
        raise NotARun(f"{run_dir}: not a run folder (no config.json or metrics.csv)")
    config, summary = config or {}, summary or {}
    tested = [h for h in history if h.get("test_acc") is not None]  # --eval-every skips test passes
    best = max(tested, key=lambda h: h["test_acc"]) if tested else None
    last = history[-1] if history else {}
    train_seconds = summary.get("train_seconds", last.get("train_seconds_total"))
    planned = config.get("epochs", "?")
    return RunInfo(
        run=str(run_dir), preset=config.get("preset"), network=config.get("model"),
        params=summary.get("params", config.get("resolved", {}).get("params")),
        epochs=f"{len(history)} of {planned}", best_acc=best.get("test_acc") if best else None,
        best_epoch=int(best["epoch"]) if best else None, final_acc=last.get("test_acc"),
        final_acc_tta=summary.get("final_acc_tta"), train_seconds=train_seconds,
        images_per_second=summary.get("images_per_second"), status="finished" if summary else "unfinished",
        seed=config.get("seed"), batch_size=config.get("batch_size"), threads=config.get("threads"),
        eval_seconds=round(sum(h.get("eval_seconds", 0.0) for h in history), 3),
        final_ece=summary.get("final_ece"), final_ece_tta=summary.get("final_ece_tta"),
        model_kwargs=config.get("model_kwargs") or {}, history=history)


def read_runs(run_dirs: list[str | Path], on_skip=None) -> list[RunInfo]:
    """Every folder that holds a run; ``on_skip(message)`` for each one that does not."""
    runs = []
    for d in run_dirs:
        try:
            runs.append(read_run(d))
        except NotARun as e:
            if on_skip is not None:
                on_skip(str(e))
    return runs


def plot_runs(runs: list[RunInfo]) -> Figure:
    """Test accuracy and training loss per epoch, one line per run (runs of any length)."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for r in runs:
        epochs = [h["epoch"] for h in r.history]
        label = f"{Path(r.run).name} ({r.network})"
        accuracy = [h.get("test_acc", float("nan")) for h in r.history]  # nan: an epoch without a test pass
        acc_ax.plot(epochs, accuracy, marker="o" if len(epochs) <= 30 else None, markersize=3, label=label)
        loss_ax.plot(epochs, [h.get("train_loss") for h in r.history], label=label)
    acc_ax.set(title="Test accuracy", xlabel="epoch", ylabel="accuracy (%)")
    loss_ax.set(title="Training loss", xlabel="epoch", ylabel="loss (augmented batches)")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=9)
    return fig


def write_comparison(runs: list[RunInfo], out: str | Path) -> Path:
    """``curves.png`` and a self-contained ``compare.html`` in ``out``; returns the page."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(STYLE):
        fig = plot_runs(runs)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    png = buf.getvalue()
    atomic_write_bytes(out / "curves.png", lambda f: f.write(png))
    rows = [[("-" if r.row()[c] is None else r.row()[c]) for c in COLUMNS] for r in runs]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tinycifar: {len(runs)} runs"
            f"</title><style>{PAGE_CSS}</style></head><body><h1>{len(runs)} runs compared</h1>"
            f"<div class='scroll'>{html_table(rows, COLUMNS)}</div><h2>Curves</h2>"
            f"<img alt='test accuracy and training loss per epoch' src='data:image/png;base64,"
            f"{base64.b64encode(png).decode()}'><p class='note'>Accuracy in percent on the test set after each "
            f"epoch; runs: {html.escape(', '.join(r.run for r in runs))}.</p></body></html>")
    atomic_write_bytes(out / "compare.html", lambda f: f.write(page.encode()))
    return out / "compare.html"


def format_table(runs: list[RunInfo]) -> str:
    def text(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)

    cells = [[text(r.row()[c]) for c in COLUMNS] for r in runs]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
