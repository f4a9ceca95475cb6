"""Bad command-line input ends with one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinycifar.checkpoint import save_checkpoint
from tinycifar.cli import main
from tinycifar.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def base(out: Path) -> list[str]:
    """A valid, tiny training command; a case appends the bad option (argparse: the last one wins)."""
    return ["train", "--dataset", "synthetic", "--set", "synthetic_size=64", "--epochs", "1", "--batch-size", "32",
            "--precision", "fp32", "--device", "cpu", "--threads", "1", "--quiet", "--out", str(out)]


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, fragment: str, command: str = "train") -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tinycifar {command}: error: ") or lines[0].startswith("tinycifar: error: "), err
    assert "Traceback" not in err
    assert fragment.lower() in lines[0].lower(), lines[0]


BAD_TRAIN_OPTIONS = {
    "epochs 0": (["--epochs", "0"], "--epochs"),
    "epochs -1": (["--epochs", "-1"], "--epochs"),
    "epochs not a number": (["--epochs", "ten"], "--epochs"),
    "epochs fractional": (["--epochs", "1.5"], "--epochs"),
    "batch size 0": (["--batch-size", "0"], "--batch-size"),
    "batch size -8": (["--batch-size", "-8"], "--batch-size"),
    "batch larger than the data": (["--batch-size", "128"], "larger than the 64 training images"),
    "lr 0": (["--lr", "0"], "--lr"),
    "lr -1": (["--lr", "-1"], "--lr"),
    "lr nan": (["--lr", "nan"], "--lr"),
    "lr inf": (["--lr", "inf"], "--lr"),
    "lr text": (["--lr", "fast"], "--lr"),
    "unknown model": (["--model", "nope"], "--model"),
    "unknown preset": (["--preset", "nope"], "--preset"),
    "unknown optimizer": (["--optimizer", "lion"], "--optimizer"),
    "unknown schedule": (["--schedule", "zigzag"], "--schedule"),
    "unknown precision": (["--precision", "fp64"], "--precision"),
    "fp16 on the cpu": (["--precision", "fp16"], "fp16"),
    "unknown device": (["--device", "tpu"], "--device"),
    "malformed cuda device": (["--device", "cudax"], "--device"),
    "unknown augmentation": (["--aug", "heavy"], "--aug"),
    "label smoothing 1": (["--label-smoothing", "1"], "--label-smoothing"),
    "ema decay 1": (["--ema-decay", "1"], "--ema-decay"),
    "negative weight decay": (["--weight-decay", "-0.1"], "--weight-decay"),
    "negative grad clip": (["--grad-clip", "-1"], "--grad-clip"),
    "target over 100": (["--target-acc", "101"], "--target-acc"),
    "warm-up as long as the run": (["--warmup-epochs", "1"], "--warmup-epochs"),
    "negative threads": (["--threads", "-1"], "--threads"),
    "negative seed": (["--seed", "-1"], "--seed"),
    "--set unknown key": (["--set", "colour=blue"], "unknown option 'colour'"),
    "--set without =": (["--set", "lr"], "KEY=VALUE"),
    "--set unknown aug key": (["--set", "aug.sparkle=1"], "sparkle"),
    "--set wrong type": (["--set", "seed=\"x\""], "--seed"),
    "--set bool as text": (["--set", "nesterov=\"no\""], "nesterov: expected true or false"),
    "--set dropout 5": (["--set", "dropout=5"], "dropout: expected a number in [0, 1)"),
    "--set cutout negative": (["--set", "aug.cutout_size=-3"], "aug.cutout_size"),
    "--set cutout text": (["--set", "aug.cutout_size=\"big\""], "aug.cutout_size"),
    "--set flip probability 2": (["--set", "aug.flip=2"], "aug.flip"),
    "--set aug not a table": (["--set", "aug=3"], "aug"),
    "--set data not a path": (["--set", "data=3"], "--data"),
    "--set synthetic size 0": (["--set", "synthetic_size=0"], "synthetic_size: expected a positive integer"),
    "--set momentum negative": (["--set", "momentum=-0.5"], "momentum: expected a non-negative number"),
    "--set batch size 0": (["--set", "batch_size=0"], "--batch-size: expected a positive integer"),
    "--set keep_hardest 0": (["--set", "keep_hardest=0"], "keep_hardest: expected a share of the training images"),
    "--set keep_hardest 1.5": (["--set", "keep_hardest=1.5"], "keep_hardest: expected"),
    "--set keep_hardest_epochs 0": (["--set", "keep_hardest_epochs=0"], "keep_hardest_epochs: expected a positive"),
    "--set mid_res 40": (["--set", "mid_res=40"], "mid_res: expected 0 (off) or a size in 8..32"),
    "--set mid_res_epochs 0": (["--set", "mid_res_epochs=0"], "mid_res_epochs: expected a positive"),
    "--set muon_lr -1": (["--set", "muon_lr=-1"], "muon_lr: expected 0 (off) or a positive learning rate"),
    "--set muon_lr with adam": (["--optimizer", "adam", "--set", "muon_lr=0.03"],
                                "muon_lr: expected 0 with --optimizer adam"),
    "--mix with the jsd loss": (["--mix", "cutmix", "--augmix", "jsd"], "aug.mix"),
    "--set mix probability 2": (["--mix", "mixup", "--set", "aug.mix_p=2"], "aug.mix_p"),
    "--set by_precision unknown precision": (["--set", 'by_precision={"fp64": {}}'], "by_precision"),
    "--set by_precision unknown key": (["--set", 'by_precision={"fp32": {"epochz": 1}}'],
                                       "by_precision.fp32: unknown option 'epochz'"),
    "--set by_precision bad value": (["--set", 'by_precision={"fp32": {"lr": -1}}'], "by_precision.fp32: --lr"),
    "unknown option": (["--colour", "blue"], "unrecognized arguments"),
}


@pytest.mark.parametrize("extra,fragment", BAD_TRAIN_OPTIONS.values(), ids=BAD_TRAIN_OPTIONS.keys())
def test_bad_train_option_is_one_line_and_exit_2(tmp_path, capsys, extra, fragment):
    rc, out, err = run_main(capsys, base(tmp_path / "run") + extra)
    assert_one_line_error(rc, err, fragment)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_missing_dataset_without_download(tmp_path, capsys):
    argv = base(tmp_path / "run") + ["--dataset", "cifar10", "--data", "/nonexistent/cifar", "--no-download"]
    rc, _, err = run_main(capsys, argv)
    assert_one_line_error(rc, err, "/nonexistent/cifar")
    assert not Path("/nonexistent/cifar").exists()


def test_out_under_a_regular_file_is_unwritable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc, _, err = run_main(capsys, base(blocker / "run"))
    assert_one_line_error(rc, err, "not writable")
    assert blocker.read_text() == "not a folder"


def test_out_that_is_a_regular_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    rc, _, err = run_main(capsys, base(target))
    assert_one_line_error(rc, err, "not a folder")


def test_resume_without_out(capsys):
    rc, _, err = run_main(capsys, ["train", "--resume", "--quiet"])
    assert_one_line_error(rc, err, "--resume")


def test_resume_of_a_folder_without_last_pt(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = run_main(capsys, ["train", "--resume", "--out", str(tmp_path / "empty")])
    assert_one_line_error(rc, err, "not found")
    rc, _, err = run_main(capsys, ["train", "--resume", "--out", str(tmp_path / "missing")])
    assert_one_line_error(rc, err, "not found")
    assert not (tmp_path / "missing").exists()


def test_resume_of_a_garbage_last_pt(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"\x00garbage")
    rc, _, err = run_main(capsys, ["train", "--resume", "--out", str(tmp_path / "run")])
    assert_one_line_error(rc, err, "truncated or corrupt")  # not "holds more than weights"


def test_resume_of_a_weights_only_checkpoint(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "last.pt", {"model": "era9", "model_state": create_model("era9").state_dict()})
    rc, _, err = run_main(capsys, ["train", "--resume", "--out", str(tmp_path / "run")])
    assert_one_line_error(rc, err, "not a resumable training checkpoint")


def test_new_run_into_a_folder_that_holds_a_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"previous run")
    rc, _, err = run_main(capsys, base(tmp_path / "run"))
    assert_one_line_error(rc, err, "already holds a run")
    assert (tmp_path / "run" / "last.pt").read_bytes() == b"previous run"


def test_errors_name_a_flag_only_where_train_has_one():
    """config.FLAGGED_KEYS, which errors name as --flags, is the set of train's value flags that set a config
    key of the same name; any other key is named as --set writes it."""
    import argparse
    import dataclasses

    from tinycifar import cli
    from tinycifar.config import FLAGGED_KEYS, TrainConfig, option_name

    parser = argparse.ArgumentParser()
    cli._add_train_options(parser)
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    value_flags = {a.dest for a in parser._actions if a.option_strings and a.nargs != 0 and a.dest in keys}
    assert value_flags == FLAGGED_KEYS
    assert (option_name("batch_size"), option_name("muon_lr")) == ("--batch-size", "muon_lr")


BAD_CONFIG_FILES = {
    "missing.toml": (None, "cannot read"),
    "broken.toml": ("epochs = = 3\n", "not valid TOML"),
    "broken.json": ("{\"epochs\": ", "not valid JSON"),
    "unknown.toml": ("colour = \"blue\"\n", "unknown option 'colour'"),
    "type.toml": ("momentum = \"high\"\n", "momentum: expected a finite number"),
    "range.json": ("{\"lr\": -0.1}", "--lr"),
    "aug.toml": ("aug = 3\n", "aug"),
    "augkey.toml": ("[aug]\nsparkle = 1\n", "sparkle"),
}


@pytest.mark.parametrize("name", BAD_CONFIG_FILES)
def test_bad_config_file(tmp_path, capsys, name):
    text, fragment = BAD_CONFIG_FILES[name]
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    rc, _, err = run_main(capsys, base(tmp_path / "run") + ["--config", str(path)])
    assert_one_line_error(rc, err, fragment)


def test_a_good_config_file_is_applied(tmp_path, capsys):
    path = tmp_path / "good.toml"
    path.write_text("seed = 3\n[aug]\npolicy = \"none\"\n")
    rc, _, err = run_main(capsys, base(tmp_path / "run") + ["--config", str(path)])
    assert rc == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["seed"] == 3 and config["aug"]["policy"] == "none"


def test_mix_flag_reaches_the_recorded_config(tmp_path, capsys):
    rc, _, err = run_main(capsys, base(tmp_path / "run") + ["--mix", "cutmix", "--set", "aug.mix_alpha=0.5"])
    assert rc == 0, err
    aug = json.loads((tmp_path / "run" / "config.json").read_text())["aug"]
    assert (aug["mix"], aug["mix_alpha"]) == ("cutmix", 0.5)


# ---------------------------------------------------------------------------- eval


@pytest.fixture()
def good_checkpoint(tmp_path) -> Path:
    path = tmp_path / "good.pt"
    save_checkpoint(path, {"model": "era9", "model_kwargs": {}, "model_state": create_model("era9").state_dict(),
                           "ema_state": None, "mean": [0.5] * 3, "std": [0.25] * 3})
    return path


def test_eval_of_a_missing_checkpoint(tmp_path, capsys):
    rc, _, err = run_main(capsys, ["eval", "--checkpoint", str(tmp_path / "nope.pt")])
    assert_one_line_error(rc, err, "not found", "eval")


def test_eval_of_a_truncated_checkpoint(tmp_path, capsys, good_checkpoint):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good_checkpoint.read_bytes()[: good_checkpoint.stat().st_size // 2])
    rc, _, err = run_main(capsys, ["eval", "--checkpoint", str(cut)])
    assert_one_line_error(rc, err, "truncated or corrupt", "eval")


@pytest.mark.parametrize("content", [b"", b"hello", b"PK\x03\x04junk"], ids=["empty", "text", "bad-zip"])
def test_eval_of_a_file_that_is_no_checkpoint(tmp_path, capsys, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    rc, _, err = run_main(capsys, ["eval", "--checkpoint", str(path)])
    assert_one_line_error(rc, err, str(path), "eval")


def test_eval_of_a_checkpoint_folder(tmp_path, capsys):
    rc, _, err = run_main(capsys, ["eval", "--checkpoint", str(tmp_path)])
    assert_one_line_error(rc, err, "not found", "eval")


def test_eval_of_a_plain_state_dict(tmp_path, capsys):
    path = tmp_path / "sd.pt"
    torch.save(create_model("era9").state_dict(), path)
    rc, _, err = run_main(capsys, ["eval", "--checkpoint", str(path)])
    assert_one_line_error(rc, err, "not a tinycifar checkpoint", "eval")


def test_eval_with_missing_data(tmp_path, capsys, good_checkpoint):
    rc, _, err = run_main(capsys, ["eval", "--checkpoint", str(good_checkpoint), "--data", str(tmp_path / "none"),
                                   "--device", "cpu"])
    assert_one_line_error(rc, err, "no CIFAR-10 found", "eval")


@pytest.mark.parametrize("extra,fragment", [
    (["--batch-size", "0"], "--batch-size"),
    (["--tta", "spin"], "--tta"),
    (["--precision", "fp64"], "--precision"),
    (["--device", "tpu"], "--device"),
], ids=["batch-0", "tta", "precision", "device"])
def test_bad_eval_option(capsys, good_checkpoint, extra, fragment):
    rc, _, err = run_main(capsys, ["eval", "--checkpoint", str(good_checkpoint), *extra])
    assert_one_line_error(rc, err, fragment, "eval")


def test_no_command_and_unknown_command(capsys):
    rc, _, err = run_main(capsys, [])
    assert_one_line_error(rc, err, "required", "")
    rc, _, err = run_main(capsys, ["fly"])
    assert_one_line_error(rc, err, "invalid choice", "")


def test_version_is_the_installed_release(capsys):
    from importlib.metadata import version

    rc, out, err = run_main(capsys, ["--version"])
    assert rc == 0 and out == f"tinycifar {version('tinycifar')}\n" and err == ""


# ---------------------------------------------------------------------------- as a real process


@pytest.mark.parametrize("argv,fragment", [
    (["train", "--epochs", "0", "--dataset", "synthetic"], "--epochs"),
    (["train", "--epochs", "ten"], "--epochs"),
    (["eval", "--checkpoint", "/nonexistent/x.pt"], "not found"),
], ids=["validation", "argparse", "eval"])
def test_a_real_process_prints_one_line_and_exits_2(tmp_path, argv, fragment):
    out = subprocess.run([sys.executable, "-m", "tinycifar", *argv, *(["--out", str(tmp_path / "r")]
                                                                        if argv[0] == "train" else [])],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], out.stderr
    assert out.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_a_reader_that_leaves_early_ends_the_command_quietly(monkeypatch, capsys):
    # `tinycifar models | head -1`: the pipe closes under the writer
    read_end, write_end = os.pipe()
    os.close(read_end)
    with capsys.disabled():
        closed = os.fdopen(write_end, "w", buffering=1)
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["models"]) == 141
        monkeypatch.undo()
        closed.close()  # stdout now points at the null device: closing flushes without an error


def test_out_of_memory_is_one_line_naming_the_batch_size(monkeypatch, capsys):
    from tinycifar.training import train as train_mod

    def runs_out(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "14.75 GiB of which 1.06 GiB is free.\nIf reserved but unallocated memory ...")

    monkeypatch.setattr(train_mod, "train", runs_out)
    rc, _, err = run_main(capsys, ["train", "--dataset", "synthetic", "--batch-size", "4096"])
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err
    assert "Tried to allocate 2.00 GiB" in lines[0] and "lower --batch-size (now 4096)" in lines[0]


def test_more_processes_than_gpus_is_one_line_naming_nproc_per_node(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set_device on a GPU that is not there"))
    rc, _, err = run_main(capsys, ["train", "--dataset", "synthetic", "--device", "cuda"])
    assert_one_line_error(rc, err, "torchrun: process 3 of this machine has no GPU of its own (2 GPUs); "
                                   "pass --nproc-per-node 2 or fewer")
