"""The GPU path on a real CUDA device, through the public interfaces (``train(cfg)``, the CLI, the API).

Every test here is marked ``cuda`` and skipped, with the reason, where torch sees no CUDA device
(this project's machines and CI have none). ``benchmarks/gpu_check.sh`` runs them on a lent GPU
(``pytest -m cuda tests/test_cuda.py``). What the CPU can prove of the same code paths (precision
resolution by capability, the scaler's order of operations, host syncs, the API on a module on
another device) is tested beside the modules themselves; these tests are what only a GPU can show.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.figure import Figure

import tinycifar
from tinycifar.checkpoint import load_checkpoint, save_checkpoint
from tinycifar.cli import main
from tinycifar.config import resolve_config
from tinycifar.models import build_model
from tinycifar.training.train import RunResult, train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "needs a CUDA device; benchmarks/gpu_check.sh runs these on a lent GPU"))]

# 2 epochs of the fast preset: the first at low resolution, whitening stem, EMA, flip TTA at the end
SMALL = {"dataset": "synthetic", "synthetic_size": 640, "epochs": 2, "batch_size": 64, "device": "cuda",
         "quiet": True, "eval_every": 1}
CHANCE = 10.0


def cuda_run(out: Path, preset: str = "fast", on_epoch=None, **overrides: Any) -> RunResult:
    """A small run of ``preset`` on the GPU; ``overrides`` reach any config value."""
    return train(resolve_config(preset, overrides={**SMALL, "out": str(out), **overrides}), on_epoch=on_epoch)


def tensors_of(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a checkpoint's nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in tensors_of(value)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in tensors_of(value)]
    return []


def scaler_states(obj: Any) -> list[dict]:
    """The ``torch.amp.GradScaler`` states a checkpoint holds, wherever the trainer keeps them."""
    if not isinstance(obj, dict):
        return []
    own = [obj] if {"scale", "_growth_tracker"} <= set(obj) else []
    return own + [s for value in obj.values() for s in scaler_states(value)]


def auto_precision_here() -> str:
    """What ``--precision auto`` must pick on this GPU: real bf16 from compute capability 8.0 (Ampere) on."""
    return "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"


# ---------------------------------------------------------------------------- precisions and compile


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_training_learns_in_each_precision(tmp_path, precision):
    if precision == "bf16" and auto_precision_here() != "bf16":
        pytest.skip("this GPU has no native bf16 (compute capability < 8.0)")
    run = cuda_run(tmp_path / precision, precision=precision, epochs=3)
    assert run.summary["precision"] == precision and run.summary["device"].startswith("cuda")
    losses = [h["train_loss"] for h in run.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert run.summary["final_acc"] > 50  # 100% on the CPU in fp32 and bf16 (3 epochs of this synthetic set)
    assert all(torch.isfinite(p).all() for p in run.model.parameters()), "an overflowed step reached the weights"


def test_auto_precision_follows_the_gpus_compute_capability(tmp_path):
    run = cuda_run(tmp_path / "auto", precision="auto", epochs=1)
    assert run.summary["precision"] == auto_precision_here()


def test_fp16_checkpoint_holds_the_gradient_scaler_and_resume_restores_it(tmp_path):
    out = tmp_path / "fp16"
    stop_after_first_epoch(out, precision="fp16")
    state = load_checkpoint(out / "last.pt")
    (scaler,) = scaler_states(state)
    scaler["scale"] = 1024.0  # far below the fresh scaler's 65536: a resume that ignores it starts over
    save_checkpoint(out / "last.pt", state)
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    (resumed,) = scaler_states(load_checkpoint(out / "last.pt"))
    assert resumed["scale"] <= 1024.0  # 10 steps: far from the 2000 a scale waits for before growing


def test_compile_time_is_reported_apart_from_the_epochs(tmp_path):
    # epoch 1 at 20x20, then 32x32; 650 images in batches of 64 leave a partial last batch
    run = cuda_run(tmp_path / "compiled", compile=True, epochs=3, synthetic_size=650, drop_last=False)
    compile_seconds = run.summary["compile_seconds"]
    assert compile_seconds > 0
    assert all(h["seconds"] < compile_seconds for h in run.history), (compile_seconds, run.history)
    assert run.summary["final_acc"] > CHANCE


# ---------------------------------------------------------------------------- the recipe's parts on the device


def test_ema_and_whitening_stem_run_on_the_device(tmp_path):
    run = cuda_run(tmp_path / "fast")
    assert {p.device.type for p in run.model.parameters()} == {"cuda"}
    state = load_checkpoint(run.run_dir / "last.pt")
    assert state["ema_state"] is not None  # the fast preset evaluates the moving average of the weights
    changed = [k for k, v in state["ema_state"].items() if v.is_floating_point() and not torch.equal(
        v, state["model_state"][k])]
    assert changed, "the EMA equals the weights: it never averaged"
    assert "final_acc_tta" in run.summary and run.summary["final_acc"] > CHANCE


@pytest.mark.parametrize("aug", [{"augmix": "jsd"}, {"augmix": "mix"}, {"mix": "mixup"}, {"mix": "cutmix"}],
                         ids=lambda a: "-".join(a.values()))
def test_augmix_and_mixing_train_on_the_device(tmp_path, aug):
    run = cuda_run(tmp_path / "aug", epochs=1, aug=aug)
    assert run.summary["device"].startswith("cuda")
    assert torch.isfinite(torch.tensor(run.history[-1]["train_loss"]))


def test_evaluation_with_tta_agrees_with_the_cpu(tmp_path, capsys):
    run = cuda_run(tmp_path / "run", precision="fp32")
    results = {}
    for device in ("cuda", "cpu"):
        assert main(["eval", "--checkpoint", str(run.run_dir / "best.pt"), "--tta", "flip+translate",
                     "--device", device, "--precision", "fp32", "--json"]) == 0
        results[device] = json.loads(capsys.readouterr().out)
    assert results["cuda"]["total"] == results["cpu"]["total"]
    assert abs(results["cuda"]["correct"] - results["cpu"]["correct"]) <= 2  # float order, near-ties


# ---------------------------------------------------------------------------- resume and checkpoints


class Stop(Exception):
    """Ends a run from its per-epoch callback, as a kill would (last.pt of that epoch is on disk)."""


def stop_after_first_epoch(out: Path, **overrides: Any) -> None:
    def stop(epoch: int, accuracy: float) -> None:
        raise Stop

    with pytest.raises(Stop):
        cuda_run(out, on_epoch=stop, **overrides)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_resume_on_cuda_continues_from_the_saved_epoch(tmp_path):
    out = tmp_path / "run"
    stop_after_first_epoch(out)
    first = load_checkpoint(out / "last.pt")["history"]
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and state["history"][:1] == first
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 2


def test_checkpoints_load_on_the_cpu_with_plain_torch_load(tmp_path):
    run = cuda_run(tmp_path / "run", epochs=1)
    for name in ("best.pt", "last.pt"):
        state = torch.load(run.run_dir / name, weights_only=True)  # no map_location: as saved
        devices = {t.device.type for t in tensors_of(state)}
        assert devices == {"cpu"}, f"{name} holds tensors on {devices}"


# ---------------------------------------------------------------------------- the notebook API


def test_the_api_works_on_a_module_after_a_gpu_fit(tmp_path):
    net, _ = build_model("era9", {})
    run = tinycifar.fit(net, preset="fast", **{**SMALL, "out": str(tmp_path / "api"), "epochs": 1})
    assert isinstance(tinycifar.plot_mistakes(run), Figure)
    assert isinstance(tinycifar.plot_gradcam(run), Figure)
    assert tinycifar.summary(net)["params"] == run.summary["params"]
    report = tinycifar.check(net)
    assert report.empirical_receptive_field == report.receptive_field  # the gradient cross-check ran


# ---------------------------------------------------------------------------- several GPUs


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for two NCCL processes")
def test_two_processes_over_nccl(tmp_path):
    out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tinycifar",
            "train", "--dataset", "synthetic", "--set", "synthetic_size=640", "--epochs", "2", "--batch-size", "64",
            "--device", "cuda", "--quiet", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_acc"] > CHANCE
