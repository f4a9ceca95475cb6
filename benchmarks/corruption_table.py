"""One table of accuracy under corruptions from run folders that `tinycifar eval --corruptions all` wrote into.

Runs are grouped by recipe (preset, network, AugMix mode); each group's row gives the median over
its seeds of the clean accuracy, the mean corruption accuracy (mCA) and each family's mean, and
the training minutes (from summary.json), so a robust recipe reads against the plain one.

    python benchmarks/corruption_table.py runs/robust/fast-* runs/seed-wall/seed-seed? \
        --out benchmarks/results/corruptions
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402

from tinycifar.data.corruptions import FAMILIES  # noqa: E402

COLUMNS = ["recipe", "seeds", "clean", "mCA", *FAMILIES, "train_minutes", "runs"]


def read_run(run_dir: Path) -> dict:
    """One run's numbers: its corruptions.json, config.json and summary.json."""
    try:
        result = json.loads((run_dir / "corruptions.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
    except OSError as e:
        raise SystemExit(f"{run_dir}: {e.strerror}: {e.filename} (run `tinycifar eval --checkpoint "
                         f"{run_dir}/best.pt --corruptions all` on a finished run)") from None
    augmix = config.get("aug", {}).get("augmix", "off")
    recipe = f"{config['preset']} ({config['model']})" + (f" + AugMix {augmix}" if augmix != "off" else "")
    accuracy = result["accuracy"]
    families = {family: statistics.mean(v for name in names if name in accuracy for v in accuracy[name].values())
                for family, names in FAMILIES.items()}
    return {"recipe": recipe, "run": str(run_dir), "clean": result["clean"],
            "mCA": result["mean_corruption_accuracy"], **families,
            "train_minutes": summary["train_seconds"] / 60}


def group(rows: list[dict]) -> list[dict]:
    """Median of each number over the runs of one recipe, in the order the recipes first appear."""
    by_recipe: dict[str, list[dict]] = {}
    for r in rows:
        by_recipe.setdefault(r["recipe"], []).append(r)
    table = []
    for recipe, runs in by_recipe.items():
        row = {"recipe": recipe, "seeds": len(runs), "runs": ", ".join(r["run"] for r in runs)}
        for key in ["clean", "mCA", *FAMILIES, "train_minutes"]:
            row[key] = round(statistics.median(r[key] for r in runs), 2 if key != "train_minutes" else 1)
        table.append(row)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="run folders with corruptions.json")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/corruptions"))
    args = ap.parse_args()
    rows = [read_run(d) for d in args.runs]
    table = group(rows)
    write_results(args.out, "Accuracy under CIFAR-10-C corruptions (median over seeds)",
                  [markdown_table(table, COLUMNS)], rows=table, runs=rows)


if __name__ == "__main__":
    main()
