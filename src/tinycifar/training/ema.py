"""The moving average of the weights, updated without reading anything back from the device."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def warmup_weight(n_averaged: int, decay: float) -> float:
    """How far an update moves the average towards the model: 1 - min(decay, (1 + n) / (10 + n)).

    With a fixed decay, a short run's average keeps a large share of the random initial weights
    (0.99 over 195 steps: 14%); the ramp lets it follow the early weights and reach ``decay``
    after a few hundred steps. Computed in float32 as the tensor formula it replaces was, so runs
    stay bit for bit what they were.
    """
    ramp = np.float32(1 + n_averaged) / np.float32(10 + n_averaged)
    return float(np.float32(1) - min(ramp, np.float32(decay)))


class WarmupEMA(AveragedModel):
    """``AveragedModel`` (weights and buffers) with the warm-up decay of ``warmup_weight``.

    The stock update compares its step counter with 0 and hands the averaging a 0-dim tensor
    weight: host reads every step, which stall a GPU's queue. Here the count is a Python int
    (read from the state only by ``load_state_dict``, on resume) and the weight a Python float;
    the ``n_averaged`` buffer is still kept, so checkpoints are the stock ones.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, use_buffers=True)
        self.decay = decay
        self._count = 0  # n_averaged, mirrored on the host

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().load_state_dict(state_dict, *args, **kwargs)
        self._count = int(self.n_averaged)
        return result

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        pairs = zip(itertools.chain(self.module.parameters(), self.module.buffers()),
                    itertools.chain(model.parameters(), model.buffers()), strict=True)
        floats, counters = [], []  # counters such as num_batches_tracked: take the model's
        for ours, theirs in pairs:
            (floats if ours.is_floating_point() and self._count > 0 else counters).append((ours, theirs.detach()))
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], warmup_weight(self._count, self.decay))
        if counters:
            torch._foreach_copy_([a for a, _ in counters], [b for _, b in counters])
        self._count += 1
        self.n_averaged.fill_(self._count)
