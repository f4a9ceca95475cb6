"""Accuracy against parameters: our networks beside published CIFAR-10 anchors.

Every point of ours comes from finished run folders (summary.json) or from a table that
collect_runs.py wrote out of run folders; the anchors are the papers' published numbers,
drawn hollow so that nobody mistakes them for our measurements.

    python benchmarks/family_figure.py --table benchmarks/results/best_family.json \
        --runs runs/fast5/fast-seed* runs/seed-wall/seed-seed* --out docs/family.png

``--before`` draws an earlier recipe's slimres family faintly behind the current one, so the
figure shows what the new recipe gained at each size; ``--rename`` gives a network a shorter
label (runs recorded as ``slimres200k(se_reduction=16)`` are the registered ``slimres200k_se``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402

# (name, parameters, test accuracy %, source). He et al. 2016 (Deep Residual Learning, table 6):
# ResNet-20 8.75% error, ResNet-56 6.97%, ResNet-110 6.43% (best of 5; mean 6.61 +- 0.16).
# MLPerf Tiny's image-classification ResNet-8 has a quality target of 85%, not a measurement.
ANCHORS = [
    ("ResNet-8 (MLPerf Tiny target)", 78_666, 85.0),
    ("ResNet-20", 270_000, 91.25),
    ("ResNet-56", 850_000, 93.03),
    ("ResNet-110", 1_700_000, 93.57),
]
# label offsets in points where the default (right, below) would collide
OFFSETS = {"fastnet": (-95, 8), "era9": (8, -26), "ResNet-20": (8, -26), "ResNet-110": (-40, -30),
           "ResNet-8 (MLPerf Tiny target)": (6, -24)}
PRESET_OF = {"fastnet": "fast preset", "era9": "seed preset", "slimres200k_se": "best preset"}
BUDGET = 200_000


def rows_from_table(path: Path) -> list[dict]:
    """The runs of a collect_runs.py table: model, params, final accuracy with and without TTA."""
    data = json.loads(path.read_text())
    return [{"model": r["model"], "params": r["params"], "acc": r["final_acc"], "acc_tta": r.get("final_acc_tta")}
            for r in data["runs"]]


def row_from_run(run_dir: Path) -> dict:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except OSError as e:
        raise SystemExit(f"{run_dir}: not a finished run folder ({e.strerror})") from None
    return {"model": summary["model"], "params": summary["params"], "acc": summary["final_acc"],
            "acc_tta": summary.get("final_acc_tta")}


def medians(rows: list[dict]) -> list[dict]:
    """One point per network: the median over its runs (seeds)."""
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    points = []
    for model, runs in by_model.items():
        tta = [r["acc_tta"] for r in runs if r["acc_tta"] is not None]
        points.append({"model": model, "params": runs[0]["params"], "runs": len(runs),
                       "acc": statistics.median(r["acc"] for r in runs),
                       "acc_tta": statistics.median(tta) if tta else None})
    return sorted(points, key=lambda p: p["params"])


def plot(points: list[dict], before: list[dict] | None = None, before_label: str = "") -> Figure:
    fig = Figure(figsize=(8.5, 5.2), layout="constrained")
    ax = fig.subplots()
    family = [p for p in points if p["model"].startswith("slimres")]
    others = [p for p in points if not p["model"].startswith("slimres")]
    if before:
        ax.plot([p["params"] for p in before], [p["acc"] for p in before], "o:", color="tab:gray", alpha=0.6,
                label=f"slimres family, {before_label} (ours, no TTA)")
    if family:
        ax.plot([p["params"] for p in family], [p["acc"] for p in family], "o-", color="tab:blue",
                label="slimres family (ours, no TTA)")
        with_tta = [p for p in family if p["acc_tta"] is not None]
        ax.plot([p["params"] for p in with_tta], [p["acc_tta"] for p in with_tta], "o--", color="tab:blue",
                alpha=0.55, label="slimres family (ours, with TTA)")
    for p in family + others:
        name = p["model"] + (f" ({PRESET_OF[p['model']]})" if p["model"] in PRESET_OF else "")
        ax.annotate(f"{name}\n{p['acc']:.2f}%" + (f", median of {p['runs']}" if p["runs"] > 1 else ""),
                    (p["params"], p["acc"]), textcoords="offset points", xytext=OFFSETS.get(p["model"], (6, -22)),
                    fontsize=8)
    for p in others:
        ax.plot(p["params"], p["acc"], "D", color="tab:green", ms=7)
    ax.plot([], [], "D", color="tab:green", label="era9 (seed preset), fastnet (fast preset), ours")
    for name, params, acc in ANCHORS:
        ax.plot(params, acc, "s", mfc="none", mec="tab:gray", ms=8)
        ax.annotate(f"{name}\n{acc:.2f}%", (params, acc), textcoords="offset points",
                    xytext=OFFSETS.get(name, (6, 4)), fontsize=8, color="dimgray")
    ax.plot([], [], "s", mfc="none", mec="tab:gray", label="published anchors (He et al. 2016; MLPerf Tiny)")
    ax.set_xscale("log")
    ax.set_xlim(4e4, 2.5e6)
    ax.set_ylim(84, 95)
    ax.axvline(BUDGET, color="tab:red", ls=":", lw=1)
    ax.text(BUDGET * 1.03, 94.5, "assignment's budget: 200k", color="tab:red", fontsize=8)
    ax.set(xlabel="parameters (log scale)", ylabel="CIFAR-10 test accuracy (%)",
           title="Accuracy against parameters: our networks and published anchors")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", type=Path, action="append", default=[], help="a collect_runs.py JSON")
    ap.add_argument("--runs", type=Path, nargs="*", default=[], help="finished run folders")
    ap.add_argument("--out", type=Path, required=True, help="the figure (.png)")
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/family"),
                    help="where its numbers go (.json and .md)")
    ap.add_argument("--before", type=Path, help="a collect_runs.py JSON of an earlier recipe, drawn faintly")
    ap.add_argument("--before-label", default="earlier recipe", help="its legend entry")
    ap.add_argument("--rename", action="append", default=[], metavar="MODEL=LABEL", help="a network's label")
    args = ap.parse_args()
    labels = dict(r.rsplit("=", 1) for r in args.rename if "=" in r)  # a model may hold '=' itself
    if len(labels) != len(args.rename):
        raise SystemExit("--rename: expected MODEL=LABEL")
    rows = [r for t in args.table for r in rows_from_table(t)] + [row_from_run(d) for d in args.runs]
    if not rows:
        raise SystemExit("no runs: give --table and/or --runs")
    points = medians([{**r, "model": labels.get(r["model"], r["model"])} for r in rows])
    before = None
    if args.before:
        before = [p for p in medians(rows_from_table(args.before)) if p["model"].startswith("slimres")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(points, before, args.before_label).savefig(args.out, dpi=110)
    table = markdown_table(points, ["model", "params", "runs", "acc", "acc_tta"])
    write_results(args.results, "Accuracy against parameters", [table, "", f"Figure: {args.out}"], points=points,
                  before=before, anchors=[dict(zip(("name", "params", "acc"), a, strict=True)) for a in ANCHORS])


if __name__ == "__main__":
    main()
