"""The data side of the flow: datasets on disk -> splits in memory -> device loaders -> augmentation.

``cifar10``: find, check, safely read and download CIFAR-10; ``loader``: the split on the training
device, batched and normalized there; ``augment``: batched augmentation policies on that device.
"""

from typing import Any

from .cifar10 import CLASSES, DatasetError, Split, load_cifar10, load_split, synthetic_cifar10

__all__ = ["CLASSES", "DatasetError", "Split", "classes_of", "image_size_of", "load_cifar10", "load_split",
           "synthetic_cifar10"]


def classes_of(state: dict[str, Any]) -> tuple[str, ...]:
    """A checkpoint's class names: its own (an image-folder run's), else CIFAR-10's."""
    return tuple(state.get("classes") or CLASSES)


def image_size_of(state: dict[str, Any]) -> int:
    """The side of the images a checkpoint's network was trained on."""
    return int((state.get("config") or {}).get("image_size", 32))
