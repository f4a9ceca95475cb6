"""Model anatomy: receptive field by walking the layers, and a per-layer summary table.

The walk follows convolutions and poolings in the order they are registered, which is
the order they run in for our networks (residual identity paths add nothing). For each
layer: rf_out = rf_in + (effective_kernel - 1) * jump_in, jump_out = jump_in * stride,
with effective_kernel = dilation * (kernel - 1) + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RFStep:
    name: str
    kernel: int
    stride: int
    dilation: int
    jump: int  # distance in input pixels between neighbouring outputs
    rf: int


def _pair0(v) -> int:
    return v[0] if isinstance(v, tuple) else v


def receptive_field_walk(model: nn.Module) -> list[RFStep]:
    steps: list[RFStep] = []
    rf, jump = 1, 1
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s = _pair0(m.kernel_size), _pair0(m.stride)
            d = _pair0(m.dilation) if hasattr(m, "dilation") else 1
            rf += (d * (k - 1)) * jump
            jump *= s
            steps.append(RFStep(name, k, s, d, jump, rf))
    return steps


def receptive_field(model: nn.Module) -> int:
    steps = receptive_field_walk(model)
    return steps[-1].rf if steps else 1


@torch.no_grad()
def _positive_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.uniform_(0.1, 1.0)
            if m.bias is not None:
                m.bias.zero_()


def empirical_receptive_field(model: nn.Module, size: int = 192) -> int:
    """Extent of input pixels that reach one central output of ``model.features``.

    Weights are made positive and the input all ones, so no gradient cancels: every
    pixel inside the receptive field gets a non-zero gradient, every one outside zero.
    """
    import copy

    probe = copy.deepcopy(model).double().eval()
    _positive_init(probe)
    x = torch.ones(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    fmap = probe.features(x)
    h, w = fmap.shape[-2:]
    fmap[0, :, h // 2, w // 2].sum().backward()
    rows = (x.grad[0].abs().sum((0, 2)) > 0).nonzero()
    return int(rows.max() - rows.min() + 1)


@dataclass
class LayerRow:
    name: str
    kind: str
    out_shape: tuple[int, ...]
    params: int
    macs: int
    rf: int | None


def layer_table(model: nn.Module, input_size: int = 32) -> list[LayerRow]:
    """One row per leaf layer: output shape, parameters, multiply-accumulates, receptive field."""
    rf_by_name = {s.name: s.rf for s in receptive_field_walk(model)}
    rows: list[LayerRow] = []
    hooks = []

    def hook(name: str):
        def record(m: nn.Module, inputs, output):
            params = sum(p.numel() for p in m.parameters(recurse=False))
            macs = 0
            if isinstance(m, nn.Conv2d):
                macs = output.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            elif isinstance(m, nn.Linear):
                macs = m.in_features * m.out_features
            rows.append(LayerRow(name, type(m).__name__, tuple(output.shape[1:]), params, macs,
                                 rf_by_name.get(name)))
        return record

    for name, m in model.named_modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return rows


def model_summary(model: nn.Module) -> dict:
    rows = layer_table(model)
    return {
        "model": getattr(model, "name", type(model).__name__),
        "params": sum(p.numel() for p in model.parameters()),
        "macs": sum(r.macs for r in rows),
        "receptive_field": receptive_field(model),
        "layers": [r.__dict__ | {"out_shape": list(r.out_shape)} for r in rows],
    }


def format_summary(summary: dict) -> str:
    header = f"{'layer':<28}{'type':<14}{'output':>14}{'params':>10}{'MACs':>12}{'RF':>5}"
    lines = [header, "-" * len(header)]
    for r in summary["layers"]:
        shape = "x".join(map(str, r["out_shape"]))
        rf = "" if r["rf"] is None else str(r["rf"])
        lines.append(f"{r['name']:<28}{r['kind']:<14}{shape:>14}{r['params']:>10,}{r['macs']:>12,}{rf:>5}")
    lines.append("-" * len(header))
    lines.append(f"{summary['model']}: {summary['params']:,} parameters, {summary['macs']:,} MACs per image, "
                 f"receptive field {summary['receptive_field']}")
    return "\n".join(lines)
