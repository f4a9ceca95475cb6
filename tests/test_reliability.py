"""Faults during training: SIGKILL at chosen points (also mid-write), a full disk, a diverging loss.

Each kill test runs the real command line in a child process that SIGKILLs itself at one
point of one file write, then ``--resume`` must finish with exactly the metrics of an
uninterrupted run.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tinycifar import checkpoint
from tinycifar.checkpoint import load_checkpoint
from tinycifar.cli import main

ARGS = ["--dataset", "synthetic", "--set", "synthetic_size=256", "--epochs", "3", "--batch-size", "32", "--lr", "0.05",
        "--aug", "none", "--precision", "fp32", "--device", "cpu", "--threads", "1", "--quiet", "--eval-every", "1"]
TIMING_KEYS = {"train_seconds", "images_per_second", "seconds_to_target"}

# Runs `tinycifar train` and SIGKILLs itself at write number NTH of file TARGET:
#   mid    - half of the bytes are in the temporary file
#   before - all bytes written and fsynced, not yet renamed into place
#   after  - renamed into place, before whatever the engine writes next
DRIVER = textwrap.dedent("""
    import io, os, signal, sys
    from pathlib import Path
    from tinycifar import checkpoint
    from tinycifar.training import train
    from tinycifar.cli import main

    target, nth, where, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    real = checkpoint.atomic_write_bytes
    seen = 0

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def patched(path, write):
        global seen
        if Path(path).name != target:
            return real(path, write)
        seen += 1
        if seen != nth:
            return real(path, write)
        if where == "after":
            real(path, write)
            die()

        def dying(f):
            if where == "mid":
                buf = io.BytesIO()
                write(buf)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
            die()

        real(path, dying)

    checkpoint.atomic_write_bytes = patched
    train.atomic_write_bytes = patched
    sys.exit(main(argv))
""")


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


def summary(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in s.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end up equal to."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *ARGS, "--out", str(out)]) == 0
    return out


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert read_metrics(run_dir) == read_metrics(reference)
    assert summary(run_dir) == summary(reference)
    a, b = load_checkpoint(run_dir / "last.pt"), load_checkpoint(reference / "last.pt")
    assert a["epoch"] == b["epoch"]
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in b["model_state"])
    assert not list(run_dir.glob(".*.tmp")), "temporary files of the killed run are left"


KILL_POINTS = {
    # file, nth write, where; what is on disk afterwards
    "last.pt mid-write, epoch 2": ("last.pt", 2, "mid"),
    "last.pt written, not renamed, epoch 2": ("last.pt", 2, "before"),
    "last.pt renamed, metrics.csv not yet, epoch 2": ("last.pt", 2, "after"),
    "best.pt mid-write, second time": ("best.pt", 2, "mid"),
    "metrics.csv mid-write, last epoch": ("metrics.csv", 3, "mid"),
    "summary.json mid-write, after the last epoch": ("summary.json", 1, "mid"),
}


def kill_at(out: Path, target: str, nth: int, where: str) -> None:
    killed = subprocess.run([sys.executable, "-c", DRIVER, target, str(nth), where, "train", *ARGS,
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr


def resume_in_process(out: Path) -> None:
    torch.set_num_threads(1)
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("target,nth,where", KILL_POINTS.values(), ids=KILL_POINTS.keys())
def test_sigkill_at_a_write_then_resume_gives_the_uninterrupted_run(tmp_path, reference, target, nth, where):
    out = tmp_path / "run"
    kill_at(out, target, nth, where)
    state = load_checkpoint(out / "last.pt")  # always a whole checkpoint, never the half-written one
    if (out / "metrics.csv").exists():
        assert len(read_metrics(out)) <= state["epoch"]
    stale = list(out.glob(f".{target}.*.tmp"))
    assert bool(stale) == (where != "after"), "a kill inside a write leaves its temporary file, and only then"
    resume_in_process(out)
    assert_same_run(out, reference)  # also: the stale temporary files are gone


def test_sigkill_while_writing_config_json_leaves_a_folder_a_new_run_can_use(tmp_path, reference):
    out = tmp_path / "run"
    kill_at(out, "config.json", 1, "mid")
    assert not (out / "last.pt").exists()
    assert main(["train", "--resume", "--out", str(out)]) == 2
    assert main(["train", *ARGS, "--out", str(out)]) == 0
    assert read_metrics(out) == read_metrics(reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1234])
def test_sigkill_at_a_random_time_then_resume(tmp_path, reference, seed):
    """A kill at a random moment (seeded, so a failure can be replayed), wherever it lands."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tinycifar", "train", *ARGS, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(2.0, 5.0))
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    if (out / "last.pt").exists():
        resume_in_process(out)
    else:  # killed before the first epoch ended: nothing to resume, start again
        assert main(["train", *ARGS, "--out", str(out)]) == 0
    assert_same_run(out, reference)


# ---------------------------------------------------------------------------- disk full


class FullDisk(io.RawIOBase):
    def __init__(self, f):
        self.f = f

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("how", ["torch.save", "fsync"])
def test_disk_full_on_a_checkpoint_stops_cleanly_and_resume_finishes(tmp_path, reference, monkeypatch, capsys, how):
    """The first epoch saves; from the second on the disk is full. Exit 1, one line, last.pt intact."""
    out = tmp_path / "run"
    saves = {"n": 0}
    real_save, real_fsync = torch.save, os.fsync

    def full_save(obj, f, *args, **kwargs):
        saves["n"] += 1
        return real_save(obj, f if saves["n"] <= 2 else FullDisk(f), *args, **kwargs)  # best.pt + last.pt

    def full_fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".last.pt." in name or ".best.pt." in name:
            saves["n"] += 1
            if saves["n"] > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    if how == "torch.save":
        monkeypatch.setattr(torch, "save", full_save)
    else:
        monkeypatch.setattr(checkpoint.os, "fsync", full_fsync)
    rc = main(["train", *ARGS, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1, err
    assert "No space left on device" in err[0]
    assert f"{out / 'last.pt'} (epoch 1) is intact" in err[0]
    assert "Traceback" not in err[0]
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert len(read_metrics(out)) == 1
    assert not list(out.glob(".*.tmp"))

    monkeypatch.undo()  # room again
    resume_in_process(out)
    assert_same_run(out, reference)


def test_disk_full_on_the_summary_keeps_the_checkpoint(tmp_path, reference, monkeypatch, capsys):
    from tinycifar.training import train as train_mod

    out = tmp_path / "run"
    real = train_mod.write_json

    def full(path, obj):
        if Path(path).name == "summary.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj)

    monkeypatch.setattr(train_mod, "write_json", full)
    assert main(["train", *ARGS, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "summary.json" in err[0] and "(epoch 3) is intact" in err[0]
    monkeypatch.undo()
    resume_in_process(out)
    assert_same_run(out, reference)
