"""Checkpoints: atomic writes, and every way a file can be unusable ends in CheckpointError."""

from __future__ import annotations

import errno
import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from tinycifar import checkpoint
from tinycifar.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from tinycifar.models import create_model


def era9_state(**extra) -> dict:
    torch.manual_seed(0)
    return {"model": "era9", "model_kwargs": {}, "model_state": create_model("era9").state_dict(),
            "ema_state": None, "epoch": 1, "mean": [0.5] * 3, "std": [0.25] * 3, **extra}


@pytest.fixture()
def good(tmp_path) -> Path:
    path = tmp_path / "good.pt"
    save_checkpoint(path, era9_state())
    return path


def test_round_trip_adds_the_format_version_and_rebuilds_the_model(good):
    state = load_checkpoint(good)
    assert state["format_version"] == FORMAT_VERSION
    model = model_from_checkpoint(state, good)
    for k, v in era9_state()["model_state"].items():
        assert torch.equal(model.state_dict()[k], v)
    assert [p.name for p in good.parent.iterdir()] == ["good.pt"], "temporary file left behind"


# ---------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("keep", [0, 1, 64, 0.5, 0.9, -1], ids=["empty", "1-byte", "64-bytes", "half", "90%",
                                                                "all-but-one"])
def test_truncated_checkpoint_is_refused(good, tmp_path, keep):
    data = good.read_bytes()
    n = keep if isinstance(keep, int) and keep >= 0 else (len(data) - 1 if keep == -1 else int(len(data) * keep))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a readable checkpoint, truncated or corrupt"):
        load_checkpoint(cut)


