"""Where a network computes, so that code handed a network on any device feeds it there; and how the CPU
keeps the memory a training step frees."""

from __future__ import annotations

import ctypes
import itertools
import platform
import sys

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


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # the most glibc's own adaptive threshold reaches on 64-bit
TRIM_THRESHOLD = 1 << 30  # at most this much freed memory stays with the process


def keep_freed_memory() -> bool:
    """Have glibc keep the memory a CPU training step frees for the next step, instead of giving it
    back to the kernel and faulting it in again, zeroed page by page.

    By default glibc returns freed memory at the top of its heap once it passes twice the largest
    block it has mmap'd: a 32x32 fastnet step at batch 128 frees ~37 MB that way and took ~4,000-11,000
    page faults to get it back, every step (a step 0.91x without them; benchmarks/README.md, "Speed
    IV"). Setting the trim threshold alone would switch off glibc's adaptive mmap threshold and mmap
    every block of 128 KiB or more, so both are set: blocks under 32 MiB come from the heap, and up
    to 1 GiB freed stays with the process until it exits. Process-wide, once; a no-op off glibc.
    Returns whether it applied.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
