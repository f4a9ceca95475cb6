"""The run report: ``tinycifar report RUN_DIR`` writes PNG figures and one self-contained HTML page.

Figures: learning curves, the most confident mistakes, the confusion matrix, per-class
accuracy, augmented training samples, and Grad-CAM maps of mistakes. The page embeds
every image as base64 and loads nothing from elsewhere, so it opens offline and can be
mailed as one file.

Grad-CAM layer: the last convolution (or block holding one) whose output is still at least
8x8, found by a dry forward pass with hooks, in any network; ``--cam-layer`` names another.
Later layers are deeper but their 4x4 maps give each cell a 8x8-pixel patch of a 32x32
image, too coarse to tell an object from its background. For era9 this is ``features.2.1``,
C3's depthwise-separable block (96 channels at 8x8), just before C3's strided convolution
halves the map to 4x4.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.cm
import matplotlib.colors
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from ..checkpoint import CheckpointError, atomic_write_bytes
from ..data import CLASSES, Split, classes_of
from ..data.augment import AugmentConfig, augment
from ..data.augmix import augmix
from ..data.pipeline import to_hwc
from ..devices import module_device
from ..evaluate import (
    CALIBRATION_BINS,
    calibration_bins,
    expected_calibration_error,
    mean_overconfidence,
    tta_views,
)
from ..serving.inference import load_inference_model, run_split, to_unit_float

MIN_CAM_SIZE = 8
GALLERY = 24  # misclassified images shown
CAM_IMAGES = 8
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "figure.titlesize": 14,
         "axes.spines.top": False, "axes.spines.right": False}


# ---------------------------------------------------------------------------- Grad-CAM


def _finished_maps(net: nn.Module, input_size: int = 32) -> list[tuple[str, nn.Module, tuple]]:
    """(name, module, output shape C x H x W) of every submodule with a map output, in the order
    they finish on a dry forward pass (a block finishes after its own children)."""
    finished: list[tuple[str, nn.Module, tuple]] = []

    def record(name: str, m: nn.Module):
        def hook(_m, _inputs, out) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                finished.append((name, m, tuple(out.shape[1:])))
        return hook

    hooks = [m.register_forward_hook(record(name, m)) for name, m in net.named_modules() if name]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, input_size, input_size, device=module_device(net)))
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return finished


def find_gradcam_layer(net: nn.Module, min_size: int = MIN_CAM_SIZE, input_size: int = 32) -> tuple[str, tuple]:
    """Name and output shape (C, H, W) of the last convolution, or block holding one, to finish
    with a map of at least ``min_size`` x ``min_size``. Works for any network.

    "Last to finish" is the forward-hook order, so a block wins over its own last child:
    the name is the block's, the tensor the same (after its activation).
    """
    for name, module, shape in reversed(_finished_maps(net, input_size)):
        has_conv = any(isinstance(m, nn.Conv2d) for m in module.modules())
        if has_conv and min(shape[-2:]) >= min_size:
            return name, shape
    raise ValueError(f"no convolution of {type(net).__name__} has an output of at least {min_size}x{min_size}; "
                     "name a layer with --cam-layer")


def gradcam_layer(net: nn.Module, name: str | None = None) -> tuple[str, tuple]:
    """``name`` checked to be a submodule with a map output, or the automatic choice when None."""
    if name is None:
        return find_gradcam_layer(net)
    maps = {n: shape for n, _, shape in _finished_maps(net)}
    if name not in maps:
        known = dict(net.named_modules())
        reason = "its output is not an N x C x H x W map" if name in known else "no such module"
        choices = ", ".join(list(maps)[-6:])
        raise ValueError(f"--cam-layer {name}: {reason}; layers with maps include: {choices}")
    return name, maps[name]


def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al.) at ``layer``'s resolution: (N, H, W), non-negative.

    ``model`` maps ``x`` to logits and runs ``layer`` on the way; ``target`` is the class
    per image (default: the predicted one). Channel weights are the spatially averaged
    gradients of the class score; the map is ReLU(sum of weighted activations). ``x`` and
    ``target`` go to the model's device, where the maps stay (``upsample_cam`` brings them back).
    """
    acts: list[torch.Tensor] = []
    device = module_device(model)
    x, target = x.to(device), None if target is None else target.to(device)

    def keep(_m, _inputs, out):
        acts.append(out)
        return out.clone()  # later in-place ops (ReLU(inplace=True)) must not alter what we differentiate

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x)
            target = logits.argmax(1) if target is None else target
            score = logits.gather(1, target.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, acts[0])
    finally:
        handle.remove()
    weights = grad.mean((2, 3), keepdim=True)
    return (weights * acts[0]).sum(1).clamp(min=0).detach()


