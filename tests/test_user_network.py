"""A user's own network file through every command: train, resume, eval, report, predict, export, torchrun.

And the checkpoint's side of "user code is code": it names its network's file and sha256,
never imports that file by itself, refuses an edited file unless told, and says how to
point at a moved one.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_line, run_main
from PIL import Image

from tinycifar.checkpoint import load_checkpoint
from tinycifar.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# Any nn.Module: no features/head split, functional pooling, a residual addition.
USER_NET = """
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.body = nn.Conv2d(2 * width, 2 * width, 3, padding=2, dilation=2)
        self.out = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = F.relu(self.down(F.relu(self.stem(x))))
        x = x + F.relu(self.body(x))
        return self.out(x.mean((2, 3)))
"""

TRAIN = ["--dataset", "synthetic", "--set", "synthetic_size=300", "--epochs", "2", "--batch-size", "50",
         "--threads", "1", "--quiet"]




@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run of the user's network with the fast preset (whitening stem, 20x20 epochs, EMA)."""
    root = tmp_path_factory.mktemp("user")
    net = root / "my_net.py"
    net.write_text(textwrap.dedent(USER_NET))
    run = root / "run"
    assert main(["train", "--model", f"{net}:Net", "--model-arg", "width=12", "--out", str(run), *TRAIN]) == 0
    return net, run


@pytest.fixture
def moved(trained, tmp_path):
    """A copy of the run and the network file, so a test may edit or remove them."""
    net, run = trained
    new_net = tmp_path / "my_net.py"
    new_net.write_bytes(net.read_bytes())
    new_run = tmp_path / "run"
    new_run.mkdir()
    for f in run.iterdir():
        (new_run / f.name).write_bytes(f.read_bytes())
    return new_net, new_run


def test_the_checkpoint_names_the_spec_and_the_source_hash(trained):
    net, run = trained
    state = load_checkpoint(run / "best.pt")
    assert state["model"] == f"{net}:Net" and state["model_kwargs"] == {"width": 12}
    source = state["model_source"]
    assert source["kind"] == "file" and source["path"] == str(net.resolve())
    assert source["sha256"] == hashlib.sha256(net.read_bytes()).hexdigest()
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == f"{net}:Net" and config["model_kwargs"] == {"width": 12}
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 2


def test_eval_report_predict_export_with_the_named_network(trained, tmp_path, capsys):
    net, run = trained
    spec = f"{net}:Net"
    rc, out, _ = run_main(capsys, ["eval", "--checkpoint", run / "best.pt", "--model", spec, "--json"])
    assert rc == 0 and json.loads(out)["total"] == 75
    rc, out, _ = run_main(capsys, ["report", run, "--model", spec])
    assert rc == 0 and (run / "report.html").is_file() and (run / "gradcam.png").is_file()
    # the automatic Grad-CAM layer of a network without `features`: the last conv map of at least 8x8
    assert "Grad-CAM layer</td><td>body (12" not in (run / "report.html").read_text()
    assert ">body (24x16x16)<" in (run / "report.html").read_text()
    rc, _, _ = run_main(capsys, ["report", run, "--model", spec, "--cam-layer", "stem"])
    assert rc == 0 and ">stem (12x32x32)<" in (run / "report.html").read_text()
    image = tmp_path / "cat.png"
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(image)
    rc, out, _ = run_main(capsys, ["predict", "--checkpoint", run / "best.pt", "--model", spec, image, "--json"])
    assert rc == 0 and len(json.loads(out)[0]["top_k"]) == 3
    for fmt in ("onnx", "onnx-int8", "torchscript"):
        rc, out, _ = run_main(capsys, ["export", "--checkpoint", run / "best.pt", "--model", spec, "--format", fmt,
                                       "--out", tmp_path / f"m.{fmt}"])
        assert rc == 0 and (tmp_path / f"m.{fmt}").stat().st_size > 10_000


