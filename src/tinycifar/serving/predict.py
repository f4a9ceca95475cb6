"""Classify image files with a checkpoint: ``tinycifar predict --checkpoint FILE IMAGE_OR_FOLDER...``.

How an image becomes the network's 32x32 input (the same in every case):

1. Only the header is read first; an image of more than ``MAX_PIXELS`` (40 megapixels)
   is refused before any pixel is decoded, and Pillow's DecompressionBombWarning is an
   error, so a small file that declares huge dimensions cannot exhaust memory. JPEGs are
   decoded at a reduced scale (``draft``) since only 32x32 pixels survive anyway.
2. The EXIF orientation is applied, so phone photos are upright.
3. Colour: transparent pixels (RGBA, LA, palette with transparency) are composited on
   white, as a browser shows them; dropping alpha instead would reveal whatever colour the
   file stores under transparent pixels, often black. 16-bit images (I;16, I) map their
   full 0..65535 range onto 0..255; grayscale is copied into all three channels.
4. Geometry: the largest centred square is cropped (CIFAR-10 photos are square with the
   object in the middle; squashing would distort shapes), then resized to 32x32 with
   bicubic resampling, which Pillow antialiases when shrinking.

The result is float RGB in 0..1, NCHW: the input the exported ONNX and TorchScript models
take as well (see ``tinycifar.inference.NormalizedNet``).
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..data import CLASSES
from .inference import load_inference_model

MAX_PIXELS = 40_000_000
SIZE = 32
BATCH = 256


class ImageLoadError(Exception):
    """One file cannot be used as an image; the message says why (the caller adds the name)."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, as the module docstring describes."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(values * (255 / 65535), 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(values * 255, 0, 255).round().astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _center_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def load_image(path: str | Path, size: int = SIZE) -> torch.Tensor:
    """One image file as a float RGB tensor (3, size, size) in 0..1; ImageLoadError if unusable."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageLoadError(f"{w}x{h} pixels is more than the {MAX_PIXELS:,} allowed "
                                         "(decompression bomb?)")
                if w == 0 or h == 0:
                    raise ImageLoadError(f"image has no pixels ({w}x{h})")
                if img.format == "JPEG":
                    img.draft("RGB", (2 * size, 2 * size))
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
        except ImageLoadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageLoadError(f"refused as a decompression bomb ({e})") from None
        except FileNotFoundError:
            raise ImageLoadError("no such file") from None
        except IsADirectoryError:
            raise ImageLoadError("is a folder") from None
        except Image.UnidentifiedImageError:
            raise ImageLoadError("not an image Pillow can read (empty, or not an image format)") from None
        except Exception as e:  # noqa: BLE001 - a damaged file can fail anywhere inside a decoder plugin
            raise ImageLoadError(f"cannot decode ({type(e).__name__}: {e})") from None
    small = _center_square(rgb).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(small, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


def image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


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
def classify(model: torch.nn.Module, images: torch.Tensor, top_k: int) -> list[list[tuple[str, float]]]:
    """Top-k (class, probability) for each image of a 0..1 batch."""
    probs = model(images).softmax(1)
    values, indices = probs.topk(top_k, dim=1)
    return [[(CLASSES[i], float(v)) for v, i in zip(vs, ix, strict=True)]
            for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)]


def predict_files(checkpoint: str | Path, paths: list[str | Path], top_k: int = 3, on_error=None,
                  model: str | torch.nn.Module | None = None, allow_changed_source: bool = False,
                  ) -> Iterator[Prediction]:
    """Predictions for every usable image, in input order, batch by batch (memory stays bounded).

    ``on_error(path, message)`` is called for each unusable input; the others go on. ``model``
    names the network's code for a checkpoint of the user's own network.
    """
    model, _ = load_inference_model(checkpoint, model, allow_changed_source)
    batch: list[tuple[Path, torch.Tensor]] = []

    def flush() -> Iterator[Prediction]:
        if batch:
            tops = classify(model, torch.stack([t for _, t in batch]), top_k)
            yield from (Prediction(str(p), top) for (p, _), top in zip(batch, tops, strict=True))
            batch.clear()

    for path, problem in expand_inputs(paths):
        if problem is None:
            try:
                batch.append((path, load_image(path)))
            except ImageLoadError as e:
                problem = str(e)
        if problem is not None and on_error is not None:
            on_error(path, problem)
        if len(batch) >= BATCH:
            yield from flush()
    yield from flush()


def run(checkpoint: str | Path, paths: list[str | Path], top_k: int = 3, as_json: bool = False,
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
