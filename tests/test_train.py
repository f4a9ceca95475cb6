"""The training engine on synthetic data: learning, the run folder, resume, schedules, options.

Every run is tiny (512 synthetic images, batch 32, fp32 on one CPU thread), so a run
takes a second or two.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from host_reads import HostReads
from tiny_run import LEARNED_RUN
from torch import nn

from tinycifar.checkpoint import load_checkpoint, model_from_checkpoint
from tinycifar.cli import main
from tinycifar.config import PRESETS, ConfigError, TrainConfig, apply_precision_recipe, resolve_config
from tinycifar.data import DatasetError, synthetic_cifar10
from tinycifar.data import augmix as augmix_module
from tinycifar.data.loader import DeviceLoader
from tinycifar.evaluate import evaluate
from tinycifar.models import ClassifierHead, Net, create_model
from tinycifar.models.layers import SqueezeExcite
from tinycifar.training import train as train_mod
from tinycifar.training.sgd import SGD
from tinycifar.training.train import (
    METRIC_FIELDS,
    TrainingError,
    build_optimizer,
    lr_factor,
    normalized_filters,
    param_groups,
    set_lr,
    train,
)

DOCUMENTED_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds",
                      "train_seconds_total"]
SUMMARY_KEYS = {"best_acc", "final_acc", "final_ece", "epoch_reached_target", "train_seconds", "params"}
TIMING_KEYS = {"train_seconds", "images_per_second", "seconds_to_target"}

# the same run as command-line options (for the subprocess tests) and as config values
CLI_ARGS = ["--model", "era9", "--dataset", "synthetic", "--set", "synthetic_size=512", "--batch-size", "32",
            "--lr", "0.05", "--set", "muon_lr=0.1", "--aug", "none", "--precision", "fp32", "--device", "cpu",
            "--threads", "1", "--quiet"]
QUICK = LEARNED_RUN  # tiny_run.py says why its values (Muon's lr among them)


def quick_cfg(out: Path, **overrides) -> TrainConfig:
    return resolve_config("fast", overrides={**QUICK, "out": str(out), **overrides})


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def comparable_summary(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in s.items() if k not in TIMING_KEYS}


def as_trained(cfg: TrainConfig) -> TrainConfig:
    """The config a run records: the caller's, with the preset's table for its precision applied
    (QUICK trains in fp32, so the fast preset's fp32 table, less what QUICK sets)."""
    trained = dataclasses.replace(cfg)
    apply_precision_recipe(trained, cfg.precision)
    return trained


@pytest.fixture(scope="module")
def basic_run(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = quick_cfg(tmp_path_factory.mktemp("basic") / "run")
    return cfg, train(cfg)


# ---------------------------------------------------------------------------- a plain run


def test_synthetic_run_learns(basic_run):
    _, result = basic_run
    assert result.summary["final_acc"] > 60  # chance is 10%
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]


def test_run_folder_holds_everything_documented(basic_run):
    cfg, result = basic_run
    run_dir = Path(cfg.out)
    assert result.run_dir == run_dir
    for name in ("config.json", "metrics.csv", "last.pt", "best.pt", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".*")), "temporary files left behind"

    rows = read_metrics(run_dir)
    with open(run_dir / "metrics.csv") as f:
        header = f.readline().strip().split(",")
    assert header == METRIC_FIELDS
    assert header[: len(DOCUMENTED_COLUMNS)] == DOCUMENTED_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(0 <= float(r["test_acc"]) <= 100 and float(r["lr"]) > 0 for r in rows)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary == result.summary
    assert summary["params"] == sum(p.numel() for p in create_model("era9").parameters())
    assert summary["final_acc"] == float(rows[-1]["test_acc"])
    assert summary["best_acc"] == max(float(r["test_acc"]) for r in rows)
    assert summary["epochs_run"] == 3 and summary["train_seconds"] > 0

    config = json.loads((run_dir / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "resolved"} == as_trained(cfg).to_dict()
    assert config["resolved"]["steps_per_epoch"] == 512 // 32
    assert config["resolved"]["world_size"] == 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_run_trains_and_records_the_recipe_of_its_resolved_precision(tmp_path, capsys, precision):
    cfg = quick_cfg(tmp_path / "run", epochs=2, synthetic_size=128, precision=precision, quiet=False)
    recipe = cfg.by_precision.get(precision, {})  # the fast preset's, less what QUICK sets (batch, lr)
    assert bool(recipe) is (precision == "fp32")
    train(cfg)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["resolved"]["precision_recipe"] == recipe
    assert config["low_res_fraction"] == recipe.get("low_res_fraction", PRESETS["fast"]["low_res_fraction"])
    assert config["aug"]["alternate_flip"] is ("aug" in recipe)
    said = f"{precision} recipe (by_precision): "
    assert (said in capsys.readouterr().out) is bool(recipe)


def test_checkpoints_hold_the_last_and_the_best_epoch(basic_run):
    cfg, result = basic_run
    last = load_checkpoint(Path(cfg.out) / "last.pt")
    best = load_checkpoint(Path(cfg.out) / "best.pt")
    assert last["epoch"] == 3 and last["history"] == result.history
    assert best["epoch"] == result.summary["best_epoch"]
    assert last["model"] == "era9" and last["config"] == as_trained(cfg).to_dict()


def test_checkpoint_reproduces_the_logged_test_accuracy(basic_run):
    cfg, result = basic_run
    state = load_checkpoint(Path(cfg.out) / "last.pt")
    _, test = synthetic_cifar10(cfg.synthetic_size, cfg.synthetic_size // 4, seed=cfg.seed)
    ev = evaluate(model_from_checkpoint(state), DeviceLoader(test, 1000, state["mean"], state["std"]))
    assert ev.total == len(test)
    assert round(ev.accuracy, 4) == result.history[-1]["test_acc"]
    assert ev.loss == pytest.approx(result.history[-1]["test_loss"], abs=1e-5)


def test_identical_fp32_cpu_runs_give_identical_metrics(basic_run, tmp_path):
    cfg, first = basic_run
    again = train(quick_cfg(tmp_path / "again"))
    assert without_timing(again.history) == without_timing(first.history)
    assert without_timing(read_metrics(tmp_path / "again")) == without_timing(read_metrics(Path(cfg.out)))


def test_target_acc_stops_early(tmp_path):
    result = train(quick_cfg(tmp_path / "run", epochs=8, target_acc=50.0, target_for_summary=50.0))
    run = len(result.history)
    assert run < 8
    assert result.history[-1]["test_acc"] >= 50.0
    assert all(h["test_acc"] < 50.0 for h in result.history[:-1])
    assert "target-acc" in result.summary["stop_reason"]
    assert result.summary["epoch_reached_target"] == run
    assert len(read_metrics(tmp_path / "run")) == run


# ---------------------------------------------------------------------------- resume after a real kill


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinycifar", *args], capture_output=True, text=True,
                          timeout=timeout)


def start_and_kill_after_first_epoch(out: Path, epochs: int) -> int:
    """Start a CLI training run, SIGKILL it as soon as an epoch is saved; returns the rows saved."""
    proc = subprocess.Popen([sys.executable, "-m", "tinycifar", "train", *CLI_ARGS, "--epochs", str(epochs),
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.csv").exists() and len(read_metrics(out)) >= 1:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return len(read_metrics(out))


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    epochs = 4
    ref = tmp_path / "ref"
    assert main(["train", *CLI_ARGS, "--epochs", str(epochs), "--out", str(ref)]) == 0

    killed = tmp_path / "killed"
    saved = start_and_kill_after_first_epoch(killed, epochs)
    assert 1 <= saved < epochs
    state = load_checkpoint(killed / "last.pt")
    assert state["epoch"] >= saved

    done = run_cli("train", "--resume", "--out", str(killed), "--quiet")
    assert done.returncode == 0, done.stderr
    assert without_timing(read_metrics(killed)) == without_timing(read_metrics(ref))
    assert comparable_summary(killed) == comparable_summary(ref)
    a, b = load_checkpoint(killed / "last.pt"), load_checkpoint(ref / "last.pt")
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in b["model_state"])


def test_resume_of_a_finished_run_changes_nothing(basic_run, capsys):
    cfg, result = basic_run
    before = read_metrics(Path(cfg.out))
    assert main(["train", "--resume", "--out", cfg.out, "--quiet"]) == 0
    assert read_metrics(Path(cfg.out)) == before


def test_resume_refuses_to_change_the_recipe(basic_run, capsys):
    cfg, _ = basic_run
    assert main(["train", "--resume", "--out", cfg.out, "--lr", "0.5"]) == 2
    assert "cannot change lr" in capsys.readouterr().err


def test_resume_accepts_the_recipes_own_augmentation_policy_and_refuses_another(basic_run, capsys):
    cfg, _ = basic_run
    before = read_metrics(Path(cfg.out))
    assert main(["train", "--resume", "--out", cfg.out, "--aug", cfg.aug.policy, "--quiet"]) == 0
    assert read_metrics(Path(cfg.out)) == before
    assert main(["train", "--resume", "--out", cfg.out, "--aug", "seed"]) == 2
    assert "cannot change aug" in capsys.readouterr().err


def test_a_resumed_run_keeps_the_recipe_its_precision_chose(tmp_path, monkeypatch):
    """Started where auto meant fp32, resumed on a bf16 machine: the bf16 table must not apply mid-run."""
    monkeypatch.setattr(train_mod, "cpu_supports_bf16", lambda: False)
    cfg = quick_cfg(tmp_path / "run", epochs=1, synthetic_size=128, precision="auto",
                    by_precision={"fp32": {"weight_decay": 1e-4}, "bf16": {"weight_decay": 3e-4}})
    train(cfg)
    monkeypatch.setattr(train_mod, "cpu_supports_bf16", lambda: True)
    resumed = train_mod.resume_config(Path(cfg.out), {})
    assert train_mod.resolve_precision(resumed.precision, torch.device("cpu")) == "bf16"
    assert apply_precision_recipe(resumed, "bf16") == {}
    assert (resumed.weight_decay, resumed.by_precision) == (1e-4, {})


def test_a_missing_dataset_leaves_no_run_folder_behind(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DatasetError):
        train(quick_cfg(out, dataset="cifar10", data=str(tmp_path / "no-data"), download=False))
    assert not out.exists()


def test_threads_option_is_restored_after_the_run(tmp_path, one_thread):
    assert torch.get_num_threads() == 1
    train(quick_cfg(tmp_path / "run", epochs=1, threads=2))
    assert torch.get_num_threads() == 1


# ---------------------------------------------------------------------------- learning-rate schedules


def schedule(total_epochs: int = 10, steps: int = 10, **kw) -> list[float]:
    cfg = TrainConfig(epochs=total_epochs, **kw)
    total = total_epochs * steps
    return [lr_factor(i, total, steps, cfg) for i in range(total)]


def test_constant_schedule_with_warmup_rises_linearly_then_stays_flat():
    f = schedule(schedule="constant", warmup_epochs=2)
    assert f[:20] == pytest.approx([(i + 1) / 20 for i in range(20)])
    assert f[20:] == [1.0] * 80


def test_onecycle_rises_from_a_25th_to_the_peak_then_anneals_to_the_end_value():
    f = schedule(schedule="onecycle", pct_start=0.25, final_lr_scale=0.0)
    peak = f.index(max(f))
    assert f[0] == pytest.approx(0.04)
    assert max(f) == pytest.approx(1.0)
    assert peak == 25
    assert all(a < b for a, b in zip(f[:peak], f[1:peak + 1], strict=True))
    assert all(a > b for a, b in zip(f[peak:-1], f[peak + 1:], strict=True))
    assert f[-1] < 0.001
    g = schedule(schedule="onecycle", pct_start=0.25, final_lr_scale=0.1)
    assert g[-1] == pytest.approx(0.1, abs=0.001) and min(g) >= 0.04


def test_onecycle_with_warmup_uses_the_warmup_as_its_rise():
    f = schedule(schedule="onecycle", warmup_epochs=1)
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:-1], f[11:], strict=True))


