"""Gather finished run folders into one accuracy table (JSON + Markdown).

Long runs are trained with `tinycifar train` in the background (checkpointed, resumable);
this reads what they wrote, so every number in the table comes from a run folder. Runs are
grouped into recipes by folder name, less a trailing seed (`best100-s0` and `best100-s1` are
recipe `best100`), and each recipe gets its medians.

    python benchmarks/collect_runs.py runs/best-s0 runs/best-s1 --out benchmarks/results/best
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine_info, markdown_table  # noqa: E402
from time_to_accuracy import median_of  # noqa: E402

from tinycifar.reports import compare  # noqa: E402

COLUMNS = ["run", "model", "params", "seed", "epochs", "batch", "threads", "final_acc", "final_acc_tta", "best_acc",
           "final_ece", "final_ece_tta", "train_minutes", "eval_minutes", "images_per_second"]
MEDIAN_KEYS = ("final_acc", "final_acc_tta", "best_acc", "final_ece", "final_ece_tta", "train_minutes")


def recipe_of(run_dir: Path) -> str:
    """The folder's name less a trailing seed: '-s0', '-seed1', '_s2'."""
    return re.sub(r"[-_](s|seed)\d+$", "", run_dir.name)


def read_run(run_dir: Path) -> dict:
    """One finished run's row, from what tinycifar.reports.compare reads out of its folder."""
    try:
        info = compare.read_run(run_dir)
    except compare.NotARun as e:
        raise SystemExit(str(e)) from None
    if info.status != "finished":
        raise SystemExit(f"{run_dir}: not a finished run folder (no summary.json)")
    kwargs = ",".join(f"{k}={v}" for k, v in info.model_kwargs.items())
    return {
        "run": info.run, "recipe": recipe_of(run_dir), "model": f"{info.network}({kwargs})" if kwargs else info.network,
        "params": info.params, "seed": info.seed,
        "epochs": len(info.history), "batch": info.batch_size, "threads": info.threads, "final_acc": info.final_acc,
        "final_acc_tta": info.final_acc_tta, "best_acc": info.best_acc, "final_ece": info.final_ece,
        "final_ece_tta": info.final_ece_tta,
        "train_minutes": round(info.train_seconds / 60, 1), "eval_minutes": round(info.eval_seconds / 60, 1),
        "images_per_second": info.images_per_second,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", required=True, help="JSON and Markdown path stem")
    args = ap.parse_args()

    rows = [read_run(r) for r in args.runs]
    medians = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        medians.append({"recipe": recipe, "model": mine[0]["model"], "params": mine[0]["params"], "runs": len(mine),
                        **{k: median_of(mine, k) for k in MEDIAN_KEYS}})
    report = {"command": command_line(), "machine": machine_info(), "runs": rows, "medians": medians}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = ["# Run folders", "", f"Command: `{report['command']}`", "",
          "Machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()), "",
          "TTA: logits averaged over 6 views (identity, horizontal flip, and both shifted by one pixel "
          "diagonally each way). Training minutes exclude the per-epoch evaluation passes (eval_minutes).", "",
          "## Per run", "", markdown_table(rows, COLUMNS), "", "## Median per recipe", "",
          markdown_table(medians, ["recipe", "model", "params", "runs", *MEDIAN_KEYS])]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
