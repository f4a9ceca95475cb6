"""Where a network computes: the device and memory format the API reads off a module."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from tinycifar.devices import keep_freed_memory, module_device, module_memory_format


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


STEP_FAULTS = """
import resource, sys, torch
from torch.nn import functional as F
from tinycifar.models import create_model
from tinycifar.training.sgd import SGD
from tinycifar.training.train import tune_backends
if sys.argv[1] == "tuned":
    tune_backends(torch.device("cpu"))
torch.manual_seed(0)
model = create_model("fastnet").to(memory_format=torch.channels_last)
optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)  # as training steps
x, y = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (128,))
def step():
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
for _ in range(6):  # the heap grows to the step's size
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 12)
"""


def page_faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_cpu_training_keeps_the_memory_a_step_frees():
    assert keep_freed_memory()
    untuned, tuned = page_faults_per_step("default"), page_faults_per_step("tuned")
    # glibc gave ~37 MB back to the kernel every fastnet step at batch 128: thousands of page faults
    assert tuned < untuned / 3, (tuned, untuned)
