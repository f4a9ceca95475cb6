"""Classify image files with a checkpoint: ``tinycifar predict --checkpoint FILE IMAGE_OR_FOLDER...``.

Images are decoded and shrunk exactly as training on an image folder does it
(``tinycifar.data.images``): the input the exported ONNX and TorchScript models take as well
(see ``tinycifar.serving.inference.NormalizedNet``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError
from ..data import classes_of, image_size_of
from ..data.images import ImageLoadError, image_extensions, load_image
from .inference import folded, load_inference_model

BATCH = 256


def expand_inputs(paths: list[str | Path]) -> Iterator[tuple[Path, str | None]]:
    """(file, None) for each file to classify, or (path, error) for an input that gives none.

    Named files are always tried whatever their extension; folders are walked recursively
    for files with an image extension, in sorted order.
    """
    extensions = image_extensions()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                yield path, "folder holds no image files"
            for p in found:
                yield p, None
        else:
            yield path, None


@dataclass
class Prediction:
    file: str
    top: list[tuple[str, float]]  # (class, probability), most likely first

    def to_dict(self) -> dict:
        return {"file": self.file, "top_k": [{"class": c, "probability": round(p, 6)} for c, p in self.top]}

    def line(self) -> str:
        return f"{self.file}: " + ", ".join(f"{c} {p:.3f}" for c, p in self.top)


@torch.no_grad()
def classify(model: torch.nn.Module, images: torch.Tensor, top_k: int,
             classes: tuple[str, ...]) -> list[list[tuple[str, float]]]:
    """Top-k (class, probability) for each image of a 0..1 batch."""
    probs = model(images).softmax(1)
    values, indices = probs.topk(top_k, dim=1)
    return [[(classes[i], float(v)) for v, i in zip(vs, ix, strict=True)]
            for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)]


def predict_files(checkpoint: str | Path, paths: list[str | Path], top_k: int | None = None, on_error=None,
                  model: str | torch.nn.Module | None = None, allow_changed_source: bool = False,
                  ) -> Iterator[Prediction]:
    """Predictions for every usable image, in input order, batch by batch (memory stays bounded).

    ``on_error(path, message)`` is called for each unusable input; the others go on. ``model``
    names the network's code for a checkpoint of the user's own network.
    """
    network, state = load_inference_model(checkpoint, model, allow_changed_source)
    classes, size = classes_of(state), image_size_of(state)
    model = folded(network, size)  # as serve's PyTorch engine runs it
    top_k = min(3, len(classes)) if top_k is None else top_k
    if not 1 <= top_k <= len(classes):
        raise ConfigError(f"--top-k: expected 1 to {len(classes)} (the checkpoint's classes), got {top_k}")
    batch: list[tuple[Path, torch.Tensor]] = []

    def flush() -> Iterator[Prediction]:
        if batch:
            tops = classify(model, torch.stack([t for _, t in batch]), top_k, classes)
            yield from (Prediction(str(p), top) for (p, _), top in zip(batch, tops, strict=True))
            batch.clear()

    for path, problem in expand_inputs(paths):
        if problem is None:
            try:
                batch.append((path, load_image(path, size)))
            except ImageLoadError as e:
                problem = str(e)
        if problem is not None and on_error is not None:
            on_error(path, problem)
        if len(batch) >= BATCH:
            yield from flush()
    yield from flush()


def run(checkpoint: str | Path, paths: list[str | Path], top_k: int | None = None, as_json: bool = False,
        model: str | None = None, allow_changed_source: bool = False) -> int:
    """The ``predict`` command: prints predictions, one error line per bad input; 1 if any failed."""
    failures = 0

    def report(path: Path, message: str) -> None:
        nonlocal failures
        failures += 1
        print(f"tinycifar predict: {path}: {message}", file=sys.stderr)

    results = predict_files(checkpoint, paths, top_k, on_error=report, model=model,
                            allow_changed_source=allow_changed_source)
    if as_json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            print(r.line(), flush=True)
    return 1 if failures else 0
