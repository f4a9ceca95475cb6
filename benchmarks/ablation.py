"""Lever ablation: the fast preset with one lever changed at a time, timed to the target.

Each variant is the preset plus a few overrides (one lever off, or one more lever on), run
for the same seeds on the same data one after another. Reported per variant: the median
training seconds and epoch at which the test accuracy first reaches the target, the final
accuracy with and without TTA, and each one's difference from the unchanged preset.

    python benchmarks/ablation.py --seeds 1 --target 85
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine_info, markdown_table  # noqa: E402
from time_to_accuracy import median_of, run_one  # noqa: E402

from tinycifar.config import apply_overrides, parse_assignments, resolve_config  # noqa: E402
from tinycifar.training.train import load_data  # noqa: E402

# name -> overrides of the fast preset; "-" takes a lever away, "+" adds one.
VARIANTS: dict[str, dict] = {
    "fast (all levers)": {},
    "- EMA of the weights": {"ema_decay": 0.0},
    "- batch-norm biases at 4x lr": {"norm_bias_lr_scale": 1.0},
    "- batch 256 (512, lr 0.1)": {"batch_size": 512, "lr": 0.1},
    "- whitening stem": {"whiten_stem": False},
    "- low-res epochs": {"low_res": 0},
    "- label smoothing": {"label_smoothing": 0.0},
    "- one-cycle (cosine)": {"schedule": "cosine"},
    "+ cutout 8": {"aug": {"cutout_size": 8}},
    "+ alternating flips": {"aug": {"alternate_flip": True}},
    "+ frozen batch-norm scales": {"freeze_norm_scale": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--target", type=float, default=85.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    ap.add_argument("--out", default="benchmarks/results/ablation", help="JSON and Markdown path stem")
    args = ap.parse_args()

    base = resolve_config(args.preset, overrides=parse_assignments(args.set))
    data = load_data(base)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):  # variants interleaved per seed: all see the same drift
            for i, name in enumerate(args.variants):
                cfg = apply_overrides(base, VARIANTS[name], f"variant {name!r}")
                row = {"variant": name, **run_one(cfg, seed, args.target, data, Path(tmp) / str(i))}
                print(json.dumps(row), flush=True)
                rows.append(row)

    keys = ("seconds_to_target", "epoch_reached_target", "final_acc", "final_acc_tta", "images_per_second")
    medians = [{"variant": name, **{k: median_of([r for r in rows if r["variant"] == name], k) for k in keys}}
               for name in args.variants]
    base = medians[0]
    for m in medians:
        for k in ("seconds_to_target", "final_acc", "final_acc_tta"):
            m[f"delta_{k}"] = None if m[k] is None or base[k] is None else round(m[k] - base[k], 2)
    report = {"command": command_line(), "machine": machine_info(), "target": args.target, "runs": rows,
              "medians": medians}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# Lever ablation of the {args.preset} preset: time to {args.target:g}%", "",
          f"Command: `{report['command']}`", "",
          "Machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()), "",
          f"Medians over {args.seeds} seed(s); deltas against the first row. '-' in seconds: a seed never "
          "reached the target. Training seconds exclude evaluation passes.", "",
          markdown_table(medians, ["variant", "seconds_to_target", "delta_seconds_to_target", "epoch_reached_target",
                                   "final_acc", "delta_final_acc", "final_acc_tta", "delta_final_acc_tta",
                                   "images_per_second"])]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