def test_cosine_decays_monotonically_from_the_peak_to_the_end_value():
    f = schedule(schedule="cosine", final_lr_scale=0.2)
    assert f[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(f[:-1], f[1:], strict=True))
    assert f[50] == pytest.approx(0.2 + 0.8 * 0.5)
    assert f[-1] == pytest.approx(0.2, abs=0.001)
    w = schedule(schedule="cosine", warmup_epochs=3)
    assert w[:30] == pytest.approx([(i + 1) / 30 for i in range(30)])
    assert w[30] == pytest.approx(1.0)


def test_step_schedule_multiplies_by_gamma_every_step_size_epochs():
    f = schedule(schedule="step", step_size=3, step_gamma=0.1)
    for step, value in enumerate(f):
        assert value == pytest.approx(0.1 ** ((step // 10) // 3))


def test_every_schedule_stays_positive_and_at_most_one():
    for kind in ("onecycle", "cosine", "step", "constant"):
        for warm in (0, 1.5):
            f = schedule(schedule=kind, warmup_epochs=warm, final_lr_scale=0.01)
            assert all(0 < v <= 1 + 1e-12 for v in f), kind


# ---------------------------------------------------------------------------- optimiser groups


def group_of(groups: list[dict], p: torch.Tensor) -> dict:
    [g] = [g for g in groups if any(q is p for q in g["params"])]
    return g


def test_weight_decay_stays_off_batch_norm_and_biases():
    model = Net(nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.Conv2d(8, 8, 3, bias=False)), ClassifierHead(8))
    cfg = TrainConfig(weight_decay=5e-4, norm_bias_lr_scale=4.0, lr=0.1)
    groups = param_groups(model, cfg)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        g = group_of(groups, p)
        is_norm_or_bias = name.endswith("bias") or name.startswith("features.1.")
        assert g["weight_decay"] == (0.0 if is_norm_or_bias else 5e-4), name
        assert g["lr_scale"] == (4.0 if name.endswith("bias") else 1.0), name
    optimizer = build_optimizer(model, cfg)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx(sorted(0.1 * g["lr_scale"]
                                                                                   for g in groups))

    on = param_groups(model, TrainConfig(weight_decay=5e-4, wd_on_norm_and_bias=True))
    assert all(g["weight_decay"] == 5e-4 for g in on)


def test_era9_decays_only_conv_and_linear_weights():
    model = create_model("era9")
    groups = param_groups(model, TrainConfig(weight_decay=1e-3))
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            expect = isinstance(m, (nn.Conv2d, nn.Linear)) and name == "weight"
            assert (id(p) in decayed) == expect, (type(m).__name__, name)


def test_muon_takes_the_filters_that_batch_norm_follows_and_nothing_else():
    """Depthwise filters (9 weights a row), the linear head, norms and biases stay with SGD; the filters'
    group is undecayed (its norms are kept instead) and steps at muon_lr through the schedule."""
    model = create_model("fastnet")
    groups = param_groups(model, TrainConfig(lr=0.2, weight_decay=5e-4, muon_lr=0.03))
    [muon] = [g for g in groups if g.get("orthogonalize")]
    full = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    assert len(full) == 6 and [id(p) for p in muon["params"]] == [id(p) for p in full]
    assert muon["weight_decay"] == 0 and muon["lr_scale"] * 0.2 == pytest.approx(0.03)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = build_optimizer(model, TrainConfig(lr=0.2, muon_lr=0.03))
    set_lr(optimizer, 0.1)
    assert [g["lr"] for g in optimizer.param_groups if g.get("orthogonalize")] == [pytest.approx(0.015)]
    assert not any(g.get("orthogonalize") for g in param_groups(model, TrainConfig(lr=0.2)))


def test_muon_leaves_out_filters_whose_scale_matters():
    """Squeeze-excite's gates and a convolutional head have no batch norm after them: held at a fixed
    norm they would compute something else, so they step with SGD."""
    se = create_model("slimres200k_se")
    full = {m for m in se.modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    gates = {c for block in se.modules() if isinstance(block, SqueezeExcite) for c in (block.reduce, block.expand)}
    assert len(gates) == 4 and normalized_filters(se) == full - gates  # two SE blocks, every other filter
    [muon] = [g for g in param_groups(se, TrainConfig(lr=0.2, muon_lr=0.02)) if g.get("orthogonalize")]
    assert {id(p) for p in muon["params"]} == {id(m.weight) for m in full - gates}
    conv_head = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 10, 1),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert normalized_filters(conv_head) == {conv_head[0]}
    narrower = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(4))  # not its width: not its norm
    assert normalized_filters(narrower) == set()


# ---------------------------------------------------------------------------- EMA, clipping, NaN


def test_ema_weights_are_what_the_checkpoint_serves(tmp_path):
    cfg = quick_cfg(tmp_path / "ema", epochs=2, ema_decay=0.9)
    result = train(cfg)
    state = load_checkpoint(tmp_path / "ema" / "last.pt")
    assert state["ema_state"] is not None and state["ema_full_state"] is not None
    key = "features.0.1.0.weight"  # a trained layer (the preset's whitening stem is frozen)
    assert not torch.equal(state["ema_state"][key], state["model_state"][key])
    model = model_from_checkpoint(state)
    assert torch.equal(model.state_dict()[key], state["ema_state"][key])
    # the logged test accuracy is the EMA network's
    _, test = synthetic_cifar10(cfg.synthetic_size, cfg.synthetic_size // 4, seed=cfg.seed)
    ev = evaluate(model, DeviceLoader(test, 1000, state["mean"], state["std"]))
    assert round(ev.accuracy, 4) == result.history[-1]["test_acc"]


class Stop(Exception):
    pass


def host_reads_of_one_epoch(tmp_path: Path, monkeypatch, images: int, options: dict) -> list[str]:
    """The host reads of a whole training epoch (not quiet: the bar updates every 10 steps), with EMA,
    gradient clipping and ``options`` (AugMix run as on a GPU)."""
    monkeypatch.setattr(augmix_module, "PICK_BY_INDEX_ON", ())
    real, seen = train_mod.train_one_epoch, []

    def counted(run, epoch: int):
        with HostReads() as reads:
            stats = real(run, epoch)
        seen.append(reads.seen)
        return stats

    monkeypatch.setattr(train_mod, "train_one_epoch", counted)
    train(quick_cfg(tmp_path / str(images), epochs=1, synthetic_size=images, batch_size=10, ema_decay=0.9,
                    grad_clip=1.0, quiet=False, **options))
    return seen[0]


@pytest.mark.parametrize("options", [{"aug": {"policy": "fast", "augmix": "mix"}},
                                     {"aug": {"policy": "seed", "mix": "cutmix", "mix_p": 1.0}},
                                     {"tensorboard": True}])
def test_training_steps_read_nothing_back_from_the_device(tmp_path, monkeypatch, capsys, options):
    """No step waits for the device: 12 steps and 24 make the same host syncs, all at the epoch's end
    (its image count joins the device totals, then train loss and accuracy are read to be printed
    and logged). TensorBoard's step losses are read together when the epoch is logged, after it."""
    twelve, twenty_four = (host_reads_of_one_epoch(tmp_path, monkeypatch, n, options) for n in (120, 240))
    assert twelve == twenty_four == ["aten.lift_fresh.default"] + ["aten._local_scalar_dense.default"] * 2
    assert "Batch_id=23 " in capsys.readouterr().err  # the bar shows the last step


def train_whole_and_cut_after_epoch_1(tmp_path: Path, monkeypatch, **options):
    """The run whole in tmp_path/full (returned), and stopped in tmp_path/cut once epoch 1's last.pt is on disk."""
    full = train(quick_cfg(tmp_path / "full", **options))
    real = train_mod.write_metrics_csv

    def stop_after_epoch_1(path, history):
        real(path, history)
        raise Stop  # after last.pt of epoch 1 is on disk

    monkeypatch.setattr(train_mod, "write_metrics_csv", stop_after_epoch_1)
    with pytest.raises(Stop):
        train(quick_cfg(tmp_path / "cut", **options))
    monkeypatch.setattr(train_mod, "write_metrics_csv", real)
    return full


def test_ema_run_resumes_exactly(tmp_path, monkeypatch):
    full = train_whole_and_cut_after_epoch_1(tmp_path, monkeypatch, epochs=3, ema_decay=0.8)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    resumed = train(train_mod.resume_config(tmp_path / "cut", {"quiet": True}))
    assert without_timing(resumed.history) == without_timing(full.history)
    a, b = load_checkpoint(tmp_path / "cut" / "last.pt"), load_checkpoint(tmp_path / "full" / "last.pt")
    assert all(torch.equal(a["ema_state"][k], b["ema_state"][k]) for k in b["ema_state"])


def test_grad_clip_option_clips_every_step(tmp_path, monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        norm = real(params, max_norm, *args, **kwargs)
        calls.append((max_norm, float(norm)))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    # every image in both epochs, so the count of steps does not hang on the fp32 recipe's selection
    result = train(quick_cfg(tmp_path / "clip", epochs=2, grad_clip=0.25, keep_hardest=1.0))
    assert len(calls) == sum(h["train_images"] for h in result.history) // 32 == (512 + 512) // 32
    assert all(max_norm == 0.25 for max_norm, _ in calls)
    assert any(norm > 0.25 for _, norm in calls), "the clip never bit; make it tighter"
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    calls.clear()
    train(quick_cfg(tmp_path / "noclip", epochs=1))
    assert calls == []


class NaNAfter(nn.CrossEntropyLoss):
    """Cross-entropy that turns NaN after ``limit`` calls, like a diverging run."""

    calls = 0
    limit = 10**9

    def forward(self, logits, target):
        type(self).calls += 1
        loss = super().forward(logits, target)
        return loss * float("nan") if type(self).calls > type(self).limit else loss


def test_nan_loss_stops_with_the_last_good_checkpoint_named(tmp_path, monkeypatch):
    monkeypatch.setattr(NaNAfter, "calls", 0)
    monkeypatch.setattr(NaNAfter, "limit", 512 // 32 + 3)  # a few steps into epoch 2
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NaNAfter)
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"epoch 2: training loss is nan.*last\.pt \(epoch 1\)") as info:
        train(quick_cfg(run_dir, epochs=3))
    assert str(run_dir / "last.pt") in str(info.value)
    state = load_checkpoint(run_dir / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model_state"].values() if v.is_floating_point())
    assert len(read_metrics(run_dir)) == 1
    model_from_checkpoint(state)


def test_nan_in_the_first_epoch_says_no_checkpoint_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(NaNAfter, "calls", 0)
    monkeypatch.setattr(NaNAfter, "limit", 0)
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NaNAfter)
    with pytest.raises(TrainingError, match="epoch 1: .*no checkpoint was written yet"):
        train(quick_cfg(tmp_path / "nan", epochs=2))
    assert not (tmp_path / "nan" / "last.pt").exists()


def test_diverging_lr_ends_with_exit_1_and_one_line(tmp_path, capsys):
    rc = main(["train", *CLI_ARGS, "--epochs", "2", "--lr", "1e12", "--out", str(tmp_path / "huge")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and "training loss is" in err[0] and "lower --lr" in err[0]


def test_whitening_stem_is_frozen_and_whitens_training_patches(tmp_path):
    result = train(quick_cfg(tmp_path / "run", epochs=1, whiten_stem=True, freeze_norm_scale=True))
    state = load_checkpoint(result.run_dir / "last.pt")
    model = model_from_checkpoint(state)
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    train_split, _ = synthetic_cifar10(512, 128, seed=0)
    mean, std = state["mean"], state["std"]
    x = (train_split.images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    half = stem.out_channels // 2
    out = nn.functional.conv2d(x, stem.weight[:half])  # valid patches only
    per_filter = out.transpose(0, 1).reshape(half, -1)
    cov = torch.cov(per_filter)
    # whitened: unit variance, uncorrelated (up to the small eps regulariser) - and still so after training
    assert torch.allclose(cov.diag(), torch.ones(half), atol=0.05)
    assert (cov - torch.diag(cov.diag())).abs().max() < 0.05
    assert torch.equal(stem.weight[half:], -stem.weight[:half])
    bn_scales = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(w, torch.ones_like(w)) for w in bn_scales)


def stem_norms(checkpoint: Path) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d]:
    """The trained weights' (not the moving average's) batch norm after the whitening stem, and the next one."""
    state = load_checkpoint(checkpoint)
    model = create_model(state["model"], **state["model_kwargs"])
    model.load_state_dict(state["model_state"])
    first, second = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][:2]
    return first, second


def test_a_stem_frozen_from_the_start_keeps_its_norm_and_backward_never_reaches_it(tmp_path):
    result = train(quick_cfg(tmp_path / "run", model="fastnet", epochs=1, whiten_stem=True, freeze_stem_after=0))
    stem_norm, next_norm = stem_norms(result.run_dir / "last.pt")
    assert torch.equal(stem_norm.weight, torch.ones(32)) and torch.equal(stem_norm.bias, torch.zeros(32))
    assert not torch.equal(next_norm.bias, torch.zeros_like(next_norm.bias))  # the layer after it trained
    assert stem_norm.running_var.ne(1).all()  # it still normalizes by the batch, so its statistics run

    cfg = quick_cfg(tmp_path / "unused", model="fastnet", whiten_stem=True, freeze_stem_after=0)
    net = create_model("fastnet")
    train_split, _ = synthetic_cifar10(256, 10, seed=0)
    train_mod.prepare_model(net, cfg, train_split, [0.5] * 3, [0.25] * 3)
    assert not net.features[0][0](torch.randn(2, 3, 32, 32)).requires_grad  # no backward through 32x32 maps
    assert net.features[0][1](torch.randn(2, 32, 32, 32)).requires_grad


def test_a_stem_frozen_after_an_epoch_trains_in_that_epoch_only_and_resumes_exactly(tmp_path, monkeypatch):
    full = train_whole_and_cut_after_epoch_1(tmp_path, monkeypatch, model="fastnet", epochs=2, whiten_stem=True,
                                             freeze_stem_after=1)
    after_one, after_two = stem_norms(tmp_path / "cut" / "last.pt"), stem_norms(full.run_dir / "last.pt")
    assert not torch.equal(after_one[0].bias, torch.zeros(32))  # epoch 1 trained the stem's norm
    assert torch.equal(after_two[0].bias, after_one[0].bias) and torch.equal(after_two[0].weight, after_one[0].weight)
    assert not torch.equal(after_two[1].bias, after_one[1].bias)  # epoch 2 trained the rest

    resumed = train(train_mod.resume_config(tmp_path / "cut", {"quiet": True}))
    assert without_timing(resumed.history) == without_timing(full.history)
    a, b = load_checkpoint(tmp_path / "cut" / "last.pt"), load_checkpoint(full.run_dir / "last.pt")
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in b["model_state"])


def test_freezing_the_stem_without_a_whitening_stem_freezes_nothing(tmp_path):
    """A preset's table may freeze the stem of a run whose config turned the whitening off: then the
    first layer learns, as it must without fixed filters."""
    result = train(quick_cfg(tmp_path / "run", model="fastnet", epochs=1, whiten_stem=False, freeze_stem_after=0))
    stem_norm, _ = stem_norms(result.run_dir / "last.pt")
    assert not torch.equal(stem_norm.bias, torch.zeros(32))


@pytest.mark.parametrize(("options", "sizes"), [
    (dict(low_res=16, low_res_fraction=0.5), [16, 16, 32, 32]),
    (dict(low_res=16, low_res_fraction=0.25, mid_res=24, mid_res_epochs=2), [16, 24, 24, 32]),
    (dict(low_res=16, low_res_fraction=0.5, mid_res=28), [16, 16, 28, 32]),
    (dict(low_res=0, mid_res=24), [32, 32, 32, 32]),  # low_res=0 turns the resizing off, mid_res with it
])
def test_progressive_resizing_trains_each_epoch_at_its_size(tmp_path, monkeypatch, options, sizes):
    seen = []
    original = DeviceLoader.__iter__

    def spy(self):
        for x, y in original(self):
            if self.train:
                seen.append(x.shape[-1])
            yield x, y

    monkeypatch.setattr(DeviceLoader, "__iter__", spy)
    train(quick_cfg(tmp_path / "run", epochs=4, **options))
    rows = read_metrics(tmp_path / "run")
    steps = [int(h["train_images"]) // 32 for h in rows]  # the fp32 recipe: last fewer
    assert seen == [size for size, n in zip(sizes, steps, strict=True) for _ in range(n)]
    assert [int(h["train_size"]) for h in rows] == sizes


@pytest.mark.parametrize(("max_isa", "expected"), [("", "bf16"), ("AVX2", "fp32"), ("avx512_core_vnni", "fp32"),
                                                   ("AVX512_CORE_BF16", "bf16"), ("AVX10_1_512_AMX", "bf16")])
def test_auto_precision_on_the_cpu_obeys_onednns_instruction_set_cap(monkeypatch, max_isa, expected):
    """A bf16 CPU whose oneDNN is capped below bf16 (how the lab approximates AVX2-only CPUs) emulates
    bf16, so auto must pick fp32 there, as it does on the real AVX2 CPU."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", max_isa)
    assert train_mod.resolve_precision("auto", torch.device("cpu")) == expected
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert train_mod.resolve_precision("auto", torch.device("cpu")) == "fp32"  # no cap makes bf16 native


def test_an_empty_onednn_cap_leaves_the_older_variable_in_force(monkeypatch):
    """oneDNN reads DNNL_MAX_CPU_ISA where ONEDNN_MAX_CPU_ISA is unset or empty, so auto does too."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")
    assert train_mod.onednn_max_isa() == "AVX2"
    assert train_mod.resolve_precision("auto", torch.device("cpu")) == "fp32"


# ---------------------------------------------------------------------------- the GPU path, proven on the CPU


@pytest.fixture
def gpus(monkeypatch):
    """Two fake GPUs: cuda:0 a T4 (compute capability 7.5), cuda:1 whatever the test sets (A100 by default)."""
    capability = {0: (7, 5), 1: (8, 0)}

    def get_device_capability(device=None):
        index = torch.device(device).index if device is not None else None
        return capability[0 if index is None else index]  # the current device is cuda:0

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation says yes on a T4
    return capability


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")],
                         ids=["T4", "A100", "H100"])
