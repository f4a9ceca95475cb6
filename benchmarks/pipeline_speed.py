"""The `seed` policy batched on the device against the same policy through albumentations.

1. Throughput: images/s of one epoch of the real training set through each loader (no network):
   the batched ``DeviceLoader`` and the albumentations ``PipelineLoader`` with 0, 1 and 2 worker
   processes (median of --repeats epochs).
2. Paired training (--epochs > 0): ``tinycifar train --preset seed --epochs N`` with the batched
   policy and with ``--aug-pipeline`` (the policy exported by ``tinycifar aug export``), each a
   whole process, seed by seed: final accuracy and wall clock, and their ratio.

    python benchmarks/pipeline_speed.py --repeats 3 --epochs 3 --seeds 1 --out benchmarks/results/pipeline_speed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, write_results  # noqa: E402

from tinycifar.data import load_split  # noqa: E402
from tinycifar.data.augment import AugmentConfig  # noqa: E402
from tinycifar.data.loader import DeviceLoader, channel_stats  # noqa: E402
from tinycifar.data.pipeline import PipelineLoader, policy_pipeline  # noqa: E402


def epoch_seconds(loader, repeats: int) -> float:
    times = []
    for epoch in range(repeats):
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_process(out: Path, seed: int, epochs: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tinycifar", "train", "--preset", "seed", "--epochs", str(epochs), "--seed",
           str(seed), "--out", str(out), "--quiet", *extra]
    t0 = time.time()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.time() - t0
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_seconds": round(wall, 1), "train_seconds": summary["train_seconds"],
            "final_acc": summary["final_acc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("CIFAR10_ROOT", "./data"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3, help="paired training runs of this length (0 = none)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/pipeline_speed")
    args = ap.parse_args()

    split = load_split(args.data, train=True)
    mean, std = channel_stats(split.images)
    aug = AugmentConfig(policy="seed")
    pipeline = policy_pipeline(aug, tuple(255 * m for m in mean))
    loaders = {"batched on the device": DeviceLoader(split, args.batch_size, mean, std, aug=aug)}
    for workers in (0, 1, 2):
        loaders[f"albumentations, {workers} workers"] = PipelineLoader(split, args.batch_size, mean, std, pipeline,
                                                                       workers=workers)
    throughput = []
    for name, loader in loaders.items():
        seconds = epoch_seconds(loader, args.repeats)
        throughput.append({"loader": name, "epoch_seconds": round(seconds, 2),
                           "images_per_second": round(len(split) / seconds)})
        print(json.dumps(throughput[-1]), flush=True)

    paired = []
    with tempfile.TemporaryDirectory() as tmp:
        policy_file = Path(tmp) / "seed.yaml"
        subprocess.run([sys.executable, "-m", "tinycifar", "aug", "export", "--out", str(policy_file)], check=True,
                       capture_output=True)
        for seed in range(args.seeds if args.epochs else 0):
            for name, extra in (("batched", []), ("albumentations (2 workers)", ["--aug-pipeline", str(policy_file)])):
                row = {"backend": name, "seed": seed, **train_process(Path(tmp) / f"{name[:5]}-{seed}", seed,
                                                                      args.epochs, extra)}
                print(json.dumps(row), flush=True)
                paired.append(row)
    ratio = None
    if paired:
        walls = {n: statistics.median(r["wall_seconds"] for r in paired if r["backend"] == n)
                 for n in ("batched", "albumentations (2 workers)")}
        ratio = walls["albumentations (2 workers)"] / walls["batched"]
    body = [f"## One epoch of the 50,000 training images, batch {args.batch_size}, no network (median of "
            f"{args.repeats})", "", markdown_table(throughput, ["loader", "epoch_seconds", "images_per_second"])]
    if paired:
        body += ["", f"## `tinycifar train --preset seed --epochs {args.epochs}`, whole process", "",
                 markdown_table(paired, ["backend", "seed", "final_acc", "wall_seconds", "train_seconds"]), "",
                 f"Wall-clock ratio, albumentations / batched: **{ratio:.2f}x**"]
    write_results(args.out, "The seed policy: batched on the device vs albumentations in worker processes", body,
                  throughput=throughput, paired=paired, wall_ratio_albumentations_over_batched=ratio)


if __name__ == "__main__":
    main()
