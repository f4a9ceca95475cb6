"""The `seed` preset's test-accuracy curve over the reference run's, from its 75-epoch log.

    python benchmarks/reference_curve.py runs/seed-wall/seed-seed0 runs/seed-wall/seed-seed1 \\
        --log ../shared/reference/000_aaf5f41f436affc4.txt --out docs/seed_vs_reference.png
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LINE = re.compile(r"Test set: Average loss: [\d.]+, Accuracy: \d+/\d+ \(([\d.]+)%\)")


def reference_curve(log: Path) -> list[float]:
    """Test accuracy after each epoch, in the order the log prints them."""
    return [float(m.group(1)) for m in LINE.finditer(log.read_text(errors="replace"))]


def run_curve(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["test_acc"]) for r in csv.DictReader(f) if r["test_acc"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--log", type=Path, default=Path("../shared/reference/000_aaf5f41f436affc4.txt"))
    ap.add_argument("--out", type=Path, default=Path("docs/seed_vs_reference.png"))
    args = ap.parse_args()

    reference = reference_curve(args.log)
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    ax.plot(range(1, len(reference) + 1), reference, color="black", lw=2,
            label=f"reference log (final {reference[-1]:.2f}%)")
    finals = []
    for run in args.runs:
        curve = run_curve(run)
        finals.append(curve[-1])
        ax.plot(range(1, len(curve) + 1), curve, lw=1.2,
                label=f"tinycifar seed preset, {run.name} (final {curve[-1]:.2f}%)")
    ax.axhline(85, color="gray", ls=":", lw=1)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(40, 90),
           title=f"seed preset against the reference run (median final {statistics.median(finals):.2f}% "
                 f"vs {reference[-1]:.2f}%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(args.out, dpi=110)
    late = [statistics.mean(run_curve(r)[e] - reference[e] for r in args.runs) for e in range(19, len(reference))]
    print(f"reference final {reference[-1]:.2f}%, runs {', '.join(f'{f:.2f}%' for f in finals)}, median "
          f"{statistics.median(finals):.2f}%; mean gap epochs 20-{len(reference)}: {statistics.mean(late):+.2f} points")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
