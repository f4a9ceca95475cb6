"""Dispatch modes that record what runs: the operations that make the host wait for the device (on a
GPU each one waits for the device's queue to drain, a host sync, so a training step must have none),
and the names of every operator (a folded network must run no batch norm)."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Records ``.item()``/``int()``/``bool()`` of tensors (``_local_scalar_dense``), ``nonzero``
    (boolean indexing and ``nonzero()``: its output size is data-dependent), and ``torch.tensor(data)``
    (``lift_fresh``: on a GPU, a blocking copy of host data that waits for the queue as a read does),
    by operation name."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.item.default, torch.ops.aten.lift_fresh.default}

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


class OperatorNames(TorchDispatchMode):
    """The ATen operators that run inside it: their names, and how often each ran."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def names(self) -> set[str]:
        return set(self.counts)

    def count(self, part: str) -> int:
        """Calls of the operators whose name holds ``part``."""
        return sum(n for name, n in self.counts.items() if part in name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))
