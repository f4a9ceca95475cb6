"""The weights' gradient of each full convolution of a preset's network: PyTorch's (oneDNN's backward)
against one matrix product per kernel tap, as ratios inside one process.

A lead, not a change: on an Intel Xeon approximating AVX2, the weights' gradient of fastnet's dilated
96-channel convolution took twice its forward. The weight gradient of a convolution is, for each tap of
the kernel, the output's gradient times the input shifted by that tap, summed over the batch and the
map: in channels_last both are (images x pixels) by channels matrices, so each tap is one matrix
product over the pixels where the shifted input overlaps the map (the padding adds nothing). Both
variants take turns, ``--rounds`` times, and the report gives each one's median; the forward and the
input's gradient are listed beside them for scale. The matrix products run in MKL, which
``ATEN_CPU_CAPABILITY`` and ``ONEDNN_MAX_CPU_ISA`` do not cap: approximate AVX2 with
``MKL_ENABLE_INSTRUCTIONS=AVX2`` as well.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/conv_weight_grad.py --out benchmarks/results/conv_weight_grad_xeon_avx2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import input_shapes, kernel_isa, markdown_table, write_results  # noqa: E402

from tinycifar.models import create_model  # noqa: E402


def tap_slices(size_out: int, size_in: int, stride: int, shift: int) -> tuple[slice, slice]:
    """The output positions whose input position (``o * stride + shift``) falls inside the map, and
    those input positions: a slice of each (both empty when none does)."""
    valid = [o for o in range(size_out) if 0 <= o * stride + shift < size_in]
    if not valid:
        return slice(0, 0), slice(0, 0)
    first, last = valid[0], valid[-1]
    return slice(first, last + 1), slice(first * stride + shift, last * stride + shift + 1, stride)


def weight_grad_by_taps(grad: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The weights' gradient of ``conv`` (groups 1) at input ``x`` and output gradient ``grad``,
    one (out channels x pixels) @ (pixels x in channels) product per tap, in channels_last views."""
    (k, _), (s, _), (p, _), (d, _) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    g, xi = grad.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)  # NHWC: no copy in channels_last
    out = torch.empty(conv.out_channels, k, k, conv.in_channels, dtype=x.dtype)
    for i in range(k):
        rows = tap_slices(g.shape[1], xi.shape[1], s, i * d - p)
        for j in range(k):
            cols = tap_slices(g.shape[2], xi.shape[2], s, j * d - p)
            a = g[:, rows[0], cols[0], :].reshape(-1, g.shape[-1])
            b = xi[:, rows[1], cols[1], :].reshape(-1, xi.shape[-1])
            out[:, i, j, :] = a.t() @ b
    return out.permute(0, 3, 1, 2)


def is_full_conv(module: nn.Module) -> bool:
    """A full (groups 1, kernel > 1) convolution but the stem's (3 input channels, and frozen under the
    whitening recipes)."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.kernel_size[0] > 1
            and module.in_channels > 3)


def median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def measure_conv(conv: nn.Conv2d, shape: tuple, rounds: int) -> dict:
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    w = conv.weight.detach()
    y = F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation)
    grad = torch.randn_like(y).contiguous(memory_format=torch.channels_last)

    def backward(mask: list[bool]) -> tuple:
        return torch.ops.aten.convolution_backward(grad, x, w, None, list(conv.stride), list(conv.padding),
                                                   list(conv.dilation), False, [0, 0], 1, mask)

    theirs, ours = backward([False, True, False])[1], weight_grad_by_taps(grad, x, conv)
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    variants = {"forward": lambda: F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation),
                "input_grad": lambda: backward([True, False, False]),
                "weight_grad_pytorch": lambda: backward([False, True, False]),
                "weight_grad_taps": lambda: weight_grad_by_taps(grad, x, conv)}
    for fn in variants.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(median_ms(fn, 5))
    row = {f"{name}_ms": round(statistics.median(v), 2) for name, v in samples.items()}
    row["ratio"] = round(row["weight_grad_taps_ms"] / row["weight_grad_pytorch_ms"], 2)
    row["relative_error"] = f"{error:.1e}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fastnet")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 20])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/conv_weight_grad")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model).to(memory_format=torch.channels_last)
    names = {module: name for name, module in model.named_modules()}
    rows = []
    for resolution in args.resolutions:
        for conv, shape in input_shapes(model, resolution, is_full_conv).items():
            rows.append({"image": f"{resolution}x{resolution}", "layer": names[conv],
                         "conv": f"{conv.in_channels}->{conv.out_channels}, stride {conv.stride[0]}, "
                                 f"dilation {conv.dilation[0]}, input {shape[-1]}x{shape[-1]}",
                         **measure_conv(conv, (args.batch_size, *shape[1:]), args.rounds)})
    isa = kernel_isa()
    body = [f"fp32, {args.model}, batch {args.batch_size}, channels_last; ATen kernels {isa[0]}, oneDNN ISA "
            f"{isa[1]}; {args.rounds} interleaved rounds, each the median of 5 calls; ratio: taps / PyTorch's "
            "weight gradient.", "",
            markdown_table(rows, ["image", "layer", "conv", "forward_ms", "input_grad_ms", "weight_grad_pytorch_ms",
                                  "weight_grad_taps_ms", "ratio", "relative_error"])]
    write_results(args.out, f"Weight gradients of {args.model}'s full convolutions: PyTorch's against a "
                  "matrix product per tap", body, model=args.model, batch_size=args.batch_size,
                  aten_capability=isa[0], onednn_max_isa=isa[1], rows=rows)


if __name__ == "__main__":
    main()
