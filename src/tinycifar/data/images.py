"""Image files to network inputs: one decoding and shrinking for every command.

How an image file becomes the network's input, for ``predict``, ``serve`` and image-folder
training alike (32x32 unless a run asks for another size):

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

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_PIXELS = 40_000_000
SIZE = 32


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


def decode_image(path: str | Path, size: int = SIZE) -> torch.Tensor:
    """One image file as uint8 RGB (3, size, size); ImageLoadError if unusable."""
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
    return torch.from_numpy(np.asarray(small, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_image(path: str | Path, size: int = SIZE) -> torch.Tensor:
    """One image file as a float RGB tensor (3, size, size) in 0..1; ImageLoadError if unusable."""
    return decode_image(path, size).float().div_(255)


def image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}
