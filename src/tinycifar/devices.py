"""Where a network computes, so that code handed a network on any device feeds it there."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter, else of its first buffer, else the CPU.

    The API takes networks wherever they are (a ``fit`` on a GPU leaves its moving average there):
    every batch built on the CPU goes here before the forward pass.
    """
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def module_memory_format(module: nn.Module) -> torch.memory_format:
    """channels_last when a 4-d parameter is laid out so (and not also plainly contiguous, as 1x1
    kernels are either way), else the default layout: what ``module.to(memory_format=...)`` restores."""
    for p in module.parameters():
        if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous():
            return torch.channels_last
    return torch.contiguous_format
