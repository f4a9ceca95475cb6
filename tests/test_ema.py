"""The weights' moving average: the warm-up ramp, the stock checkpoint state, and no host reads per update."""

from __future__ import annotations

import torch
from host_reads import HostReads
from torch import nn

from tinycifar.training.ema import WarmupEMA, warmup_weight


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_the_decay_ramps_up_from_the_first_updates():
    """A fresh average follows the model (decay 1/10, 2/11, ...) and settles at the set decay."""
    assert warmup_weight(0, 0.99) == float(torch.tensor(1.0) - torch.tensor(1 / 10))
    assert warmup_weight(1, 0.99) == float(1 - torch.clamp(torch.tensor(2) / torch.tensor(11), max=0.99))
    assert warmup_weight(10_000, 0.99) == float(1 - torch.tensor(0.99))


def test_first_update_copies_then_each_moves_by_the_ramps_weight():
    model = net()
    ema = WarmupEMA(model, 0.99)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema.update_parameters(model)  # the first copies
    assert torch.equal(ema.module[0].weight, model[0].weight)
    with torch.no_grad():
        model[0].weight.fill_(2.0)
    model[1].num_batches_tracked.fill_(7)
    ema.update_parameters(model)  # n = 1: decay 2/11
    assert torch.allclose(ema.module[0].weight, torch.full_like(model[0].weight, 1 + warmup_weight(1, 0.99)))
    assert ema.module[1].num_batches_tracked.item() == 7  # counters are taken, not averaged
    assert ema.n_averaged.item() == 2


def test_a_loaded_state_continues_the_ramp_where_it_was():
    model = net()
    saved = WarmupEMA(model, 0.99)
    for _ in range(5):
        saved.update_parameters(model)
    resumed = WarmupEMA(net(), 0.99)
    resumed.update_parameters(model)  # counts 1 before the state arrives
    resumed.load_state_dict(saved.state_dict())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    saved.update_parameters(model)
    resumed.update_parameters(model)
    assert torch.equal(resumed.module[0].weight, saved.module[0].weight) and resumed.n_averaged.item() == 6


def test_updates_read_nothing_back_from_the_device():
    model = net()
    ema = WarmupEMA(model, 0.99)
    with HostReads() as reads:
        for _ in range(4):
            ema.update_parameters(model)
    assert reads.count == 0
