"""Which levers make a `fast` training step quicker in fp32, measured as ratios inside one process.

Variants of one 32x32 (or --resolution) training step of the preset's network as its fp32 recipe
trains it (its batch, Muon for the filters; no autocast): channels_last against contiguous, 1 thread
against all, eager against ``torch.compile`` (Inductor's C++ code, through ``CompiledOnce`` as
``--compile`` runs it), and other batch sizes (``--batch-sizes``, compared per image: smaller batches
keep the activations in the caches), and with ``--frozen-stem`` the whitening stem's batch norm frozen
too at each batch size (the fp32 recipe's 32x32 epochs: backward stops before the 32x32 maps), and
with ``--late-freeze N`` the first N blocks of the network frozen as well
(what the opt-in ``late_freeze_blocks`` does in a run's last epochs). The variants take turns,
``--rounds`` times ``--steps`` steps each, and the report gives each one's median step: interleaving
keeps the ratios honest on a machine other jobs share, where whole-process timings are not.
The compiled variant's first step (compilation) is reported apart; run the script twice with the same
``TORCHINDUCTOR_CACHE_DIR`` to see a cold and a warm FX graph cache.

To approximate an AVX2-only CPU (Zen 3 class) on an AVX-512 one, run it under
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (kernels only, not clocks or caches).

    python benchmarks/fp32_levers.py --out benchmarks/results/fp32_levers
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    kernel_isa,
    markdown_table,
    recipe_batch_size,
    synthetic_step,
    training_step,
    write_results,
)

from tinycifar.training.train import CompiledOnce, freeze_leading_blocks, freeze_stem_norm  # noqa: E402


def make_step(preset: str, resolution: int, channels_last: bool, compiled: bool,
              batch_size: int | None = None, frozen_stem: bool = False, frozen_blocks: int = 0) -> Callable[[], None]:
    """One fp32 training step of the preset's network on fixed synthetic images, with its augmentation."""
    torch.manual_seed(0)  # the same initial weights in every variant
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    s = synthetic_step(preset, memory_format, batch_size, precision="fp32")
    if frozen_stem:
        freeze_stem_norm(s.model)
    if frozen_blocks:
        freeze_leading_blocks(s.model, frozen_blocks)
    return training_step(s, resolution, "fp32", CompiledOnce(s.model) if compiled else None)


def seconds(fn: Callable[[], None], steps: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="leave the compiled variant out")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[],
                    help="also time channels_last eager steps at these batch sizes (compared per image)")
    ap.add_argument("--frozen-stem", action="store_true",
                    help="also time each eager channels_last batch size with the stem's batch norm frozen")
    ap.add_argument("--late-freeze", type=int, default=0, metavar="N",
                    help="with --frozen-stem, also with the network's first N blocks frozen (late_freeze_blocks)")
    ap.add_argument("--out", default="benchmarks/results/fp32_levers")
    args = ap.parse_args()
    threads, batch = torch.get_num_threads(), recipe_batch_size(args.preset, "fp32")
    variants = {("channels_last", "eager", threads, batch): make_step(args.preset, args.resolution, True, False),
                ("contiguous", "eager", threads, batch): make_step(args.preset, args.resolution, False, False),
                ("channels_last", "eager", 1, batch): make_step(args.preset, args.resolution, True, False)}
    for b in args.batch_sizes:
        variants[("channels_last", "eager", threads, b)] = make_step(args.preset, args.resolution, True, False, b)
    for b in [batch, *args.batch_sizes] if args.frozen_stem else []:
        variants[("channels_last", "eager, stem frozen", threads, b)] = make_step(
            args.preset, args.resolution, True, False, b, frozen_stem=True)
        if args.late_freeze:
            variants[("channels_last", f"eager, first {args.late_freeze} blocks frozen", threads, b)] = make_step(
                args.preset, args.resolution, True, False, b, frozen_stem=True, frozen_blocks=args.late_freeze)
    first_step = {}
    if not args.no_compile:
        for layout in ("channels_last", "contiguous"):
            variants[(layout, "compiled", threads, batch)] = step = make_step(args.preset, args.resolution,
                                                                              layout == "channels_last", True)
            first_step[layout] = seconds(step)
    for step in variants.values():
        seconds(step, 2)  # warm-up (oneDNN primitives, the allocator)
    times: dict[tuple, list[float]] = {key: [] for key in variants}
    for _ in range(args.rounds):
        for key, step in variants.items():
            torch.set_num_threads(key[2])
            times[key].append(seconds(step, args.steps))
            torch.set_num_threads(threads)
    baseline = statistics.median(times[("channels_last", "eager", threads, batch)]) / batch  # per image
    rows = [{"layout": layout, "mode": mode, "threads": n, "batch": b,
             "median_ms": round(1000 * statistics.median(t), 1),
             "vs_channels_last_eager": round(statistics.median(t) / b / baseline, 3),
             "first_step_s": round(first_step[layout], 1) if mode == "compiled" else None}
            for (layout, mode, n, b), t in times.items()]
    isa = kernel_isa()
    body = [f"fp32, {args.preset} network, batch {batch} unless said, "
            f"{args.resolution}x{args.resolution}; ATen kernels {isa[0]}, oneDNN ISA {isa[1]}; "
            f"{args.rounds} interleaved rounds of {args.steps} steps; vs_channels_last_eager: per image; "
            f"first_step_s: the compiling step "
            f"(TORCHINDUCTOR_CACHE_DIR={os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')}).", "",
            markdown_table(rows, ["layout", "mode", "threads", "batch", "median_ms", "vs_channels_last_eager",
                                  "first_step_s"])]
    write_results(args.out, f"fp32 step levers ({args.preset}, {args.resolution}x{args.resolution})", body,
                  aten_capability=isa[0], onednn_max_isa=isa[1], rows=rows)


if __name__ == "__main__":
    main()
