"""Our backward for dilated depthwise convolutions against PyTorch's, as ratios inside one process.

The preset's network takes whole training steps (augmentation, forward, backward, optimizer) at each
``--resolutions`` size, with ``DilatedDepthwiseConv2d`` training through our backward (``ours``) or
through nn.Conv2d's, i.e. PyTorch's (``pytorch``). The two take turns, ``--rounds`` times ``--steps``
steps each, and the report gives each one's median and their ratio; then each dilated depthwise
convolution of the network alone (forward and backward, at its map size at that resolution).

    python benchmarks/dilated_depthwise.py --precision bf16 --out benchmarks/results/dilated_depthwise_bf16
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/dilated_depthwise.py \\
        --precision fp32 --out benchmarks/results/dilated_depthwise_fp32_avx2

(the variables approximate an AVX2-only CPU on an AVX-512 one: kernels, not clocks or caches).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    input_shapes,
    kernel_isa,
    markdown_table,
    recipe_batch_size,
    synthetic_step,
    training_step,
    write_results,
)

from tinycifar.models.layers import DilatedDepthwiseConv2d  # noqa: E402

OURS = DilatedDepthwiseConv2d.forward


def use_backward(which: str) -> None:
    """Route every DilatedDepthwiseConv2d through ours or PyTorch's backward."""
    DilatedDepthwiseConv2d.forward = OURS if which == "ours" else nn.Conv2d.forward


def mean_ms(fn: Callable[[], None], steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return 1000 * (time.perf_counter() - t0) / steps


def both_backwards(fn: Callable[[], None], rounds: int, steps: int) -> dict:
    """``fn`` through PyTorch's backward and ours in turns: each one's median of ``rounds`` and the ratio."""
    times: dict[str, list[float]] = {"pytorch": [], "ours": []}
    for which in times:  # warm-up: oneDNN's primitives, the allocator
        use_backward(which)
        mean_ms(fn, 2)
    for _ in range(rounds):
        for which, t in times.items():
            use_backward(which)
            t.append(mean_ms(fn, steps))
    use_backward("ours")
    theirs, ours = statistics.median(times["pytorch"]), statistics.median(times["ours"])
    return {"pytorch_ms": round(theirs, 3), "ours_ms": round(ours, 3), "ratio": round(ours / theirs, 3)}


def layer_step(conv: nn.Module, shape: torch.Size, batch: int, precision: str) -> Callable[[], None]:
    """Forward and backward of ``conv`` alone on a random batch of its input's shape."""
    x = torch.randn(batch, *shape[1:]).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(batch, *shape[1:]).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            y = conv(x)
        y.backward(grad.to(y.dtype))

    return step


def measure(args) -> list[dict]:
    rows = []
    for resolution in args.resolutions:
        torch.manual_seed(0)
        s = synthetic_step(args.preset, torch.channels_last, args.batch_size)
        step = training_step(s, resolution, args.precision)
        rows.append({"part": f"training step, {resolution}x{resolution}",
                     **both_backwards(step, args.rounds, args.steps)})
        for conv, shape in input_shapes(s.model, resolution, lambda m: isinstance(m, DilatedDepthwiseConv2d)).items():
            part = f"layer: {conv.in_channels} channels, {shape[-1]}x{shape[-1]}, dilation {conv.dilation[0]}"
            rows.append({"part": part, **both_backwards(layer_step(conv, shape, args.batch_size, args.precision),
                                                         args.rounds, 10)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch-size", type=int, default=None, help="the preset's for the precision unless given")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 20])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/dilated_depthwise")
    args = ap.parse_args()
    if args.batch_size is None:
        args.batch_size = recipe_batch_size(args.preset, args.precision)
    rows = measure(args)
    isa = kernel_isa()
    body = [f"{args.precision}, {args.preset} network, batch {args.batch_size}, channels_last; ATen kernels "
            f"{isa[0]}, oneDNN ISA {isa[1]}; {args.rounds} interleaved rounds; {args.steps} steps each "
            "(a layer: forward + backward of a random batch, 10 each); ratio: ours / PyTorch's.", "",
            markdown_table(rows, ["part", "pytorch_ms", "ours_ms", "ratio"])]
    write_results(args.out, f"Dilated depthwise backward: ours against PyTorch's ({args.preset}, {args.precision})",
                  body, precision=args.precision, batch_size=args.batch_size, aten_capability=isa[0],
                  onednn_max_isa=isa[1], rows=rows)


if __name__ == "__main__":
    main()
