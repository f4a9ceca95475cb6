"""Training throughput and where the time goes.

For each model x precision x memory format x batch size: training images per second over
a few timed steps (augmentation included), and the share of a step spent in augmentation,
forward, backward and the optimizer step. On the CPU every op is synchronous, so timing
each phase with a wall clock is exact enough; on CUDA the phases are synchronised.

    python benchmarks/throughput.py --models era9 fastnet --batch-sizes 256 512 1024
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine_info, markdown_table  # noqa: E402

from tinycifar.data.augment import AugmentConfig, augment  # noqa: E402
from tinycifar.evaluate import autocast_context  # noqa: E402
from tinycifar.models import create_model  # noqa: E402
from tinycifar.training.train import TrainConfig, build_optimizer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model_name: str, precision: str, channels_last: bool, batch: int, policy: str, steps: int,
            device: torch.device, compiled: bool = False) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, TrainConfig(lr=0.01))
    net = torch.compile(model) if compiled else model
    aug = AugmentConfig(policy=policy, cutout_size=8)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    phases = {"augment": [], "forward": [], "backward": [], "optimizer": []}
    warmup_start = time.perf_counter()
    for step in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        x = augment(x0, aug, g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sync(device)
        t1 = time.perf_counter()
        with autocast_context(device, precision):
            loss = F.cross_entropy(net(x).float(), y)
        sync(device)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        t3 = time.perf_counter()
        opt.step()
        sync(device)
        t4 = time.perf_counter()
        if step == 1:
            warmup_seconds = t4 - warmup_start  # includes torch.compile's compilation
        if step >= 2:
            for k, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                phases[k].append(seconds)
    step_times = [sum(p[i] for p in phases.values()) for i in range(steps)]
    median_step = statistics.median(step_times)
    row = {"model": model_name, "precision": precision, "channels_last": channels_last, "batch": batch,
           "compiled": compiled, "images_per_second": round(batch / median_step, 1),
           "warmup_seconds": round(warmup_seconds, 1)}
    total = sum(statistics.median(v) for v in phases.values())
    for k, v in phases.items():
        row[f"{k}_%"] = round(100 * statistics.median(v) / total, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["era9", "fastnet"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 512, 1024])
    ap.add_argument("--policy", default="fast")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also measure each case under torch.compile")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/throughput")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for model, precision, cl, batch, compiled in itertools.product(
            args.models, args.precisions, (False, True), args.batch_sizes, (False, True) if args.compile else (False,)):
        row = measure(model, precision, cl, batch, args.policy, args.steps, device, compiled)
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": command_line(), "machine": machine_info(), "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    cols = ["model", "precision", "channels_last", "batch", "compiled", "images_per_second", "warmup_seconds",
            "augment_%", "forward_%", "backward_%", "optimizer_%"]
    md = ["# Training throughput", "", f"Command: `{report['command']}`", "",
          "Machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()), "",
          f"Median of {args.steps} steps after 2 warm-up steps (warmup_seconds: those two, compilation "
          f"included); augmentation policy `{args.policy}`.", "",
          markdown_table(rows, cols)]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
