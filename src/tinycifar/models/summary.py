"""Model anatomy: the receptive field along the network, and a per-layer summary table.

The field comes from ``graph.trace`` (one traced forward pass), so it is right for any
network: branches and residual paths included, functional calls too. For each spatial
operator: rf_out = rf_in + (effective_kernel - 1) * jump_in, jump_out = jump_in * stride,
with effective_kernel = dilation * (kernel - 1) + 1; where paths meet, the largest wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..devices import module_device
from .graph import SPATIAL_KINDS, empirical_receptive_field, trace

__all__ = ["RFStep", "LayerRow", "empirical_receptive_field", "format_summary", "layer_table", "model_summary",
           "receptive_field", "receptive_field_walk"]


@dataclass
class RFStep:
    name: str
    kernel: int
    stride: int
    dilation: int
    jump: int  # distance in input pixels between neighbouring outputs
    rf: int


def receptive_field_walk(model: nn.Module, input_size: int = 32) -> list[RFStep]:
    """Each convolution and pooling in the order it runs, with the field after it."""
    return [RFStep(op.module, op.kernel, op.stride, op.dilation, op.jump, op.rf)
            for op in trace(model, input_size).ops if op.kind in SPATIAL_KINDS]


def receptive_field(model: nn.Module, input_size: int = 32) -> int:
    return trace(model, input_size).receptive_field


@dataclass
class LayerRow:
    name: str
    kind: str
    out_shape: tuple[int, ...]
    params: int
    macs: int
    rf: int | None


def layer_table(model: nn.Module, input_size: int = 32, walk: list[RFStep] | None = None) -> list[LayerRow]:
    """One row per leaf layer: output shape, parameters, multiply-accumulates, receptive field
    (from ``walk`` when the caller has traced the model already)."""
    walk = walk if walk is not None else receptive_field_walk(model, input_size)
    rf_by_name = {s.name: s.rf for s in walk}
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
        model(torch.zeros(1, 3, input_size, input_size, device=module_device(model)))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return rows


def model_summary(model: nn.Module, name: str | None = None) -> dict:
    walk = receptive_field_walk(model)  # one trace serves the table and the field
    rows = layer_table(model, walk=walk)
    return {
        "model": name or getattr(model, "name", None) or type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "macs": sum(r.macs for r in rows),
        "receptive_field": max((s.rf for s in walk), default=1),
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