def upsample_cam(cam: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Bilinear to the image size, each map scaled to 0..1 (all-zero maps stay zero), on the CPU."""
    up = F.interpolate(cam[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    peak = up.flatten(1).max(1).values.clamp(min=1e-12).view(-1, 1, 1)
    return (up / peak).cpu()


# ---------------------------------------------------------------------------- run folder


def read_history(run_dir: Path, state: dict[str, Any]) -> list[dict[str, float]]:
    """Per-epoch metrics: metrics.csv (covers every finished epoch), else the checkpoint's copy."""
    path = run_dir / "metrics.csv"
    if path.is_file():
        with open(path, newline="") as f:
            return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    return [dict(row) for row in state.get("history", [])]


def run_precision(run_dir: Path) -> str | None:
    """The precision training resolved to (config.json), which may make its test numbers differ slightly."""
    try:
        return json.loads((run_dir / "config.json").read_text())["resolved"]["precision"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def layer_reason(chosen: bool) -> str:
    if chosen:
        return "the layer named with --cam-layer."
    return (f"the last convolution whose map is still at least {MIN_CAM_SIZE}x{MIN_CAM_SIZE}. "
            "The layers after it have smaller maps, where one cell covers too large a patch of the 32x32 image "
            "to separate an object from its background.")


def pick_checkpoint(run_dir: Path) -> Path:
    for name in ("best.pt", "last.pt"):
        if (run_dir / name).is_file():
            return run_dir / name
    raise CheckpointError(f"{run_dir}: no best.pt or last.pt; is this a run folder?")


@torch.no_grad()
def test_probabilities(model: nn.Module, images: torch.Tensor, batch: int = 500, tta: str = "none") -> torch.Tensor:
    """Softmax over the test images; with ``tta``, of the logits averaged over the views (as ``evaluate``).
    Each batch runs on the model's device; the probabilities come back on the CPU."""
    device = module_device(model)

    def probs(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([model(v) for v in tta_views(x.to(device), tta)]).mean(0).softmax(1).cpu()

    return torch.cat([probs(to_unit_float(images[i : i + batch])) for i in range(0, len(images), batch)])


def aug_config(config: dict[str, Any]) -> AugmentConfig:
    known = {f.name for f in dataclasses.fields(AugmentConfig)}
    return AugmentConfig(**{k: v for k, v in config.get("aug", {}).items() if k in known})


def describe_policy(aug: AugmentConfig) -> str:
    return _describe_transforms(aug) + (
        f", then AugMix ({aug.augmix_width} chains, severity {aug.augmix_severity}"
        + (", the Jensen-Shannon consistency loss on two views)" if aug.augmix == "jsd" else ")")
        if aug.augmix != "off" else "")


def _describe_transforms(aug: AugmentConfig) -> str:
    if aug.policy == "seed":
        return (f"horizontal flip (p={aug.flip:g}), shift-scale-rotate (shift {aug.shift:g}, scale {aug.scale:g}, "
                f"rotate {aug.rotate:g} deg, p={aug.ssr_p:g}), one {aug.dropout_size}x{aug.dropout_size} "
                f"coarse-dropout hole (p={aug.dropout_p:g})")
    if aug.policy == "fast":
        parts = [f"horizontal flip (p={aug.flip:g})"]
        if aug.translate_pad:
            parts.append(f"translate up to {aug.translate_pad} px")
        if aug.cutout_size:
            parts.append(f"{aug.cutout_size}x{aug.cutout_size} cutout (p={aug.cutout_p:g})")
        return ", ".join(parts)
    return "no augmentation"


# ---------------------------------------------------------------------------- figures


def _png(fig: Figure, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = buf.getvalue()
    atomic_write_bytes(path, lambda f: f.write(data))
    return data


def _image(images: torch.Tensor, i: int) -> np.ndarray:
    return images[i].permute(1, 2, 0).numpy()


def _bare(ax) -> None:
    """No ticks, no frame: for image panels that keep a y label."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.spines[:].set_visible(False)


def plot_curves(history: list[dict[str, float]], label_smoothing: float) -> Figure:
    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    epochs = [h["epoch"] for h in history]
    marker = "o" if len(epochs) <= 30 else None
    smoothing = f", label smoothing {label_smoothing:g}" if label_smoothing else ""
    panels = [("train_loss", "Train loss", "cross-entropy loss", f"augmented batches{smoothing}", "tab:blue"),
              ("train_acc", "Train accuracy", "accuracy (%)", "augmented batches, during the epoch", "tab:blue"),
              ("test_loss", "Test loss", "cross-entropy loss", "whole test set, after each epoch", "tab:orange"),
              ("test_acc", "Test accuracy", "accuracy (%)", "after each epoch", "tab:orange")]
    for ax, (key, title, ylabel, note, color) in zip(axes.flat, panels, strict=True):
        rows = [h for h in history if h.get(key) is not None]  # --eval-every skips test passes
        ax.plot([h["epoch"] for h in rows], [h[key] for h in rows], color=color, marker=marker, markersize=3)
        ax.set_title(f"{title}\n({note})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    tested = [h for h in history if h.get("test_acc") is not None]
    if tested:
        best = max(tested, key=lambda h: h["test_acc"])
        ax = axes[1, 1]
        ax.plot([best["epoch"]], [best["test_acc"]], "o", color="tab:red",
                label=f"best {best['test_acc']:.2f}% (epoch {best['epoch']:.0f})")
        ax.legend(loc="lower right")
    fig.suptitle("Learning curves")
    return fig


def plot_gallery(images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, shown: list[int],
                 total_wrong: int, classes: tuple[str, ...] = CLASSES) -> Figure:
    cols = 6
    rows = max(1, -(-len(shown) // cols))
    fig = Figure(figsize=(cols * 2.1, rows * 2.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(rows, cols)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown, strict=False):  # the last row may be short
        pred = int(probs[i].argmax())
        ax.imshow(_image(images, i), interpolation="nearest")
        ax.set_title(f"true: {classes[labels[i]]}\npredicted: {classes[pred]}\nconfidence {probs[i, pred]:.0%}",
                     fontsize=10)
    if not shown:
        axes[0, 0].text(0, 0.5, "No misclassified test images.", fontsize=14)
    fig.suptitle(f"The {len(shown)} most confident mistakes (of {total_wrong:,} misclassified test images)")
    return fig


def plot_confusion(confusion: np.ndarray, classes: tuple[str, ...] = CLASSES) -> Figure:
    fig = Figure(figsize=(9.5, 8), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8, label="test images")
    threshold = confusion.max() / 2
    for t in range(len(classes)):
        for p in range(len(classes)):
            ax.text(p, t, f"{confusion[t, p]:d}", ha="center", va="center", fontsize=9,
                    color="white" if confusion[t, p] > threshold else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.spines[:].set_visible(False)
    accuracy = 100 * np.trace(confusion) / max(confusion.sum(), 1)
    ax.set_title(f"Confusion matrix: counts of test images (accuracy {accuracy:.2f}%)\n"
                 "diagonal = correct; row = true class, column = predicted class")
    return fig


def plot_per_class(confusion: np.ndarray, classes: tuple[str, ...] = CLASSES) -> Figure:
    per_class = 100 * np.diag(confusion) / np.maximum(confusion.sum(1), 1)
    overall = 100 * np.trace(confusion) / max(confusion.sum(), 1)
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(range(len(classes)), per_class, color="tab:blue")
    ax.bar_label(bars, [f"{v:.1f}%" for v in per_class], padding=3, fontsize=10)
    ax.axvline(overall, color="tab:red", linestyle="--")
    ax.set_yticks(range(len(classes)), classes)
    ax.invert_yaxis()
    ax.set_xlim(0, 108)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(f"Per-class test accuracy (dashed red line: all classes, {overall:.2f}%)")
    return fig


def plot_reliability(curves: list[tuple[str, torch.Tensor]]) -> Figure:
    """Reliability diagrams side by side: accuracy against confidence per bin (the diagonal is
    perfect calibration), the gap to the bin's mean confidence hatched (above the bar:
    over-confident, inside it: under-confident), each bin's share of the predictions below."""
    fig = Figure(figsize=(5 * len(curves), 5.6), layout="constrained")
    axes = fig.subplots(2, len(curves), squeeze=False, height_ratios=[3, 1], sharex=True)
    for (name, bins), ax, hist in zip(curves, axes[0], axes[1], strict=True):
        count, confidence, correct = bins.numpy()
        n = len(count)
        edges = np.linspace(0, 1, n + 1)
        centres, used = (edges[:-1] + edges[1:]) / 2, count > 0
        accuracy = np.divide(correct, count, out=np.zeros(n), where=used)
        mean_conf = np.divide(confidence, count, out=centres.copy(), where=used)
        ax.bar(centres[used], accuracy[used], width=1 / n, color="tab:blue", edgecolor="white", label="accuracy")
        ax.bar(centres[used], (mean_conf - accuracy)[used], bottom=accuracy[used], width=1 / n, fill=False,
               hatch="///", edgecolor="tab:red", lw=1, label="gap to the bin's mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in the bin",
               title=f"{name}: ECE {expected_calibration_error(bins):.2f}%")
        ax.legend(loc="upper left", fontsize=9)
        hist.bar(centres, 100 * count / max(count.sum(), 1), width=1 / n, color="tab:gray")
        hist.set(xlabel="confidence (top softmax probability)", ylabel="% of images")
    return fig


def policy_draws(images: torch.Tensor, aug: AugmentConfig, mean: list[float], std: list[float], draws: int,
                 seed: int = 0, with_augmix: bool = False) -> list[torch.Tensor]:
    """``draws`` independent passes of the batched policy over uint8 images, as 0..1 images;
    ``with_augmix``: each followed by one AugMix view, as the loader makes them."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    x = (to_unit_float(images) - m) / s
    g = torch.Generator().manual_seed(seed)

    def draw() -> torch.Tensor:
        y = augment(x, aug, g)
        if with_augmix:
            y = augmix(y, 255 * m, 255 * s, g, aug.augmix_severity, aug.augmix_width, aug.augmix_depth)
        return (y * s + m).clamp(0, 1)

    return [draw() for _ in range(draws)]


def pipeline_draws(images: torch.Tensor, pipeline, draws: int, seed: int = 0) -> list[torch.Tensor]:
    """``draws`` independent passes of an albumentations pipeline over uint8 images, as 0..1 images."""
    pipeline.set_random_seed(seed)
    return [to_unit_float(torch.stack([torch.from_numpy(pipeline(image=to_hwc(img))["image"]).permute(2, 0, 1)
                                       for img in images])) for _ in range(draws)]


def plot_augmentations(images: torch.Tensor, labels: torch.Tensor, blocks: list[tuple[str, list[torch.Tensor]]],
                       title: str, classes: tuple[str, ...] = CLASSES) -> Figure:
    """Each row one training image: the original, then independent draws of each augmentation
    backend in ``blocks`` ((name, draws) pairs), side by side, so the backends can be compared."""
    columns = [("original", images.float() / 255)] + [
        (f"{name} {i + 1}", draw) for name, draws in blocks for i, draw in enumerate(draws)]
    rows = len(images)
    fig = Figure(figsize=(len(columns) * 1.45, rows * 1.55 + 0.6), layout="constrained")
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for r in range(rows):
        for c, (name, batch) in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(_image(batch, r), interpolation="nearest")
            _bare(ax)
            if r == 0:
                ax.set_title(name, fontsize=9)
        axes[r, 0].set_ylabel(classes[labels[r]], fontsize=10)
    fig.suptitle(title, fontsize=12)
    return fig


def augmentation_figure(images: torch.Tensor, labels: torch.Tensor, config: dict[str, Any], mean: list[float],
                        std: list[float], classes: tuple[str, ...] = CLASSES) -> tuple[Figure, str]:
    """The run's augmentation on a few training images, and a caption: its own pipeline file when it
    trained with one; else the batched policy beside, with AugMix, the policy followed by AugMix,
    or else the same policy run by albumentations (when installed and the policy can be written as
    a pipeline), the same images through both."""
    aug = aug_config(config)
    if config.get("aug_pipeline"):
        from ..data.pipeline import PipelineError, load_pipeline

        try:
            pipeline = load_pipeline(config["aug_pipeline"], images)
        except PipelineError as e:
            raise CheckpointError(str(e)) from None
        blocks = [("pipeline", pipeline_draws(images, pipeline, 7))]
        text = f"the run's albumentations pipeline {config['aug_pipeline']}"
        return plot_augmentations(images, labels, blocks, f"Training augmentation: {text}", classes), text
    blocks = [("batched", policy_draws(images, aug, mean, std, 4))]
    text = f"policy '{aug.policy}': {describe_policy(aug)}"
    if aug.augmix != "off":
        blocks.append(("+AugMix", policy_draws(images, aug, mean, std, 4, with_augmix=True)))
        text += "; left the policy's transforms alone, right followed by AugMix"
    else:
        try:
            from ..data.pipeline import PipelineError, policy_pipeline

            pipeline = policy_pipeline(aug, tuple(255 * m for m in mean), images.shape[-1])
            blocks.append(("albumentations", pipeline_draws(images, pipeline, 4)))
            text += "; left the batched version on the training device, right the same policy through albumentations"
        except PipelineError:  # not installed, or a policy it cannot express
            pass
    return plot_augmentations(images, labels, blocks, "Training augmentation\n" + textwrap.fill(text, 100),
                              classes), text


def plot_gradcam(images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, cam_pred: torch.Tensor,
                 cam_true: torch.Tensor, layer: str, mistakes: bool, classes: tuple[str, ...] = CLASSES) -> Figure:
    n = len(images)
    fig = Figure(figsize=(n * 1.75 + 1.2, 6.2), layout="constrained")
    axes = fig.subplots(3, n, squeeze=False)
    rows = [(None, "image"), (cam_pred, "Grad-CAM for\nthe predicted class"),
            (cam_true, "Grad-CAM for\nthe true class")]
    for c in range(n):
        for r, (cam, label) in enumerate(rows):
            ax = axes[r, c]
            ax.imshow(_image(images, c), interpolation="nearest", extent=(0, 32, 32, 0))
            if cam is not None:
                ax.imshow(cam[c].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1, extent=(0, 32, 32, 0))
            _bare(ax)
            if c == 0:
                ax.set_ylabel(label, fontsize=10)
        axes[0, c].set_title(f"true: {classes[labels[c]]}\npred: {classes[preds[c]]}", fontsize=9.5)
    scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap="jet")
    fig.colorbar(scale, ax=axes[1:, :].ravel().tolist(), shrink=0.9, label="relative importance")
    kind = "misclassified" if mistakes else "correctly classified (there are no mistakes)"
    fig.suptitle(f"Grad-CAM on layer {layer}: the regions that drove each class score, {kind} test images")
    return fig


# ---------------------------------------------------------------------------- HTML


def html_table(rows: list[list[Any]], header: list[str] | None = None) -> str:
    def cell(v: Any, tag: str) -> str:
        text = f"{v:,.4g}" if isinstance(v, float) else str(v)
        return f"<{tag}>{html.escape(text)}</{tag}>"

    head = "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _flatten(config: dict[str, Any], prefix: str = "") -> list[list[Any]]:
    rows = []
    for k, v in config.items():
        if isinstance(v, dict):
            rows += _flatten(v, f"{prefix}{k}.")
        else:
            rows.append([prefix + k, v if isinstance(v, str) else json.dumps(v)])
    return rows


PAGE_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
.note { color: #555; } .scroll { max-height: 28em; overflow-y: auto; display: inline-block; }
"""


def render_html(title: str, facts: list[list[Any]], figures: list[tuple[str, str, bytes]],
                history: list[dict[str, float]], config: dict[str, Any]) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{PAGE_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>Written by tinycifar report on {time.strftime('%Y-%m-%d %H:%M')}. "
             "Self-contained: every image is embedded.</p>", "<h2>Summary</h2>", html_table(facts)]
    for heading, caption, png in figures:
        data = base64.b64encode(png).decode()
        parts.append(f"<h2>{html.escape(heading)}</h2><p>{caption}</p>"
                     f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{data}'>")
    if history:
        keys = list(history[0])
        rows = [[int(h[k]) if k == "epoch" else h[k] for k in keys] for h in history]
        parts += ["<h2>Metrics per epoch</h2><div class='scroll'>", html_table(rows, keys), "</div>"]
    parts += ["<h2>Configuration</h2>", html_table(_flatten(config), ["option", "value"]), "</body></html>"]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- the report


@dataclass
class RunEvaluation:
    """A run's checkpoint evaluated on its test set: what the report's figures are drawn from."""

    checkpoint: Path
    model: nn.Module  # NormalizedNet: takes 0..1 images
    state: dict[str, Any]
    test: Split
    probs: torch.Tensor  # (N, 10) softmax
    preds: torch.Tensor
    wrong: torch.Tensor  # indices of mistakes, most confident first
    tta: str  # the run's test-time augmentation views (flip when it reported none)
    probs_tta: torch.Tensor  # (N, 10) softmax of the logits averaged over the tta views

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.state.get("config", {}))


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, model: str | nn.Module | None = None,
                 allow_changed_source: bool = False) -> RunEvaluation:
    """The run's best.pt (last.pt when there is none) on its test set, in fp32.

    ``model`` names the network's code when it is the user's own; the test set comes from
    ``data``, the run's own data folder or $CIFAR10_ROOT (synthetic runs regenerate theirs).
    """
    checkpoint = pick_checkpoint(Path(run_dir))
    normalized, state = load_inference_model(checkpoint, model, allow_changed_source)
    test = run_split(dict(state.get("config", {})), train=False, data=data)
    probs = test_probabilities(normalized, test.images)
    preds = probs.argmax(1)
    wrong = (preds != test.labels).nonzero().flatten()
    wrong = wrong[probs[wrong, preds[wrong]].argsort(descending=True)]  # most confident mistakes first
    config = state.get("config", {})
    tta = config.get("tta_views", "flip") if config.get("tta") else "flip"
    return RunEvaluation(checkpoint, normalized, state, test, probs, preds, wrong, tta,
                         test_probabilities(normalized, test.images, tta=tta))


def calibration_curves(ev: RunEvaluation) -> list[tuple[str, torch.Tensor]]:
    """The reliability bins of the plain predictions and of the TTA ones."""
    return [("no TTA", calibration_bins(ev.probs, ev.test.labels)),
            (f"TTA ({ev.tta})", calibration_bins(ev.probs_tta, ev.test.labels))]


def describe_calibration(curves: list[tuple[str, torch.Tensor]]) -> str:
    """'ECE 1.23% (no TTA), 2.34% (TTA (flip)); over-confident by 0.5 points' and the like."""
    eces = ", ".join(f"{expected_calibration_error(bins):.2f}% ({name})" for name, bins in curves)
    gaps = [mean_overconfidence(bins) for _, bins in curves]
    lean = ("over-confident" if min(gaps) > 0 else "under-confident" if max(gaps) < 0 else "mixed")
    return (f"ECE {eces}; mean confidence minus accuracy "
            + ", ".join(f"{g:+.2f} points" for g in gaps) + f" ({lean})")


def mistakes_figure(ev: RunEvaluation, count: int = GALLERY) -> Figure:
    return plot_gallery(ev.test.images, ev.test.labels, ev.probs, ev.wrong[:count].tolist(), len(ev.wrong),
                        classes_of(ev.state))


def gradcam_figure(ev: RunEvaluation, cam_layer: str | None = None) -> tuple[Figure, str, nn.Module, tuple]:
    """Grad-CAM for the predicted and the true class of the most confident mistakes (or of hits
    when there are none); returns the figure, the layer's name, the layer and its output shape."""
    net = ev.model.model
    try:
        layer, shape = gradcam_layer(net, cam_layer)
    except ValueError as e:
        raise CheckpointError(f"{ev.checkpoint}: {e}") from None
    labels, preds = ev.test.labels, ev.preds
    cam_idx = ev.wrong[:CAM_IMAGES] if len(ev.wrong) else (preds == labels).nonzero().flatten()[:CAM_IMAGES]
    x = to_unit_float(ev.test.images[cam_idx])
    module = net.get_submodule(layer)
    cam_pred = upsample_cam(grad_cam(ev.model, module, x, preds[cam_idx]))
    cam_true = upsample_cam(grad_cam(ev.model, module, x, labels[cam_idx]))
    fig = plot_gradcam(ev.test.images[cam_idx], labels[cam_idx], preds[cam_idx], cam_pred, cam_true, layer,
                       bool(len(ev.wrong)), classes_of(ev.state))
    return fig, layer, module, shape


def corruption_section(run_dir: Path) -> list[tuple[str, str, bytes]]:
    """The heat map of ``tinycifar eval --corruptions``, when it was run on this run's checkpoint."""
    png, data = run_dir / "corruptions.png", run_dir / "corruptions.json"
    if not (png.is_file() and data.is_file()):
        return []
    try:
        result = json.loads(data.read_text())
        caption = (f"Test accuracy under {len(result['accuracy'])} CIFAR-10-C corruptions at severities "
                   f"{', '.join(map(str, result['severities']))} (<code>tinycifar eval --corruptions</code>): "
                   f"mean {result['mean_corruption_accuracy']:.2f}% against {result['clean']:.2f}% clean.")
    except (ValueError, KeyError, TypeError):
        return []
    return [("Accuracy under common corruptions", caption, png.read_bytes())]


def write_report(run_dir: str | Path, data: str | Path | None = None, model: str | nn.Module | None = None,
                 allow_changed_source: bool = False, cam_layer: str | None = None) -> Path:
    """Write the figures and ``report.html`` into ``run_dir``; returns the page's path.

    See ``evaluate_run`` for ``data``, ``model`` and ``allow_changed_source``; ``cam_layer``
    overrides Grad-CAM's automatic choice of layer.
    """
    run_dir = Path(run_dir)
    ev = evaluate_run(run_dir, data, model, allow_changed_source)
    checkpoint, state, config, preds, labels = ev.checkpoint, ev.state, ev.config, ev.preds, ev.test.labels
    history = read_history(run_dir, state)
    classes = classes_of(state)
    n = len(classes)
    confusion = torch.bincount(labels * n + preds, minlength=n * n).view(n, n).numpy()

    aug = aug_config(config)
    train_split = run_split(config, train=True, data=data)
    pick = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(0))[:6]

    accuracy = 100 * float((preds == labels).float().mean())
    trained_in = run_precision(run_dir)
    curves = calibration_curves(ev)
    with matplotlib.rc_context(STYLE):
        cam_figure, layer, module, shape = gradcam_figure(ev, cam_layer)
        aug_figure, aug_text = augmentation_figure(train_split.images[pick], train_split.labels[pick], config,
                                                   state["mean"], state["std"], classes)
        figures = [
            ("curves.png", "Learning curves",
             "Loss and accuracy per epoch, as in metrics.csv. Training numbers are measured on augmented "
             "batches while the weights change, so they are not directly comparable with the test numbers.",
             plot_curves(history, float(config.get("label_smoothing", 0.0)))),
            ("misclassified.png", "Misclassified test images",
             "The test images the network got wrong with the highest confidence, enlarged with nearest-neighbour "
             "interpolation (each square is one of the 32x32 pixels). Confidence is the softmax probability "
             "of the predicted class.", mistakes_figure(ev)),
            ("confusion_matrix.png", "Confusion matrix",
             "Rows are true classes, columns predicted classes; off-diagonal cells show which classes are "
             "confused with which.", plot_confusion(confusion, classes)),
            ("reliability.png", "Calibration",
             f"Reliability diagrams over {CALIBRATION_BINS} equal-width confidence bins: when the network says "
             "90%, is it right 90% of the time? Bars below the diagonal are over-confidence. "
             f"{describe_calibration(curves)}. The expected calibration error (ECE) weights each bin's gap by "
             "its share of the test images.", plot_reliability(curves)),
            ("per_class_accuracy.png", "Per-class accuracy",
             "Share of each class's test images classified correctly; the dashed line is the overall accuracy.",
             plot_per_class(confusion, classes)),
            ("augmentations.png", "Augmented training samples",
             f"Six training images (first column) and independent draws of {html.escape(aug_text)}. Images are "
             "un-normalized for display; erased holes are filled with the dataset's mean colour.", aug_figure),
            ("gradcam.png", "Grad-CAM",
             f"Grad-CAM (gradient-weighted class activation maps) on layer <code>{html.escape(layer)}</code> "
             f"({html.escape(type(module).__name__)}, output {shape[0]} channels at {shape[1]}x{shape[2]}): "
             f"{layer_reason(cam_layer is not None)} Red marks the regions that raise the class score most; "
             "each map is scaled to its own maximum and upsampled bilinearly.", cam_figure),
        ]
    rendered = [(heading, caption, _png(fig, run_dir / name)) for name, heading, caption, fig in figures]
    rendered += corruption_section(run_dir)

    tested = [h for h in history if h.get("test_acc") is not None]
    best = max(tested, key=lambda h: h["test_acc"]) if tested else None
    facts = [["run folder", str(run_dir)], ["model", f"{state['model']} ({state.get('params', 0):,} parameters)"],
             ["checkpoint", f"{checkpoint.name} (after epoch {state.get('epoch', '?')})"],
             ["test accuracy of this checkpoint", f"{accuracy:.2f}% on {len(labels):,} images, in fp32"
                                                  + (f" (training evaluated in {trained_in})" if trained_in else "")],
             ["epochs finished", f"{len(history)} of {config.get('epochs', '?')}"]]
    if best:
        facts.append(["best test accuracy", f"{best['test_acc']:.2f}% at epoch {best['epoch']:.0f}"])
        facts.append(["training time", f"{history[-1].get('train_seconds_total', 0):.1f} s"])
    facts.append(["calibration (15 bins, fp32)", describe_calibration(curves)])
    facts += [["dataset", config.get("dataset", "?")], ["augmentation", f"{aug.policy}: {describe_policy(aug)}"],
              ["Grad-CAM layer", f"{layer} ({shape[0]}x{shape[1]}x{shape[2]})"]]
    page = render_html(f"tinycifar run report: {run_dir.name}", facts, rendered, history, config)
    out = run_dir / "report.html"
    atomic_write_bytes(out, lambda f: f.write(page.encode()))
    return out
