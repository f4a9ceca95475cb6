"""Albumentations pipelines: a user's own augmentation, per image in CPU worker processes.

The batched policies in ``augment`` run on the training device; a pipeline written with
albumentations (saved with ``A.save`` as JSON or YAML) runs here instead, image by image in a
standard ``torch.utils.data.DataLoader``, and its uint8 output is normalized on the device like
every other batch. ``policy_pipeline`` writes our own policies as such files, so both paths can
be compared image for image.

albumentations is an optional dependency (``pip install tinycifar[albumentations]``); nothing
here imports it until a pipeline is asked for.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .augment import AugmentConfig
from .cifar10 import Split
from .loader import DeviceLoader

# cv2's border constants for our border modes (see augment.BORDER_MODES)
CV2_BORDERS = {"zeros": 0, "border": 1, "reflection": 2, "reflect101": 4}


class PipelineError(ValueError):
    """An augmentation pipeline file cannot be used; the message names the file and the transform."""


def _albumentations(purpose: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its version check and deprecation notes
            import albumentations
    except ImportError:
        raise PipelineError(f"{purpose} needs albumentations: pip install 'tinycifar[albumentations]'") from None
    return albumentations


def policy_pipeline(aug: AugmentConfig, mean_pixels: tuple[float, float, float], size: int = 32):
    """Our batched policy ``aug`` as an albumentations ``Compose`` on uint8 HxWx3 images.

    ``mean_pixels``: the dataset mean on the 0..255 scale, the fill of holes and constant borders
    (our batched transforms fill with 0 after normalization, which is the same colour).
    """
    A = _albumentations("aug export")
    fill = tuple(float(m) for m in mean_pixels)
    if aug.alternate_flip:
        raise PipelineError("aug.alternate_flip: albumentations draws every image on its own; alternating flips "
                            "cannot be written as a pipeline")
    if aug.augmix != "off":
        raise PipelineError("aug.augmix: albumentations has no AugMix (and a pipeline cannot make the extra views "
                            "of its consistency loss); set aug.augmix=off to export the policy")
    transforms: list[Any] = []
    if aug.policy == "seed":
        hole = aug.dropout_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "ShiftScaleRotate is a special case of Affine"
            transforms = [
                A.HorizontalFlip(p=aug.flip),
                A.ShiftScaleRotate(shift_limit=aug.shift, scale_limit=aug.scale, rotate_limit=aug.rotate,
                                   border_mode=CV2_BORDERS[aug.border], fill=fill, p=aug.ssr_p),
                A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(hole, hole), hole_width_range=(hole, hole),
                                fill=fill, p=aug.dropout_p),
            ]
    elif aug.policy == "fast":
        if aug.cutout_size:
            raise PipelineError("aug.cutout_size: cutout lets holes cross the border, albumentations' CoarseDropout "
                                "keeps them inside; set aug.cutout_size=0 to export the fast policy")
        transforms = [A.HorizontalFlip(p=aug.flip)]
        if aug.translate_pad:
            transforms += [A.PadIfNeeded(size + 2 * aug.translate_pad, size + 2 * aug.translate_pad,
                                         border_mode=CV2_BORDERS["reflect101"]), A.RandomCrop(size, size)]
    return A.Compose(transforms)


def save_pipeline(pipeline, path: str | Path) -> None:
    """Write with albumentations' own serialization: YAML for .yaml/.yml, JSON otherwise."""
    A = _albumentations("aug export")
    path = Path(path)
    A.save(pipeline, str(path), data_format="yaml" if path.suffix in (".yaml", ".yml") else "json")