def test_flipped_bytes_never_escape_as_anything_but_checkpoint_error(good, tmp_path):
    data = bytearray(good.read_bytes())
    for i, pos in enumerate(range(0, len(data), len(data) // 15)):
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        path = tmp_path / f"flip{i}.pt"
        path.write_bytes(bytes(bad))
        try:
            state = load_checkpoint(path)
        except CheckpointError:
            continue
        # a flip inside tensor data still loads; the weights must then still fit the network
        model_from_checkpoint(state, path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path)


def test_a_dict_without_weights_is_not_a_checkpoint(tmp_path):
    for i, obj in enumerate([{"a": torch.zeros(2)}, [1, 2], torch.zeros(3), {"model": "era9"}]):
        torch.save(obj, tmp_path / f"{i}.pt")
        with pytest.raises(CheckpointError, match="not a tinycifar checkpoint"):
            load_checkpoint(tmp_path / f"{i}.pt")


@pytest.mark.parametrize("version", [None, "1", 0, True, 1.0])
def test_a_missing_or_odd_format_version_is_refused(tmp_path, version):
    state = era9_state(format_version=version)
    torch.save(state, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="not a tinycifar checkpoint"):
        load_checkpoint(tmp_path / "v.pt")


def test_a_newer_format_version_asks_for_an_upgrade(tmp_path):
    torch.save(era9_state(format_version=FORMAT_VERSION + 1), tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match=rf"format {FORMAT_VERSION + 1} is newer.*upgrade tinycifar"):
        load_checkpoint(tmp_path / "new.pt")


# ---------------------------------------------------------------------------- wrong network


def test_weights_of_another_network_are_refused(tmp_path):
    state = era9_state()
    state["model"] = "fastnet"
    save_checkpoint(tmp_path / "other.pt", state)
    loaded = load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="weights do not fit network 'fastnet'"):
        model_from_checkpoint(loaded, tmp_path / "other.pt")


def test_an_unknown_network_name_is_refused(tmp_path):
    save_checkpoint(tmp_path / "x.pt", era9_state(model="resnet999"))
    with pytest.raises(CheckpointError, match="unknown model 'resnet999'"):
        model_from_checkpoint(load_checkpoint(tmp_path / "x.pt"), "x.pt")


@pytest.mark.parametrize("field,value", [("model_kwargs", {"width": 3}), ("model_kwargs", {"dropout": "x"}),
                                         ("model_state", {"w": torch.zeros(1)}), ("model_state", [1, 2]),
                                         ("ema_state", {"features.0.0.0.weight": torch.zeros(1)})])
def test_odd_fields_give_checkpoint_error(tmp_path, field, value):
    save_checkpoint(tmp_path / "x.pt", era9_state(**{field: value}))
    with pytest.raises(CheckpointError):
        model_from_checkpoint(load_checkpoint(tmp_path / "x.pt"), "x.pt")


# ---------------------------------------------------------------------------- code-running pickles


class TouchesAFile:
    """Unpickling this would create ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [TouchesAFile, RunsShell])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(era9_state(extra=payload(marker)), evil)
    with pytest.raises(CheckpointError, match="refused, it holds more than weights.*GLOBAL"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.filterwarnings("error")  # and without torch's warning about the pickle protocol
def test_a_legacy_plain_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(TouchesAFile(marker)))
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    assert not marker.exists()


def test_resume_from_a_code_running_checkpoint_is_refused(tmp_path, capsys):
    from tinycifar.cli import main

    marker = tmp_path / "pwned"
    (tmp_path / "run").mkdir()
    torch.save(era9_state(config={}, history=[], optimizer_state={}, extra=TouchesAFile(marker)),
               tmp_path / "run" / "last.pt")
    assert main(["train", "--resume", "--out", str(tmp_path / "run")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


# ---------------------------------------------------------------------------- atomic writes


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(good):
    before = good.read_bytes()

    def fails(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        atomic_write_bytes(good, fails)
    assert info.value.errno == errno.ENOSPC
    assert good.read_bytes() == before
    assert [p.name for p in good.parent.iterdir()] == ["good.pt"]


class FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)


def test_a_full_disk_inside_torch_save_surfaces_as_oserror(good):
    before = good.read_bytes()
    with pytest.raises(OSError) as info:
        atomic_write_bytes(good, lambda f: torch.save(era9_state(epoch=2), FullDisk(f, 4096)))
    assert info.value.errno == errno.ENOSPC  # not torch's RuntimeError wrapper
    assert good.read_bytes() == before
    assert load_checkpoint(good)["epoch"] == 1
    assert len(list(good.parent.iterdir())) == 1


def test_a_failing_fsync_leaves_the_previous_file(good, monkeypatch):
    before = good.read_bytes()

    def no_room(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", no_room)
    with pytest.raises(OSError):
        save_checkpoint(good, era9_state(epoch=2))
    assert good.read_bytes() == before
    assert len(list(good.parent.iterdir())) == 1


def test_an_interrupt_during_the_write_leaves_the_previous_file(good):
    before = good.read_bytes()

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(good, interrupted)
    assert good.read_bytes() == before
    assert len(list(good.parent.iterdir())) == 1


def test_atomic_write_gives_the_usual_permissions_not_mkstemps_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        target = tmp_path / "file.bin"
        atomic_write_bytes(target, lambda f: f.write(b"x"))
        assert target.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in tensors_in(v)] if isinstance(value, (list, tuple)) else []


def test_a_checkpoint_of_device_tensors_loads_on_a_cpu_only_machine(tmp_path, monkeypatch):
    """A training checkpoint (weights, optimizer momentum, EMA with its counter) whose tensors live on
    another device (``meta`` stands in for a GPU) is written with every tensor on the CPU."""
    from tiny_run import train_tiny_run

    run = train_tiny_run(tmp_path / "run", ema_decay=0.9)
    on_device = torch.load(run / "last.pt", map_location="meta", weights_only=True)
    assert {t.device.type for t in tensors_in(on_device)} == {"meta"}
    assert on_device["optimizer_state"]["state"] and on_device["ema_full_state"]["n_averaged"].device.type == "meta"
    # a meta tensor has no data to copy: give the CPU copy zeros of its shape and dtype
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu",
                        lambda t: torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else real_cpu(t))
    save_checkpoint(tmp_path / "moved.pt", on_device)
    loaded = torch.load(tmp_path / "moved.pt", weights_only=True)  # no map_location
    assert {t.device.type for t in tensors_in(loaded)} == {"cpu"}
    assert len(tensors_in(loaded)) == len(tensors_in(on_device))
