"""What keeping freed memory (``tinycifar.devices.keep_freed_memory``) is worth to a CPU training step.

glibc's malloc settings are process-wide and, once set, cannot be put back to its adaptive default,
so the two variants run in separate processes, taking turns ``--rounds`` times: each times
``--steps`` training steps of the preset's network (after ``--warmup`` steps: the heap grows to a
step's size) and counts the page faults they took. The report gives each variant's median.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/page_faults.py \\
        --precision fp32 --out benchmarks/results/page_faults_fp32_avx2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import kernel_isa, markdown_table, recipe_batch_size, synthetic_step, training_step, write_results  # noqa: E402

VARIANTS = ("glibc default", "kept")


def child(args) -> None:
    """One process's measurement, as JSON on stdout."""
    torch.manual_seed(0)
    s = synthetic_step(args.preset, torch.channels_last, args.batch_size, keep_freed=args.child == "kept")
    step = training_step(s, args.resolution, args.precision)
    for _ in range(args.warmup):
        step()
    faults, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(args.steps):
        step()
    print(json.dumps({"step_ms": 1000 * (time.perf_counter() - t0) / args.steps,
                      "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch-size", type=int, default=None, help="the preset's for the precision unless given")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/page_faults")
    args = ap.parse_args()
    if args.batch_size is None:
        args.batch_size = recipe_batch_size(args.preset, args.precision)
    if args.child:
        return child(args)
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant, runs in results.items():
            cmd = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    rows = [{"variant": v, "median_step_ms": round(statistics.median(r["step_ms"] for r in runs), 1),
             "median_faults_per_step": round(statistics.median(r["faults"] for r in runs)),
             "steps_ms": ", ".join(f"{r['step_ms']:.0f}" for r in runs)} for v, runs in results.items()]
    rows[1]["ratio"] = round(rows[1]["median_step_ms"] / rows[0]["median_step_ms"], 3)
    isa = kernel_isa()
    body = [f"{args.precision}, {args.preset} network, batch {args.batch_size}, {args.resolution}x{args.resolution}, "
            f"channels_last; ATen kernels {isa[0]}, oneDNN ISA {isa[1]}; {args.rounds} rounds of one process per "
            f"variant, each {args.warmup} warm-up steps then {args.steps} timed.", "",
            markdown_table(rows, ["variant", "median_step_ms", "median_faults_per_step", "ratio", "steps_ms"])]
    write_results(args.out, f"Page faults of a training step: glibc's default against kept memory ({args.precision})",
                  body, precision=args.precision, batch_size=args.batch_size, resolution=args.resolution, rows=rows)


if __name__ == "__main__":
    main()
