"""Checkpoints: written atomically, read with ``weights_only=True`` only.

A checkpoint is a dict of tensors and plain values (no pickled classes), so a
tampered file cannot run code when loaded and a file from another version or
another network is refused with a message that says which.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import ModelError, ModelSource, build_model
from .models.registry import sha256_of

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """The checkpoint cannot be used; the message names the file and the reason."""


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename over it.

    A crash or a full disk leaves the previous file untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in(e)
        if cause is not None and cause is not e:  # torch.save wraps a failed write in a RuntimeError
            raise cause from e
        raise


def current_umask() -> int:
    """The process umask; reading it means setting it, so it is set straight back."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _os_error_in(e: BaseException | None) -> OSError | None:
    """The OSError (disk full, I/O error) behind ``e``, if any, following __cause__/__context__."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (state dicts nest them in dicts and lists) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` with its tensors on the CPU, so that a plain ``torch.load(path, weights_only=True)``
    works on a machine without the GPU it was trained on (torch restores a tensor to its saved device)."""
    state = on_cpu({"format_version": FORMAT_VERSION, **state})
    atomic_write_bytes(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols before failing on them
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if "global" in reason.lower():  # a class or function: what a code-running pickle needs
            raise CheckpointError(f"{path}: refused, it holds more than weights ({reason})") from None
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({reason})") from None
    except Exception as e:  # garbage makes the unpickler fail in many ways (KeyError, struct.error, ...)
        first = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}" if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({first})") from None
    if not isinstance(state, dict) or "model_state" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a tinycifar checkpoint (no model name or weights)")
    version = state.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: not a tinycifar checkpoint (format version {version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version!r} is newer than this tinycifar reads ({FORMAT_VERSION}); "
            "upgrade tinycifar"
        )
    return state


def _unpickling_reason(e: Exception) -> str:
    """What torch's weights-only unpickler found, without its advice on how to load the file anyway."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        found = re.search(r"GLOBAL [\w.]+", ln)
        if found:
            return f"unsupported {found.group(0)}"
    for ln in lines:
        detail = ln.partition("WeightsUnpickler error:")[2].strip()
        if detail:
            return detail
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch", "(")
    reasons = [ln for ln in lines if not ln.startswith(boilerplate)]
    return (reasons or [type(e).__name__])[0]


def recorded_source(state: dict[str, Any]) -> ModelSource:
    """Where the checkpoint's network came from (older checkpoints: a registered name)."""
    return ModelSource.from_dict(state.get("model_source")) or ModelSource(str(state["model"]), "builtin")


def user_code_refusal(path: str | Path, recorded: ModelSource) -> str:
    """Why a checkpoint of the user's own network needs ``--model``, and what to pass."""
    spec, file = recorded.spec, Path(recorded.path) if recorded.path else None
    factory = spec.rpartition(":")[2] or "Net"
    if file is None:
        return (f"{path}: trained with the network object {spec}; pass it again "
                "(--model FILE.py:factory, or model= in Python)")
    if not file.is_file():
        return (f"{path}: trained with your network {spec}, and {file} is missing; "
                f"pass --model NEW/PATH.py:{factory} to point at it")
    if recorded.sha256 and sha256_of(file) != recorded.sha256:
        return (f"{path}: trained with your network {spec}, and {file} has changed since; "
                f"pass --model {spec} --allow-changed-source to load it anyway")
    return (f"{path}: trained with your own network {spec}; tinycifar runs only network code you name: "
            f"pass --model {spec}")


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint", model: str | nn.Module | None = None,
                          allow_changed_source: bool = False) -> nn.Module:
    """Rebuild the checkpoint's network and load its weights (EMA weights when the run kept them).

    Registered and plugin networks are rebuilt by name. The user's own code (a file, a module, an
    object) runs only when the caller names it in ``model`` (a spec or the object itself), and a
    source whose sha256 differs from the recorded one is refused unless ``allow_changed_source``.
    """
    recorded = recorded_source(state)
    if model is None and recorded.is_user_code:
        raise CheckpointError(user_code_refusal(path, recorded))
    try:
        network, current = build_model(model if model is not None else recorded.spec, state.get("model_kwargs", {}))
    except ModelError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if recorded.sha256 and current.sha256 and current.sha256 != recorded.sha256 and not allow_changed_source:
        raise CheckpointError(
            f"{path}: the network's source {current.path} differs from the one it was trained with "
            f"(sha256 {recorded.sha256[:12]}... then, {current.sha256[:12]}... now); pass --allow-changed-source "
            "to load it anyway")
    weights = state.get("ema_state") or state["model_state"]
    try:
        network.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError, KeyError) as e:
        detail = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit network {state['model']!r} ({detail})") from None
    return network
