"""The Python half of benchmarks/gpu_check.sh: the machine it runs on, CIFAR-shaped data that needs no
download, and the results table of the whole commands it timed.

    python benchmarks/gpu_check.py env              # one line per fact: torch, the GPU, what imports from where
    python benchmarks/gpu_check.py data DIR         # a synthetic cifar-10-batches-py tree of CIFAR-10's sizes
    python benchmarks/gpu_check.py report --timings T --results benchmarks/results --data-note TEXT
                                                    # -> benchmarks/results/gpu_nvidia-h200.md and .json

The data: the lent GPU machine has no network and a call carries at most 64 MiB, less than
CIFAR-10 (178 MB unpacked, 163 MB packed, and its images do not compress much further), so unless
``gpu_check.sh --data DIR`` names a real copy, every command trains on a synthetic dataset of
CIFAR's shape and size (50,000 + 10,000 images, written once in the official python format and
read by the same loader as CIFAR-10). Its timings are CIFAR-10's; its accuracies are not.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, write_results  # noqa: E402

COLUMNS = ["command", "precision", "wall s", "train s", "compile s", "final acc", "TTA acc", "epoch s", "rc"]


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def environment() -> list[str]:
    """What the results depend on, one fact a line; says plainly when no CUDA device is seen."""
    lines = [f"python: {sys.version.split()[0]}", f"torch: {torch.__version__} (CUDA build: {torch.version.cuda})"]
    if not torch.cuda.is_available():
        return [*lines, "cuda: no CUDA device is seen by torch"]
    major, minor = torch.cuda.get_device_capability(0)
    return [*lines, f"cuda: {torch.cuda.device_count()} device(s); device 0: {gpu_name()}, compute capability "
            f"{major}.{minor}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"]


def installed() -> list[str]:
    """Whether tinycifar (with the dependencies pip --no-deps did not check) and airbench import."""
    import importlib.util

    lines = []
    for name in ("tinycifar", "tqdm", "matplotlib", "numpy", "PIL", "airbench"):
        spec = importlib.util.find_spec(name)
        lines.append(f"{name}: {Path(spec.origin).parent if spec and spec.origin else 'missing'}")
    return lines


def slug(name: str | None) -> str:
    """A file-name-safe form of the GPU's name: 'NVIDIA H200' -> 'nvidia-h200'; no GPU -> 'cpu-dry-run'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") if name else "cpu-dry-run"


def write_synthetic_tree(root: Path, seed: int = 0) -> Path:
    """A cifar-10-batches-py folder of synthetic images at CIFAR-10's sizes (5 x 10,000 + 10,000).

    Trained on with ``--data root --allow-modified`` (its md5 sums are not the official ones).
    """
    from tinycifar.data import cifar10

    n = cifar10.IMAGES_PER_BATCH
    train, test = cifar10.synthetic_cifar10(5 * n, n, seed=seed)
    folder = root / cifar10.PY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(cifar10.TRAIN_BATCHES):
        cifar10.save_py_batch(folder / name, train.images[i * n:(i + 1) * n], train.labels[i * n:(i + 1) * n])
    cifar10.save_py_batch(folder / cifar10.TEST_BATCH, test.images, test.labels)
    return folder


def epoch_seconds(run_dir: Path) -> str:
    """The training seconds of each epoch, from the run's metrics.csv (a few epochs: all of them)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    if len(seconds) > 8:
        return f"first {seconds[0]:.2f}, median {statistics.median(seconds):.2f}"
    return ", ".join(f"{s:.2f}" for s in seconds)


def tinycifar_row(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"resolved": summary.get("precision"), "train s": summary.get("train_seconds"),
            "compile s": summary.get("compile_seconds"), "final acc": summary.get("final_acc"),
            "TTA acc": summary.get("final_acc_tta"), "epoch s": epoch_seconds(run_dir)}


def airbench_row(evaluations: Path, output: Path) -> dict:
    """airbench's accuracies from its evaluation log; its own training clock from the last row it printed."""
    rows = [json.loads(line) for line in evaluations.read_text().splitlines() if line.strip()]
    plain = [r["accuracy"] for r in rows if r["tta_level"] == 0]
    tta = [r["accuracy"] for r in rows if r["tta_level"] > 0]
    final = [line for line in output.read_text().splitlines() if re.search(r"\|\s*eval\s*\|", line)]
    own_clock = float(final[-1].strip(" |").split("|")[-1]) if final else None
    return {"resolved": "fp16", "train s": own_clock, "final acc": plain[-1] if plain else None,
            "TTA acc": tta[-1] if tta else None}


def result_row(timing: dict) -> dict:
    """One table row from a line of the timings file and what the command left behind."""
    row = {"command": f"`{timing['command']}`", "precision": timing["precision"], "wall s": float(timing["wall_s"]),
           "rc": int(timing["rc"])}
    place = Path(timing["place"])
    try:
        found = (airbench_row(place / "evaluations.jsonl", place / "output.log") if timing["kind"] == "airbench"
                 else tinycifar_row(place))
    except (OSError, ValueError, KeyError) as e:  # a failed or skipped command left no results
        row["epoch s"] = f"no results ({type(e).__name__})"
        return row
    resolved = found.pop("resolved")
    if timing["precision"] == "auto" and resolved:
        row["precision"] = f"auto: {resolved}"
    return {**row, **found}


def report(timings: Path, results: Path, data_note: str, tests_line: str) -> Path:
    """Write RESULTS/gpu_<gpu-name>.md and .json; returns the Markdown file's path."""
    with open(timings, newline="") as f:
        rows = [result_row(t) for t in csv.DictReader(f, delimiter="\t")]
    body = ["Whole commands, each timed from spawn to exit on this machine, one after another.", "",
            f"Data: {data_note}", "", f"CUDA tests (`pytest -m cuda tests/test_cuda.py`): {tests_line}", "",
            *[f"- {line}" for line in environment()], "", markdown_table(rows, COLUMNS), "",
            "`train s` is the run's own training clock (tinycifar's summary, airbench's printed total); "
            "`epoch s` the seconds of each training epoch; `rc` the command's exit status (124: stopped by the "
            "time limit; -1: not started, because the script's time budget was spent or, as its command says, what it "
            "needs is missing)."]
    out = results / f"gpu_{slug(gpu_name())}"
    write_results(out, f"GPU check: {gpu_name() or 'no GPU (dry run)'}", body, rows=rows, data=data_note)
    return out.with_suffix(".md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("env")
    data = sub.add_parser("data")
    data.add_argument("root", type=Path)
    rep = sub.add_parser("report")
    rep.add_argument("--timings", type=Path, required=True, help="tab-separated: kind, command, precision, ...")
    rep.add_argument("--results", type=Path, required=True, help="folder of gpu_<gpu-name>.md and .json")
    rep.add_argument("--data-note", required=True)
    rep.add_argument("--tests", default="not run", help="pytest's closing line")
    args = ap.parse_args()
    if args.command == "env":
        print("\n".join(environment() + installed()))
    elif args.command == "data":
        print(write_synthetic_tree(args.root))
    else:
        print(f"results: {report(args.timings, args.results, args.data_note, args.tests)}")


if __name__ == "__main__":
    main()
