"""The examples never rot: each runs for one epoch on synthetic data, as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SYNTHETIC = ["--dataset", "synthetic", "--set", "synthetic_size=400", "--epochs", "1", "--batch-size", "100",
             "--threads", "1"]

pytestmark = pytest.mark.slow


def tinycifar(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tinycifar", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=cwd)
    return done


def test_notebook_script(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "notebook.py"), "--epochs", "1", "--synthetic",
                           "--out", str(tmp_path / "nb")], capture_output=True, text=True, timeout=300, env=ENV,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all 9 rules pass" in done.stdout and "final test accuracy" in done.stdout
    assert {"nb_curves.png", "nb_mistakes.png", "nb_gradcam.png"} <= {p.name for p in (tmp_path / "nb").iterdir()}


def test_my_net_checked_trained_reported_exported_and_predicted(tmp_path):
    spec = f"{EXAMPLES / 'my_net.py'}:Net"
    done = tinycifar("check", "--model", spec, "--json", cwd=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout)["passed"]
    done = tinycifar("train", "--model", spec, "--preset", "seed", *SYNTHETIC, "--out", tmp_path / "run", "--report",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "report.html").is_file()
    done = tinycifar("export", "--checkpoint", tmp_path / "run" / "best.pt", "--model", spec, "--out",
                     tmp_path / "my_net.onnx", cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "my_net.onnx").stat().st_size > 100_000, done.stderr
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "black.png")
    done = tinycifar("predict", "--checkpoint", tmp_path / "run" / "best.pt", "--model", spec,
                     tmp_path / "black.png", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith(str(tmp_path / "black.png")), done.stderr


@pytest.mark.skipif(not os.environ.get("CIFAR10_ROOT"), reason="needs the real CIFAR-10 ($CIFAR10_ROOT)")
def test_cifar_folders_example_makes_a_folder_dataset_that_trains(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "cifar_folders.py"), "--out", str(tmp_path / "pets"),
                           "--classes", "cat", "dog", "--per-class", "40"], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "pets" / "train" / "dog").glob("*.png"))) == 40
    done = tinycifar("train", "--dataset", "folder", "--data", tmp_path / "pets", "--epochs", "1", "--batch-size", "16",
                     "--threads", "1", "--out", tmp_path / "run", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_kwargs"]["num_classes"] == 2