def test_auto_precision_follows_the_chosen_gpus_compute_capability(gpus, capability, expected):
    gpus[1] = capability
    assert train_mod.resolve_precision("auto", torch.device("cuda:1")) == expected


def test_auto_precision_asks_the_chosen_gpu_not_the_current_one(gpus):
    assert train_mod.resolve_precision("auto", torch.device("cuda:1")) == "bf16"  # current device is the T4
    assert train_mod.resolve_precision("auto", torch.device("cuda:0")) == "fp16"
    assert train_mod.resolve_precision("auto", torch.device("cuda")) == "fp16"


def test_bf16_on_a_gpu_without_native_bf16_warns_in_one_line(gpus, capsys):
    assert train_mod.resolve_precision("bf16", torch.device("cuda:0")) == "bf16"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--precision bf16" in err and "7.5" in err and "fp16" in err
    assert train_mod.resolve_precision("bf16", torch.device("cuda:1")) == "bf16"
    assert train_mod.resolve_precision("fp16", torch.device("cuda:1")) == "fp16"
    assert capsys.readouterr().err == ""


class RecordingScaler:
    """Stands in for torch.amp.GradScaler and writes down the order it is used in."""

    def __init__(self, calls: list[str], overflow: bool):
        self.calls, self.overflow = calls, overflow

    def is_enabled(self) -> bool:
        return True

    def unscale_(self, optimizer):
        self.calls.append("unscale_")

    def _found_inf_per_device(self, optimizer):
        return {torch.device("cpu"): torch.tensor(float(self.overflow))}

    def step(self, optimizer):
        self.calls.append("step")

    def update(self):
        self.calls.append("update")


