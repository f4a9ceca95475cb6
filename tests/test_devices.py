"""Where a network computes: the device and memory format the API reads off a module."""

from __future__ import annotations

import torch
from torch import nn

from tinycifar.devices import module_device, module_memory_format


class BufferOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(1, device="meta"))


def test_the_device_is_the_first_parameters_else_a_buffers_else_the_cpu():
    assert module_device(nn.Conv2d(3, 4, 3).to("meta")) == torch.device("meta")
    assert module_device(BufferOnly()) == torch.device("meta")
    assert module_device(nn.ReLU()) == torch.device("cpu")


def test_the_memory_format_is_channels_last_only_when_a_kernel_is_laid_out_so():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3))
    assert module_memory_format(net) == torch.contiguous_format
    assert module_memory_format(net.to(memory_format=torch.channels_last)) == torch.channels_last
    assert module_memory_format(nn.Conv2d(3, 4, 1).to(memory_format=torch.channels_last)) == torch.contiguous_format