def load_pipeline(path: str | Path, sample: torch.Tensor):
    """Read a saved pipeline and check it on ``sample`` (uint8 N x 3 x H x W): every transform must
    keep the image's size and dtype, since batches are stacked and normalized after it."""
    A = _albumentations(f"--aug-pipeline {path}")
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"--aug-pipeline {path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipeline = A.load(str(path), data_format="yaml" if path.suffix in (".yaml", ".yml") else "json")
    except KeyError as e:
        raise PipelineError(f"--aug-pipeline {path}: unknown transform {e.args[0]!r} (not in albumentations "
                            f"{A.__version__})") from None
    except Exception as e:  # parse errors, bad arguments: albumentations raises many kinds
        raise PipelineError(f"--aug-pipeline {path}: not a loadable albumentations pipeline "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(pipeline, A.BaseCompose):
        raise PipelineError(f"--aug-pipeline {path}: holds a single {type(pipeline).__name__}, expected a Compose")
    check_pipeline(pipeline, path, sample)
    return pipeline


def check_pipeline(pipeline, path: Path, sample: torch.Tensor) -> None:
    """Run each transform (forced on, p=1) over the sample; name the first that breaks the images."""
    images = [to_hwc(img) for img in sample]
    for transform in pipeline.transforms:
        name = type(transform).__name__
        saved_p, transform.p = transform.p, 1.0
        try:
            outputs = [transform(image=img)["image"] for img in images]
        except Exception as e:
            raise PipelineError(f"--aug-pipeline {path}: transform {name} fails on a {images[0].shape} uint8 image "
                                f"({type(e).__name__}: {e})") from None
        finally:
            transform.p = saved_p
        for out, img in zip(outputs, images, strict=True):
            if not isinstance(out, np.ndarray) or out.shape != img.shape or out.dtype != np.uint8:
                got = f"{out.shape} {out.dtype}" if isinstance(out, np.ndarray) else type(out).__name__
                raise PipelineError(f"--aug-pipeline {path}: transform {name} turns a {img.shape} uint8 image into "
                                    f"{got}; a training pipeline must keep the size and dtype (resize and normalize "
                                    "are done by tinycifar)")
        images = outputs


def to_hwc(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


class PipelineDataset(torch.utils.data.Dataset):
    """uint8 images through the pipeline, one at a time (in a worker process)."""

    def __init__(self, split: Split, pipeline):
        self.images, self.labels, self.pipeline = split.images, split.labels, pipeline

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.pipeline(image=to_hwc(self.images[i]))["image"]
        return torch.from_numpy(out).permute(2, 0, 1), self.labels[i]


class PipelineLoader(DeviceLoader):
    """A ``DeviceLoader`` whose augmentation is an albumentations pipeline run by CPU workers.

    The sample order is the device loader's (seeded by seed and epoch); each worker seeds the
    pipeline from (seed, epoch, worker), so an epoch is the same on a resumed run.
    """

    def __init__(self, split: Split, batch_size: int, mean: list[float], std: list[float], pipeline,
                 workers: int = 2, **kwargs: Any):
        super().__init__(split, batch_size, mean, std, train=True, aug=None, **kwargs)
        self.dataset = PipelineDataset(split, pipeline)
        self.workers = workers

    def place(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """The split stays on the CPU, where the workers read it; only the batches go to the device."""
        return split.images, split.labels

    def _seed_pipeline(self, worker: int) -> None:
        info = torch.utils.data.get_worker_info()
        dataset = info.dataset if info is not None else self.dataset
        dataset.pipeline.set_random_seed((self.seed * 1_000_003 + self.epoch * 101 + worker) % 2**32)

    def batches(self, order: torch.Tensor | None = None) -> torch.utils.data.DataLoader:
        """The epoch's uint8 batches from the workers, in ``order`` (the epoch's by default), in pinned
        memory when they go to a GPU (so the copies run asynchronously)."""
        order = self.order() if order is None else order
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        if self.workers == 0:
            self._seed_pipeline(0)
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=order[:stop].tolist(), num_workers=self.workers,
            worker_init_fn=self._seed_pipeline if self.workers else None, pin_memory=self.device.type == "cuda")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order()
        for i, (images, labels) in enumerate(self.batches(order)):
            self.last_indices = order[i * self.batch_size : (i + 1) * self.batch_size]
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            yield self.finish(self.normalize(images)), labels
