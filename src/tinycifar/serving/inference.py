"""What predict, export, report and the benchmark share: the inference model and a run's data.

The inference contract is one module that takes float RGB in 0..1, NCHW, and returns
logits. Normalization by the training set's mean and std lives inside it, so a user
(or an ONNX runtime) feeds decoded images directly and cannot get the statistics wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..data import Split, load_split, synthetic_cifar10
from ..devices import module_device
from ..models.layers import fold_batch_norms


class NormalizedNet(nn.Module):
    """``model((x - mean) / std)`` for x in 0..1; mean and std are buffers, so they export with it.
    They are made on the network's device (a GPU after a GPU ``fit``), so the two never disagree."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        device = module_device(model)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def load_inference_model(path: str | Path, model: str | nn.Module | None = None,
                         allow_changed_source: bool = False) -> tuple[NormalizedNet, dict[str, Any]]:
    """The checkpoint's network wrapped with its normalization, in eval mode, and the raw state.

    ``model`` names the network's code when it is the user's own (see ``model_from_checkpoint``).
    """
    state = load_checkpoint(path)
    return inference_model(state, path, model, allow_changed_source), state


def inference_model(state: dict[str, Any], path: str | Path, model: str | nn.Module | None = None,
                    allow_changed_source: bool = False) -> NormalizedNet:
    """A loaded checkpoint's network wrapped with its normalization, in eval mode."""
    network = model_from_checkpoint(state, path, model, allow_changed_source)
    return NormalizedNet(network, state["mean"], state["std"]).eval()


def folded(model: NormalizedNet, size: int = 32) -> NormalizedNet:
    """``model`` with each batch norm folded into its convolution, as predict and serve run it: the same
    answers to float rounding, fewer passes over the maps. Checked on a few random images of the
    network's input size, so a forward that the fold would change keeps its norms."""
    probe = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    return fold_batch_norms(model, probe=probe.to(module_device(model)))


def run_split(config: dict[str, Any], train: bool, data: str | Path | None = None) -> Split:
    """The split a run trained or tested on, rebuilt from its saved config.

    Synthetic runs regenerate their data with the run's seed and size; this mirrors
    ``train.load_data`` (a test checks that they agree). For CIFAR-10 the folder is ``data``,
    else the run's own ``data`` when it exists, else $CIFAR10_ROOT. Nothing is downloaded.
    """
    if config.get("dataset") == "folder":
        from ..data.folders import load_image_folders

        splits = load_image_folders(data or config["data"], int(config.get("image_size", 32)), quiet=True)
        return splits[0] if train else splits[1]
    if config.get("dataset") == "synthetic":
        size = int(config.get("synthetic_size", 2000))
        train_split, test_split = synthetic_cifar10(size, max(size // 4, 10), seed=int(config.get("seed", 0)))
        return train_split if train else test_split
    if data is None:
        saved = config.get("data")
        data = saved if saved and Path(saved).is_dir() else os.environ.get("CIFAR10_ROOT", "./data")
    return load_split(data, train=train, verify_md5=not config.get("allow_modified", False))


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) to float 0..1, the inference model's input."""
    return images.float().div_(255)