def test_a_bad_cam_layer_is_one_line(trained, capsys):
    net, run = trained
    rc, _, err = run_main(capsys, ["report", run, "--model", f"{net}:Net", "--cam-layer", "nope"])
    one_line(rc, err, "--cam-layer nope: no such module")
    rc, _, err = run_main(capsys, ["report", run, "--model", f"{net}:Net", "--cam-layer", "out"])
    one_line(rc, err, "--cam-layer out: its output is not an N x C x H x W map")


@pytest.mark.parametrize("command", ["eval", "predict", "export", "report"])
def test_a_checkpoint_never_runs_its_network_file_by_itself(trained, tmp_path, capsys, command):
    net, run = trained
    argv = {"eval": ["eval", "--checkpoint", run / "best.pt"],
            "predict": ["predict", "--checkpoint", run / "best.pt", tmp_path],
            "export": ["export", "--checkpoint", run / "best.pt", "--out", tmp_path / "m.onnx"],
            "report": ["report", run]}[command]
    rc, _, err = run_main(capsys, argv)
    one_line(rc, err, "trained with your own network", f"pass --model {net}:Net")


def test_an_edited_network_file_is_refused_unless_allowed(moved, capsys):
    net, run = moved
    spec = f"{net}:Net"
    # the checkpoint recorded the original path; it still exists, edited
    original = Path(load_checkpoint(run / "best.pt")["model_source"]["path"])
    assert original != net.resolve()
    net.write_text(net.read_text() + "\n# a comment changes the hash\n")
    rc, _, err = run_main(capsys, ["eval", "--checkpoint", run / "best.pt", "--model", spec])
    one_line(rc, err, "differs from the one it was trained with", "--allow-changed-source")
    rc, out, _ = run_main(capsys, ["eval", "--checkpoint", run / "best.pt", "--model", spec, "--allow-changed-source"])
    assert rc == 0 and "Accuracy" in out


def test_a_moved_file_with_the_same_content_loads(moved, capsys):
    net, run = moved
    rc, out, _ = run_main(capsys, ["eval", "--checkpoint", run / "best.pt", "--model", f"{net}:Net"])
    assert rc == 0 and "Accuracy" in out


def test_messages_say_whether_the_file_is_missing_or_changed(moved, capsys, tmp_path):
    from tinycifar.checkpoint import user_code_refusal
    from tinycifar.models import ModelSource

    net, _ = moved
    missing = ModelSource(f"{tmp_path / 'gone.py'}:Net", "file", str(tmp_path / "gone.py"), "0" * 64)
    assert "gone.py is missing; pass --model NEW/PATH.py:Net to point at it" in user_code_refusal("c.pt", missing)
    changed = ModelSource(f"{net}:Net", "file", str(net), "0" * 64)
    assert "has changed since; pass --model" in user_code_refusal("c.pt", changed)


def test_resume_needs_the_network_named(moved, capsys):
    _, run = moved
    (run / "summary.json").unlink()
    spec = load_checkpoint(run / "last.pt")["model"]  # the spec the run was started with
    rc, _, err = run_main(capsys, ["train", "--resume", "--out", run, "--quiet"])
    one_line(rc, err, "--resume", f"pass --model {spec}")
    rc, _, err = run_main(capsys, ["train", "--resume", "--out", run, "--quiet", "--model", spec, "--epochs", "3"])
    one_line(rc, err, "cannot change epochs")
    rc, _, err = run_main(capsys, ["train", "--resume", "--out", run, "--quiet", "--model", spec])
    assert rc == 0, err  # the run had finished: nothing left to train, the summary is written again
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 2


