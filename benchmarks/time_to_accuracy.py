"""Time-to-accuracy: train presets for several seeds on the real data and time the target.

Training seconds until the test accuracy first reaches the target exclude evaluation passes
(they are listed separately). Presets given together are interleaved seed by seed
(A0 B0 A1 B1 ...) so that both see the same machine noise, and their ratio is reported.

    python benchmarks/time_to_accuracy.py --presets fast seed --seeds 3 --target 85

With ``--wall`` each run is the user's command, ``python -m tinycifar train --preset P --seed S``,
timed as a whole process from spawn to exit (start-up, data loading, training, every test pass,
TTA and checkpoint writing included); time to the target is the wall clock from spawn to the end
of the first test pass that reached it (``finished_unix_seconds`` in metrics.csv). ``--baseline
SRC`` runs each seed a second time, interleaved, with the tinycifar package under SRC (the ``src``
of a worktree of an earlier commit) first on the path: the earlier code against this checkout's on
the same machine noise, e.g.

    git worktree add ../before HEAD~2
    python benchmarks/time_to_accuracy.py --wall --presets fast --seeds 5 --baseline ../before/src
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine_info, markdown_table, write_results  # noqa: E402

from tinycifar.config import TrainConfig, apply_overrides, parse_assignments, resolve_config, validate  # noqa: E402
from tinycifar.training.train import load_data, train  # noqa: E402


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


def run_process(preset: str, seed: int, target: float, out_root: Path, extra: list[str],
                src: str | None = None) -> dict:
    """The user's command for one preset and seed as a subprocess, timed from spawn to exit; with
    ``src``, the tinycifar package there is imported instead of the installed one."""
    variant = f"{preset}@baseline" if src else preset
    out = out_root / f"{variant}-seed{seed}"
    cmd = [sys.executable, "-m", "tinycifar", "train", "--preset", preset, "--seed", str(seed), "--out", str(out),
           "--quiet", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    with open(out / "metrics.csv", newline="") as f:
        tested = [r for r in csv.DictReader(f) if r["test_acc"]]
    reached = next((r for r in tested if float(r["test_acc"]) >= target), None)
    return {
        "preset": variant, "model": config["model"], "seed": seed, "epochs": config["epochs"],
        "wall_seconds": round(wall, 2),
        "wall_seconds_to_target": round(float(reached["finished_unix_seconds"]) - started, 2) if reached else None,
        "epoch_reached_target": int(reached["epoch"]) if reached else None,
        "final_acc": summary["final_acc"], "final_acc_tta": summary.get("final_acc_tta"),
        "train_seconds": summary["train_seconds"], "images_per_second": summary["images_per_second"],
    }


def wall_report(rows: list[dict], presets: list[str], target: float) -> tuple[list[dict], float | None]:
    """Per preset: mean/min/max final accuracy (with and without TTA) and median wall seconds."""
    table = []
    for preset in presets:
        mine = [r for r in rows if r["preset"] == preset]
        accs = [r["final_acc"] for r in mine]
        ttas = [r["final_acc_tta"] for r in mine if r["final_acc_tta"] is not None]
        table.append({
            "preset": preset, "model": mine[0]["model"], "seeds": len(mine),
            "median_wall_seconds": statistics.median(r["wall_seconds"] for r in mine),
            "median_wall_seconds_to_target": median_of(mine, "wall_seconds_to_target"),
            "mean_final_acc": round(statistics.mean(accs), 2), "min_final_acc": min(accs), "max_final_acc": max(accs),
            "mean_final_acc_tta": round(statistics.mean(ttas), 2) if ttas else None,
            "min_final_acc_tta": min(ttas) if ttas else None,
            "median_train_seconds": statistics.median(r["train_seconds"] for r in mine),
        })
    ratio = None
    if len(table) == 2 and all(t["median_wall_seconds_to_target"] for t in table):
        ratio = table[1]["median_wall_seconds_to_target"] / table[0]["median_wall_seconds_to_target"]
    return table, ratio


def median_of(rows: list[dict], key: str):
    values = [r[key] for r in rows if r[key] is not None]
    if len(values) < len(rows):
        return None  # a seed missed the target: the median time is not defined
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["fast"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--target", type=float, default=85.0)
    ap.add_argument("--data", default=None, help="CIFAR-10 folder (default: $CIFAR10_ROOT or ./data)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every preset")
    ap.add_argument("--out", default="benchmarks/results/time_to_accuracy", help="JSON and Markdown path stem")
    ap.add_argument("--wall", action="store_true", help="time each run as a whole `tinycifar train` process")
    ap.add_argument("--keep", default=None, help="with --wall: keep the run folders under this folder")
    ap.add_argument("--baseline", default=None, metavar="SRC",
                    help="with --wall and one preset: also run each seed with the tinycifar package under SRC")
    args = ap.parse_args()
    if args.baseline and not (args.wall and len(args.presets) == 1):
        ap.error("--baseline compares two codes on one preset: give --wall and one --presets")
    if args.baseline and not (Path(args.baseline) / "tinycifar" / "__init__.py").is_file():
        ap.error(f"--baseline {args.baseline}: expected a folder holding the tinycifar package (a checkout's src)")
    if args.wall:
        return main_wall(args)

    overrides = parse_assignments(args.set)
    if args.data:
        overrides["data"] = args.data
    configs = {preset: resolve_config(preset, overrides=overrides) for preset in args.presets}
    data = load_data(configs[args.presets[0]])  # loaded once, shared by every run
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
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


def main_wall(args: argparse.Namespace) -> None:
    extra = [a for kv in args.set for a in ("--set", kv)] + (["--data", args.data] if args.data else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for preset in args.presets:  # interleaved: both presets (or codes) see the same machine noise
                for src in ([args.baseline] if args.baseline else []) + [None]:
                    row = run_process(preset, seed, args.target, root, extra, src)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    variants = list(dict.fromkeys(r["preset"] for r in rows))
    table, ratio = wall_report(rows, variants, args.target)
    body = ["wall = spawn to exit of `python -m tinycifar train --preset P --seed S` (start-up, data, training, "
            "test passes, TTA, checkpoints). wall to target = spawn to the end of the first test pass at or above "
            "the target. train_seconds = training steps only.", "", "## Per seed", "",
            markdown_table(rows, ["preset", "model", "seed", "wall_seconds", "wall_seconds_to_target",
                                  "epoch_reached_target", "final_acc", "final_acc_tta", "train_seconds"]),
            "", "## Summary", "",
            markdown_table(table, ["preset", "model", "seeds", "median_wall_seconds", "median_wall_seconds_to_target",
                                   "mean_final_acc", "min_final_acc", "max_final_acc", "mean_final_acc_tta",
                                   "min_final_acc_tta", "median_train_seconds"])]
    if ratio:
        body += ["", f"Ratio of median wall clock to {args.target:g}%, {variants[1]} / {variants[0]}: "
                 f"**{ratio:.2f}x**"]
    if len(table) == 2:
        body += ["", f"Ratio of medians, {variants[1]} / {variants[0]}: wall clock "
                 f"**{table[1]['median_wall_seconds'] / table[0]['median_wall_seconds']:.3f}x**, training "
                 f"{table[1]['median_train_seconds'] / table[0]['median_train_seconds']:.3f}x"]
    if args.baseline:
        body += ["", f"`{args.presets[0]}@baseline`: the tinycifar package under `{args.baseline}`; "
                 f"`{args.presets[0]}`: this checkout's."]
    write_results(args.out, f"Whole-process wall clock: `tinycifar train`, final accuracy and time to {args.target:g}%",
                  body, target=args.target, runs=rows, summary=table, ratio_second_over_first=ratio)


if __name__ == "__main__":
    main()
