"""benchmarks/gpu_check.sh without a GPU: its dry run end to end, its bad input, and the Python half's
data and results table (benchmarks/gpu_check.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinycifar.data import cifar10

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import airbench_gpu  # noqa: E402
import gpu_check  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
TIMED_ON_A_GPU = ["--preset fast --precision auto", "--preset fast --precision fp16",
                  "--preset seed --epochs 3 --precision auto", "--preset seed --epochs 3 --precision fp16",
                  "--preset best --epochs 2 --precision auto", "--preset best --epochs 2 --precision fp16",
                  "--preset fast --precision auto --compile"]


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    done = run_script("--dry-run", "--results", str(results))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout, results


def test_dry_run_checks_the_environment_and_lists_what_it_would_time(dry_run):
    stdout, _ = dry_run
    if not torch.cuda.is_available():
        assert "cuda: no CUDA device is seen by torch" in stdout
    assert f"tinycifar: {ROOT / 'src' / 'tinycifar'}" in stdout  # the checkout's own code
    assert "would run: " in stdout and "--no-deps" in stdout  # installs over the machine's torch, offline
    would_time = [line for line in stdout.splitlines() if line.startswith("would time: ")]
    assert [line.split("tinycifar train ")[1].split(" --data")[0] for line in would_time[:-1]] == TIMED_ON_A_GPU
    assert "airbench_gpu.py" in would_time[-1]


def test_dry_run_runs_the_cuda_tests_which_skip_without_a_gpu(dry_run):
    stdout, _ = dry_run
    if not torch.cuda.is_available():
        assert "skipped" in stdout and "needs a CUDA device" in stdout and " passed" not in stdout


def test_dry_run_writes_the_results_table_from_a_timed_cpu_command(dry_run):
    _, results = dry_run
    md = (results / f"gpu_{gpu_check.slug(gpu_check.gpu_name())}.md").read_text()
    assert "| command | precision | wall s | train s | compile s | final acc | TTA acc | epoch s | rc |" in md
    (row,) = json.loads((results / f"gpu_{gpu_check.slug(gpu_check.gpu_name())}.json").read_text())["rows"]
    assert row["command"] == "`tinycifar train --preset fast --epochs 1`" and row["rc"] == 0
    assert row["wall s"] > row["train s"] > 0  # the whole process, start-up and test pass included
    assert 0 <= row["final acc"] <= 100 and row["epoch s"] == f"{row['train s']:.2f}"


def test_a_spent_time_budget_starts_nothing_and_still_writes_the_table(tmp_path):
    done = run_script("--dry-run", "--budget", "20", "--results", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "not started (time budget spent)" in done.stdout and "not run: the time budget is spent" in done.stdout
    (row,) = json.loads((tmp_path / f"gpu_{gpu_check.slug(gpu_check.gpu_name())}.json").read_text())["rows"]
    assert row["rc"] == -1 and row["epoch s"].startswith("no results")


@pytest.mark.parametrize(("args", "fragment"), [
    (["--budget", "soon"], "--budget: expected whole seconds"),
    (["--data", "/nonexistent"], "--data /nonexistent: expected a folder holding cifar-10-batches-py/"),
    (["--fast"], "unknown option '--fast'"),
])
def test_bad_options_get_one_line_and_exit_2(args, fragment):
    done = run_script(*args, timeout=30)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and fragment in done.stderr, done.stderr


# ---------------------------------------------------------------------------- the Python half


def test_gpu_names_become_file_names():
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.slug("Tesla T4") == "tesla-t4"
    assert gpu_check.slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"
    assert gpu_check.slug(None) == "cpu-dry-run"


def test_the_synthetic_tree_reads_as_cifar10(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "IMAGES_PER_BATCH", 20)  # CIFAR's 10,000 a batch, scaled down
    gpu_check.write_synthetic_tree(tmp_path)
    train, test = cifar10.load_cifar10(tmp_path, verify_md5=False)
    assert train.images.shape == (100, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
    assert set(train.labels.tolist()) == set(range(10))


def airbench_log(folder: Path) -> None:
    """What airbench_gpu.py leaves: its evaluation log, and airbench 0.1.8's printed table (print_columns)."""
    folder.mkdir()
    rows = [{"time": 1.0, "tta_level": 0, "accuracy": 91.5}, {"time": 2.0, "tta_level": 0, "accuracy": 93.9},
            {"time": 3.0, "tta_level": 2, "accuracy": 94.1}]
    (folder / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cells = ["      ", "  eval", "          ", "         ", "       ", "     0.9410", "            3.8312"]
    (folder / "output.log").write_text("|  " + "  |  ".join(cells) + "  |\n")


def test_result_rows_read_airbench_and_say_when_a_command_left_nothing(tmp_path):
    airbench_log(tmp_path / "airbench")
    row = gpu_check.result_row({"kind": "airbench", "command": "airbench94", "precision": "fp16", "wall_s": "9.5",
                                "rc": "0", "place": str(tmp_path / "airbench")})
    assert (row["final acc"], row["TTA acc"], row["train s"], row["wall s"]) == (93.9, 94.1, 3.8312, 9.5)
    skipped = gpu_check.result_row({"kind": "tinycifar", "command": "tinycifar train --preset best",
                                    "precision": "fp16", "wall_s": "0", "rc": "-1", "place": str(tmp_path / "none")})
    assert skipped["rc"] == -1 and skipped["epoch s"].startswith("no results")


def test_airbench_gets_its_cache_files_in_its_own_format(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "IMAGES_PER_BATCH", 20)
    gpu_check.write_synthetic_tree(tmp_path / "data")
    (tmp_path / "cifar10").mkdir()
    airbench_gpu.write_airbench_cache(tmp_path / "cifar10", str(tmp_path / "data"), verify_md5=False)
    train, _ = cifar10.load_cifar10(tmp_path / "data", verify_md5=False)
    cache = torch.load(tmp_path / "cifar10" / "train.pt", weights_only=True)  # as airbench 0.1.8's CifarLoader
    assert cache["images"].dtype == torch.uint8 and cache["images"].shape == (100, 32, 32, 3)  # NHWC
    assert torch.equal(cache["images"].permute(0, 3, 1, 2), train.images)  # what CifarLoader does with it
    assert torch.equal(cache["labels"], train.labels) and cache["classes"] == list(cifar10.CLASSES)
    assert len(torch.load(tmp_path / "cifar10" / "test.pt", weights_only=True)["labels"]) == 20
