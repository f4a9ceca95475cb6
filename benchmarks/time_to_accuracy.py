"""Time-to-accuracy: train presets for several seeds on the real data and time the target.

Training seconds until the test accuracy first reaches the target exclude evaluation passes
(they are listed separately). Presets given together are interleaved seed by seed
(A0 B0 A1 B1 ...) so that both see the same machine noise, and their ratio is reported.

    python benchmarks/time_to_accuracy.py --presets fast seed --seeds 3 --target 85
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine_info, markdown_table  # noqa: E402

from tinycifar.config import TrainConfig, apply_overrides, parse_assignments, resolve_config, validate  # noqa: E402
from tinycifar.train import load_data, train  # noqa: E402


def run_one(cfg: TrainConfig, seed: int, target: float, data, out_root: Path) -> dict:
    """Train one resolved config for one seed, quietly, and return its row of the report."""
    cfg = apply_overrides(cfg, {"seed": seed, "quiet": True, "tta": True, "target_for_summary": target,
                                "out": str(out_root / f"{cfg.preset}-seed{seed}")}, "benchmark")
    validate(cfg)
    result = train(cfg, data=data)
    s, h = result.summary, result.history
    return {
        "preset": cfg.preset, "model": cfg.model, "seed": seed, "epochs": cfg.epochs,
        "seconds_to_target": s["seconds_to_target"], "epoch_reached_target": s["epoch_reached_target"],
        "final_acc": s["final_acc"], "final_acc_tta": s.get("final_acc_tta"), "best_acc": s["best_acc"],
        "train_seconds": s["train_seconds"], "eval_seconds": round(sum(r.get("eval_seconds", 0) for r in h), 2),
        "images_per_second": s["images_per_second"], "precision": s["precision"],
    }


def median_of(rows: list[dict], key: str):
    values = [r[key] for r in rows if r[key] is not None]
    if len(values) < len(rows):
        return None  # a seed missed the target: the median time is not defined
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["fast"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--target", type=float, default=85.0)
    ap.add_argument("--data", default=None, help="CIFAR-10 folder (default: $CIFAR10_ROOT or ./data)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every preset")
    ap.add_argument("--out", default="benchmarks/results/time_to_accuracy", help="JSON and Markdown path stem")
    args = ap.parse_args()

    overrides = parse_assignments(args.set)
    if args.data:
        overrides["data"] = args.data
    configs = {preset: resolve_config(preset, overrides=overrides) for preset in args.presets}
    data = load_data(configs[args.presets[0]])  # loaded once, shared by every run
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for preset in args.presets:
                row = run_one(configs[preset], seed, args.target, data, Path(tmp))
                print(json.dumps(row), flush=True)
                rows.append(row)

    medians = []
    for preset in args.presets:
        mine = [r for r in rows if r["preset"] == preset]
        medians.append({"preset": preset, "model": mine[0]["model"], "seeds": len(mine),
                        **{k: median_of(mine, k) for k in ("seconds_to_target", "epoch_reached_target", "final_acc",
                                                           "final_acc_tta", "train_seconds", "images_per_second")}})
    ratio = None
    if len(medians) == 2 and all(m["seconds_to_target"] for m in medians):
        ratio = medians[1]["seconds_to_target"] / medians[0]["seconds_to_target"]
    report = {"command": command_line(), "machine": machine_info(), "target": args.target, "runs": rows,
              "medians": medians, "ratio_second_over_first": ratio}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    cols = ["preset", "model", "seed", "seconds_to_target", "epoch_reached_target", "final_acc", "final_acc_tta",
            "train_seconds", "eval_seconds", "images_per_second"]
    md = [f"# Time to {args.target:g}% test accuracy", "",
          f"Command: `{report['command']}`", "",
          "Machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()), "",
          "Training seconds exclude evaluation passes (listed as eval_seconds). TTA = flip + 1-pixel translations.",
          "", "## Per seed", "", markdown_table(rows, cols), "", "## Median", "",
          markdown_table(medians, ["preset", "model", "seeds", "seconds_to_target", "epoch_reached_target",
                                   "final_acc", "final_acc_tta", "train_seconds", "images_per_second"])]
    if ratio:
        md += ["", f"Ratio of median time-to-target, {args.presets[1]} / {args.presets[0]}: **{ratio:.1f}x**"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
