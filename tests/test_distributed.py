"""Two processes under torchrun (CPU, gloo): one run folder, one progress stream, exact evaluation, resume.

The run: 614 synthetic training images, a global batch of 40 (20 per process), so an epoch
is floor(614 / 40) = 15 steps, but the last trains on the hardest half (keep_hardest=0.5): 307
images, 153 per process, 7 steps of 20; 153 test images, an odd number, split 77 + 76 between ranks.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinycifar.checkpoint import load_checkpoint, model_from_checkpoint
from tinycifar.data import synthetic_cifar10
from tinycifar.data.loader import DeviceLoader
from tinycifar.evaluate import evaluate

pytestmark = pytest.mark.slow

N_TRAIN, BATCH, EPOCHS = 614, 40, 3
N_TEST = N_TRAIN // 4
STEPS = [15, 15, 7]
# freeze_stem_after=1, then late_freeze_blocks=2 in the last epoch: DDP must be rebuilt each time parameters
# stop training mid-run; and the last epoch takes the images whose losses, gathered from both ranks, were highest
ARGS = ["--dataset", "synthetic", "--set", f"synthetic_size={N_TRAIN}", "--set", "dropout=0.0",
        "--set", "freeze_stem_after=1", "--set", "late_freeze_blocks=2", "--set", "keep_hardest=0.5",
        "--set", "keep_hardest_epochs=1", "--epochs", str(EPOCHS),
        "--batch-size", str(BATCH), "--lr", "0.1", "--schedule", "constant",
        "--aug", "none", "--precision", "fp32", "--device", "cpu", "--threads", "1", "--eval-every", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_argv(*train_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "tinycifar", "train", *train_args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*train_args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_argv(*train_args), capture_output=True, text=True, timeout=timeout, env=ENV)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = torchrun(*ARGS, "--report", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_two_processes_converge(ddp_run):
    out, _ = ddp_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["final_acc"] > 60  # chance is 10%
    rows = read_metrics(out)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_one_run_folder_and_one_progress_stream(ddp_run):
    out, done = ddp_run
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert (out / "metrics.csv").read_text().count("epoch,lr") == 1
    names = {p.name for p in out.iterdir()}
    assert {"best.pt", "config.json", "last.pt", "metrics.csv", "summary.json", "report.html"} <= names
    assert not [n for n in names if n.startswith(".")], "temporary files left behind"
    stdout = done.stdout
    assert stdout.count("report: ") == 1  # written by rank 0 only
    assert stdout.count("tinycifar: fastnet") == 1  # the fast preset's network, printed by rank 0 only
    for epoch in range(1, EPOCHS + 1):
        assert stdout.count(f"EPOCH: {epoch}\n") == 1
    assert stdout.count("Test set:") == EPOCHS
    assert stdout.count("Done: best") == 1
    # tqdm's bar goes to stderr: one bar per epoch, all from rank 0 (ends with the last batch id)
    assert done.stderr.count(f"Batch_id={STEPS[0] - 1} ") >= EPOCHS - 1
    assert done.stderr.count(f"Batch_id={STEPS[-1] - 1} ") >= 1


def test_steps_per_epoch_is_floor_of_images_over_the_global_batch(ddp_run):
    out, _ = ddp_run
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2
    assert resolved["per_rank_batch"] == BATCH // 2
    assert resolved["steps_per_epoch"] == N_TRAIN // BATCH == 15
    assert [int(r["train_images"]) for r in read_metrics(out)] == [s * BATCH for s in STEPS]
    summary = json.loads((out / "summary.json").read_text())
    images = summary["images_per_second"] * summary["train_seconds"]
    assert images == pytest.approx(sum(STEPS) * BATCH, rel=0.01)


def test_the_hardest_images_are_chosen_from_both_ranks_losses(ddp_run):
    out, _ = ddp_run
    losses = load_checkpoint(out / "last.pt")["image_losses"]  # rank 0's, after the merge
    assert losses.shape == (N_TRAIN,)
    assert (losses > 0).float().mean() > 0.95  # rank 0 alone saw half of each epoch


def test_evaluation_counts_every_test_image_once(ddp_run):
    out, done = ddp_run
    totals = re.findall(r"Accuracy: (\d+)/(\d+)", done.stdout)
    assert len(totals) == EPOCHS and all(int(total) == N_TEST for _, total in totals)
    rows = read_metrics(out)
    for (correct, _), row in zip(totals, rows, strict=True):
        assert float(row["test_acc"]) == round(100 * int(correct) / N_TEST, 4)


def test_the_checkpoint_loads_in_one_process_and_gives_the_logged_accuracy(ddp_run):
    out, _ = ddp_run
    state = load_checkpoint(out / "last.pt")
    assert not any(k.startswith("module.") for k in state["model_state"])
    model = model_from_checkpoint(state, out / "last.pt")
    _, test = synthetic_cifar10(N_TRAIN, N_TEST, seed=0)
    torch.set_num_threads(1)
    result = evaluate(model, DeviceLoader(test, 1000, state["mean"], state["std"]))
    last = read_metrics(out)[-1]
    assert result.total == N_TEST
    assert round(result.accuracy, 4) == float(last["test_acc"])
    # rank 0 and rank 1 evaluate with rank 0's batch-norm statistics, the ones saved
    assert result.loss == pytest.approx(float(last["test_loss"]), abs=2e-6)


def test_resume_under_torchrun_after_killing_all_processes(ddp_run, tmp_path):
    reference, _ = ddp_run
    out = tmp_path / "run"
    proc = subprocess.Popen(torchrun_argv(*ARGS, "--quiet", "--out", str(out)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.csv").exists() and len(read_metrics(out)) >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers: its own process group
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    saved = load_checkpoint(out / "last.pt")["epoch"]
    assert 1 <= saved < EPOCHS
    done = torchrun("--resume", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(reference))
    a, b = load_checkpoint(out / "last.pt"), load_checkpoint(reference / "last.pt")
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in b["model_state"])


def test_a_bad_run_folder_stops_both_processes(ddp_run):
    out, _ = ddp_run
    before = (out / "metrics.csv").read_bytes()
    t0 = time.monotonic()
    done = torchrun(*ARGS, "--quiet", "--out", str(out), timeout=120)  # a new run into a finished one
    assert time.monotonic() - t0 < 60, "a rank waited for a partner that had given up"
    assert done.returncode != 0
    # rank 0 checks the folder and hands its error to rank 1, so both exit with it (code 2); torchrun
    # may terminate the slower one first (-15) once the other has failed, but none is left waiting
    assert "already holds a run (last.pt)" in done.stderr
    codes = re.findall(r"exitcode\s+: (-?\d+)", done.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, codes
    assert (out / "metrics.csv").read_bytes() == before


# ---------------------------------------------------------------------------- sharding, without processes


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [153, 614])
def test_shards_cover_the_test_set_once_and_split_training_evenly(world, n):
    from tinycifar.data import Split

    split = Split(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n) % 10)
    test = [DeviceLoader(split, 50, [0.5] * 3, [0.25] * 3, train=False, rank=r, world_size=world).indices()
            for r in range(world)]
    assert sorted(torch.cat(test).tolist()) == list(range(n))
    batch = 10 * world
    train = [DeviceLoader(split, batch // world, [0.5] * 3, [0.25] * 3, train=True, drop_last=True, rank=r,
                          world_size=world) for r in range(world)]
    orders = [t.indices() for t in train]
    assert len({len(o) for o in orders}) == 1
    assert len(set(torch.cat(orders).tolist())) == sum(len(o) for o in orders)  # disjoint
    assert {len(t) for t in train} == {n // batch}  # steps: floor(N / global batch) on every rank


def test_each_rank_draws_its_own_augmentation():
    from tinycifar.data import Split
    from tinycifar.data.augment import AugmentConfig

    image = torch.randint(0, 256, (1, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    split = Split(image.repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.long))  # identical images
    batches = [next(iter(DeviceLoader(split, 16, [0.5] * 3, [0.25] * 3, train=True, aug=AugmentConfig("fast"),
                                      rank=r, world_size=2))) for r in range(2)]
    assert not torch.equal(batches[0][0], batches[1][0])


RANK0_FIRST = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
from tinycifar.training.train import init_distributed, rank0_first

dist.init_process_group("gloo", timeout=timedelta(seconds=2))  # the default group gives up after 2 s
env = init_distributed("cpu")
print(rank0_first(env, lambda: time.sleep(6) or "loaded", share=True), flush=True)
dist.barrier(group=env.wait_group)  # as train() ends: no rank exits while the other still talks to it
dist.destroy_process_group()
"""


def test_rank0_first_waits_for_rank_0_past_the_default_groups_timeout(tmp_path):
    """Rank 0 loads for 6 s, three times the process group's timeout: the other rank waits on
    rank0_first's own group (RANK0_WAIT) and gets the result instead of a timeout."""
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK0_FIRST], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs[1][1][-2000:]
    assert [out.strip() for out, _ in outputs] == ["loaded", "loaded"]
