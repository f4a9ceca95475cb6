"""tinycifar's default run against airbench94 on the same CPU, whole process against whole process.

Each side is a subprocess timed from spawn to exit; each evaluates the test set after every epoch
(ours with ``--eval-every 1``, airbench by its own loop), and those passes are included in both
clocks. Reported: wall clock to the first evaluation at or above 85% and 90%, the best accuracy
whose evaluation ended within 60 s and within 10 minutes, the final accuracy with TTA, and the
whole wall clock. airbench runs through ``airbench_cpu.py`` (see its docstring for every change).

``--precision`` (default auto: bf16 where the CPU has it natively, else fp32) holds for both runs;
``fp32`` with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` approximates an AVX2-only CPU.
``--airbench-until 85`` ends airbench at its first evaluation at or above 85% (its whole run takes
about 45 minutes in fp32 on an AVX2 CPU); its later columns are then empty.

    python benchmarks/vs_airbench.py --out benchmarks/results/vs_airbench
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, require_airbench, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str]) -> tuple[float, float]:
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr[-800:]}")
    return started, time.time() - started


def ours(tmp: Path, seed: int, extra: list[str]) -> dict:
    out = tmp / f"tinycifar-{seed}"
    started, wall = timed([sys.executable, "-m", "tinycifar", "train", "--seed", str(seed), "--out", str(out),
                           "--quiet", "--eval-every", "1", *extra])
    with open(out / "metrics.csv", newline="") as f:
        evals = [(float(r["finished_unix_seconds"]) - started, float(r["test_acc"])) for r in csv.DictReader(f)
                 if r["test_acc"]]
    summary = json.loads((out / "summary.json").read_text())
    return row("tinycifar (default preset)", evals, wall, summary.get("final_acc_tta"), summary["final_acc"])


def airbench(tmp: Path, data: str | None, precision: str, until: float | None = None) -> dict:
    log = tmp / "airbench.jsonl"
    started, wall = timed([sys.executable, str(HERE / "airbench_cpu.py"), "--log", str(log), "--precision", precision,
                           *(["--data", data] if data else []), *(["--until", str(until)] if until else [])])
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    evals = [(e["time"] - started, e["accuracy"]) for e in entries if e["tta_level"] == 0]
    tta = next((e["accuracy"] for e in entries if e["tta_level"] == 2), None)
    return row("airbench94 (CPU adapter)", evals, wall, tta, evals[-1][1] if evals else None)


def row(name: str, evals: list[tuple[float, float]], wall: float, tta: float | None, final: float | None) -> dict:
    def first(target: float):
        return next((round(t, 1) for t, acc in evals if acc >= target), None)

    def within(seconds: float):
        inside = [acc for t, acc in evals if t <= seconds]
        best = max(inside) if inside else None
        if tta is not None and wall <= seconds:
            best = max(best or 0.0, tta)
        return round(best, 2) if best is not None else None

    return {"run": name, "wall_seconds_to_85": first(85.0), "wall_seconds_to_90": first(90.0),
            "acc_within_60s": within(60.0), "acc_within_600s": within(600.0),
            "final_acc": round(final, 2) if final is not None else None,
            "final_acc_tta": round(tta, 2) if tta is not None else None, "wall_seconds": round(wall, 1),
            "epochs_evaluated": len(evals)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="for both runs; auto: bf16 where the CPU has it natively, else fp32")
    ap.add_argument("--airbench-until", type=float, default=None, metavar="ACC",
                    help="end airbench after its first evaluation at or above ACC percent")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for our run")
    ap.add_argument("--out", default="benchmarks/results/vs_airbench")
    args = ap.parse_args()
    require_airbench("vs_airbench.py")
    extra = [a for kv in args.set for a in ("--set", kv)] + (["--data", args.data] if args.data else [])
    extra += ["--precision", args.precision]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [ours(Path(tmp), args.seed, extra)]
        print(json.dumps(rows[-1]), flush=True)
        rows.append(airbench(Path(tmp), args.data, args.precision, args.airbench_until))
        print(json.dumps(rows[-1]), flush=True)
    speedup = None
    if rows[0]["wall_seconds_to_85"] and rows[1]["wall_seconds_to_85"]:
        speedup = rows[1]["wall_seconds_to_85"] / rows[0]["wall_seconds_to_85"]
    stopped = (f" airbench was stopped after its first evaluation at or above {args.airbench_until:g}% "
               "(`--airbench-until`): its final accuracy is that evaluation's, with no TTA pass."
               if args.airbench_until else "")
    body = ["Both evaluate after every epoch, inside their clocks. Seconds are wall clock from spawn." + stopped, "",
            markdown_table(rows, ["run", "wall_seconds_to_85", "wall_seconds_to_90", "acc_within_60s",
                                  "acc_within_600s", "final_acc", "final_acc_tta", "wall_seconds"])]
    if speedup:
        body += ["", f"airbench94 / tinycifar, wall clock to 85%: **{speedup:.1f}x**"]
    write_results(args.out, "tinycifar vs airbench94 on this CPU, whole process against whole process", body,
                  rows=rows, speedup_to_85=speedup)


if __name__ == "__main__":
    main()