@pytest.mark.parametrize("overflow", [False, True])
def test_the_scaler_unscales_before_clipping_then_steps_and_updates(monkeypatch, overflow):
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: calls.append("clip"))
    model = nn.Linear(2, 2)
    applied = train_mod.apply_gradients(SGD(model.parameters(), lr=0.1), RecordingScaler(calls, overflow), model,
                                        grad_clip=1.0)
    assert calls == ["unscale_", "clip", "step", "update"]
    assert applied is not overflow


def test_an_overflowing_fp16_step_leaves_weights_and_momentum_untouched():
    """A real GradScaler (torch enables it for fp16 on the CPU too) skips the step and halves its scale."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)  # the recipes' optimizer
    scaler = train_mod.gradient_scaler(torch.device("cpu"), "fp16")
    assert scaler.is_enabled() and not train_mod.gradient_scaler(torch.device("cpu"), "bf16").is_enabled()

    def step(factor: float) -> bool:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.ones(3, 4)).float().sum() * factor
        scaler.scale(loss).backward()
        return train_mod.apply_gradients(optimizer, scaler, model, grad_clip=1.0)

    assert step(1e-4)
    weights, momentum = model.weight.detach().clone(), optimizer.state[model.weight]["momentum_buffer"].clone()
    scale = scaler.get_scale()
    assert not step(1e30)  # the scaled gradients overflow fp16
    assert torch.equal(model.weight, weights)
    assert torch.equal(optimizer.state[model.weight]["momentum_buffer"], momentum)
    assert scaler.get_scale() == scale / 2


TINY_NET = '''
from torch import nn


def Net(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, num_classes))
'''


def test_fp16_run_counts_skipped_steps_keeps_them_out_of_the_ema_and_resumes_its_scale(tmp_path, monkeypatch):
    """fp16 on the CPU (the GPU's arithmetic, slowly): a scale started far too high makes the first steps
    overflow; they are counted, the EMA skips them, and a resumed run goes on from the saved scale."""
    (tmp_path / "tiny.py").write_text(TINY_NET)
    spec = f"{tmp_path / 'tiny.py'}:Net"
    monkeypatch.setattr(train_mod, "resolve_precision", lambda precision, device: "fp16")
    monkeypatch.setattr(train_mod, "gradient_scaler",
                        lambda device, precision: torch.amp.GradScaler("cpu", init_scale=2.0**30))
    fp16 = dict(model=spec, synthetic_size=200, batch_size=50, ema_decay=0.9, epochs=3)
    full = train(quick_cfg(tmp_path / "full", **fp16))
    skipped = [h["skipped_steps"] for h in full.history]
    assert skipped[0] > 0 and sum(skipped) < 3 * 4, skipped  # 4 steps an epoch; the scale settles
    state = load_checkpoint(tmp_path / "full" / "last.pt")
    assert int(state["ema_full_state"]["n_averaged"]) == 3 * 4 - sum(skipped)
    assert state["scaler_state"]["scale"] < 2.0**30
    real = train_mod.write_metrics_csv

    def stop_after_epoch_1(path, history):
        real(path, history)
        raise Stop

    monkeypatch.setattr(train_mod, "write_metrics_csv", stop_after_epoch_1)
    with pytest.raises(Stop):
        train(quick_cfg(tmp_path / "cut", **fp16))
    monkeypatch.setattr(train_mod, "write_metrics_csv", real)
    resumed = train(train_mod.resume_config(tmp_path / "cut", {"quiet": True, "model": spec}))
    assert without_timing(resumed.history) == without_timing(full.history)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["scaler_state"] == state["scaler_state"]


def test_cudnn_times_its_algorithms_when_training_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    train_mod.tune_backends(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    train_mod.tune_backends(torch.device("cuda", 1))
    assert torch.backends.cudnn.benchmark is True


def test_compile_compiles_once_across_image_sizes_and_the_partial_batch_and_times_it_apart(tmp_path, monkeypatch):
    """--compile with progressive resizing (16 px, then 32 px) and a partial last batch (110 = 50 + 50 + 10):
    dynamo captures one graph for all four shapes, and the compile (a backend made to take 2 s, standing in
    for inductor, which is minutes on this CPU) is reported as compile_seconds, not in an epoch's."""
    (tmp_path / "tiny.py").write_text(TINY_NET)
    graphs = []

    def slow_backend(graph, example_inputs):
        graphs.append(graph)
        time.sleep(2.0)
        return graph.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net: real_compile(net, backend=slow_backend))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        result = train(quick_cfg(tmp_path / "run", model=f"{tmp_path / 'tiny.py'}:Net", synthetic_size=110,
                                 batch_size=50, drop_last=False, low_res=16, low_res_fraction=0.5, epochs=2,
                                 compile=True))
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1 and counters["stats"]["unique_graphs"] == 1
    first, second = result.history
    assert first["compile_seconds"] >= 2.0 and second["compile_seconds"] < 2.0  # 32 px: one plain step timed apart
    assert first["seconds"] < 2.0 and second["seconds"] < 2.0
    assert result.summary["compile_seconds"] == pytest.approx(first["compile_seconds"] + second["compile_seconds"])
    assert "s compiling" in train_mod.summary_line(result.summary)