def test_resume_refuses_an_edited_file(tmp_path, capsys):
    net = tmp_path / "my_net.py"
    net.write_text(textwrap.dedent(USER_NET))
    run = tmp_path / "run"
    argv = ["train", "--model", f"{net}:Net", "--out", run, *TRAIN]
    assert run_main(capsys, argv)[0] == 0
    net.write_text(net.read_text() + "\n# edited\n")
    rc, _, err = run_main(capsys, ["train", "--resume", "--out", run, "--model", f"{net}:Net", "--quiet"])
    one_line(rc, err, "has changed since", "--allow-changed-source")
    rc, _, err = run_main(capsys, ["train", "--resume", "--out", run, "--model", f"{net}:Net", "--quiet",
                                   "--allow-changed-source"])
    assert rc == 0, err  # nothing left to train: the run had finished; the summary is rewritten
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 2


def test_the_whitening_stem_needs_a_fitting_first_conv(tmp_path, capsys):
    net = tmp_path / "wide.py"
    net.write_text(textwrap.dedent(USER_NET).replace("width=16", "width=64"))  # 64 filters > 2 * 27
    rc, _, err = run_main(capsys, ["train", "--model", f"{net}:Net", "--out", tmp_path / "r", *TRAIN])
    one_line(rc, err, "whiten_stem", "--set whiten_stem=false")
    assert not (tmp_path / "r").exists()
    rc, _, _ = run_main(capsys, ["train", "--model", f"{net}:Net", "--out", tmp_path / "r", *TRAIN,
                                 "--set", "whiten_stem=false", "--epochs", "1"])
    assert rc == 0


def test_a_network_that_cannot_take_the_low_resolution_epochs(tmp_path, capsys):
    net = tmp_path / "flat.py"
    net.write_text(textwrap.dedent("""
        from torch import nn
        def Net():
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 32 * 32, 10))
    """))
    # the fast preset's first third of the epochs is at 20x20: one of three epochs
    rc, _, err = run_main(capsys, ["train", "--model", f"{net}:Net", "--out", tmp_path / "r", *TRAIN, "--epochs", "3"])
    one_line(rc, err, "20x20", "--set low_res=0")
    rc, _, _ = run_main(capsys, ["train", "--model", f"{net}:Net", "--out", tmp_path / "r", *TRAIN,
                                 "--set", "low_res=0", "--set", "mid_res=28", "--epochs", "1"])
    assert rc == 0  # low_res=0: every epoch at 32x32


def test_a_network_that_cannot_take_the_mid_resolution_epoch(tmp_path, capsys):
    net = tmp_path / "two_sizes.py"
    net.write_text(textwrap.dedent("""
        from torch import nn
        class Net(nn.Module):  # a head for 20x20 and one for 32x32 maps, none for 28x28
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3, padding=1)
                self.at20, self.at32 = nn.Linear(8 * 20 * 20, 10), nn.Linear(8 * 32 * 32, 10)
            def forward(self, x):
                x = self.conv(x).flatten(1)
                return self.at20(x) if x.shape[1] == 8 * 20 * 20 else self.at32(x)
    """))
    # one of three epochs at 20x20 in either precision's recipe, then one at 28x28
    rc, _, err = run_main(capsys, ["train", "--model", f"{net}:Net", "--out", tmp_path / "r", *TRAIN,
                                   "--epochs", "3", "--set", "mid_res=28", "--set", "whiten_stem=false"])
    one_line(rc, err, "28x28", "--set mid_res=0")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_torchrun_trains_a_user_network(tmp_path):
    from test_distributed import torchrun

    net = tmp_path / "my_net.py"
    net.write_text(textwrap.dedent(USER_NET))
    out = tmp_path / "ddp"
    done = torchrun("--model", f"{net}:Net", "--dataset", "synthetic", "--set", "synthetic_size=300", "--epochs", "1",
                    "--batch-size", "40", "--device", "cpu", "--threads", "1", "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["model"] == f"{net}:Net"


def test_a_real_process_with_a_broken_file_prints_one_line(tmp_path):
    net = tmp_path / "broken.py"
    net.write_text("def Net(:\n")
    done = subprocess.run([sys.executable, "-m", "tinycifar", "check", "--model", f"{net}:Net"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "broken.py failed to import (SyntaxError" in done.stderr
