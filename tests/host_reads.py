"""Counting the operations that read a tensor's value back to Python: on a GPU each one waits for the
device's queue to drain (a host sync), so a training step must have none."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Counts ``.item()``/``int()``/``bool()`` of tensors (``_local_scalar_dense``) and ``nonzero``
    (boolean indexing and ``nonzero()``: its output size is data-dependent), by operation name."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.item.default}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    @property
    def count(self) -> int:
        return len(self.seen)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))