def test_late_freeze_stops_the_first_blocks_in_the_last_epoch_only_and_resumes_exactly(tmp_path, monkeypatch):
    full = train_whole_and_cut_after_epoch_1(tmp_path, monkeypatch, model="fastnet", epochs=2, late_freeze_blocks=2)
    before, after = (load_checkpoint(run / "last.pt")["model_state"] for run in (tmp_path / "cut", full.run_dir))
    weights = [k for k in after if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    frozen = [k for k in weights if k.startswith(("features.0.", "features.1."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # the last epoch left them alone
    assert all(not torch.equal(before[k], after[k]) for k in weights if k not in frozen)  # and trained the rest
    statistics = [k for k in after if k.startswith("features.1.") and k.endswith("running_mean")]
    assert all(not torch.equal(before[k], after[k]) for k in statistics)  # still normalizing by the batch

    torch.manual_seed(0)  # the run's seed: its initial weights
    initial = create_model("fastnet").state_dict()
    assert all(not torch.equal(initial[k], before[k]) for k in frozen)  # the first epoch trained them
    # asked for more final epochs than the run has, the blocks still train in the first
    longer = train(quick_cfg(tmp_path / "longer", model="fastnet", epochs=2, late_freeze_blocks=2,
                             late_freeze_epochs=5))
    assert without_timing(longer.history) == without_timing(full.history)

    resumed = train(train_mod.resume_config(tmp_path / "cut", {"quiet": True}))
    assert without_timing(resumed.history) == without_timing(full.history)
    cut = load_checkpoint(tmp_path / "cut" / "last.pt")["model_state"]
    assert all(torch.equal(cut[k], after[k]) for k in after)


def test_keep_hardest_trains_the_last_epoch_on_the_highest_losses_over_the_whole_schedule(tmp_path, monkeypatch):
    full = train_whole_and_cut_after_epoch_1(tmp_path, monkeypatch, epochs=2, keep_hardest=0.5)
    assert [h["train_images"] for h in full.history] == [512, 256]  # 16 steps of 32, then 8
    cfg = quick_cfg(tmp_path, epochs=2)
    assert full.history[-1]["lr"] == pytest.approx(cfg.lr * lr_factor(16 + 14, 32, 16, cfg))  # its 8 steps span 16
    assert full.summary["images_per_second"] == pytest.approx(768 / full.summary["train_seconds"], rel=1e-3)
    before = load_checkpoint(tmp_path / "cut" / "last.pt")["image_losses"]
    after = load_checkpoint(full.run_dir / "last.pt")["image_losses"]
    assert before.shape == (512,) and bool((before > 0).all())
    trained = set((after != before).nonzero().flatten().tolist())  # the images the last epoch saw anew
    assert trained == set(before.topk(256).indices.tolist())

    resumed = train(train_mod.resume_config(tmp_path / "cut", {"quiet": True}))
    assert without_timing(resumed.history) == without_timing(full.history)
    a, b = load_checkpoint(tmp_path / "cut" / "last.pt"), load_checkpoint(full.run_dir / "last.pt")
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in b["model_state"])
    assert torch.equal(a["image_losses"], b["image_losses"])


def test_late_freeze_names_a_network_without_feature_blocks_before_writing_anything(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY_NET)
    with pytest.raises(ConfigError, match=r"late_freeze_blocks: .* no `features` sequence of at least 2 blocks"):
        train(quick_cfg(tmp_path / "refused", model=f"{tmp_path / 'tiny.py'}:Net", late_freeze_blocks=2))
    with pytest.raises(ConfigError, match=r"late_freeze_blocks: fastnet .* at least 5 blocks"):
        train(quick_cfg(tmp_path / "refused", model="fastnet", late_freeze_blocks=5))  # it has 4
    assert not (tmp_path / "refused").exists()
