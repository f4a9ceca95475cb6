"""What every benchmark records beside its numbers (the machine and the command), and the synthetic
training step that the step benchmarks time."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tinycifar.config import TrainConfig
    from tinycifar.training.train import Optimizer


def kernel_isa() -> tuple[str, str]:
    """The instruction sets the kernels run with: ATen's and oneDNN's cap ("native" when not capped;
    ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` approximates an AVX2-only CPU). oneDNN's cap is
    read as training reads it (``onednn_max_isa``: the older ``DNNL_MAX_CPU_ISA`` where the new name is
    unset or empty), so a result's label and ``--precision auto`` never disagree."""
    from tinycifar.training.train import onednn_max_isa

    return torch.backends.cpu.get_cpu_capability(), onednn_max_isa() or "native"


def recipe_batch_size(preset: str, precision: str) -> int:
    """The batch a preset trains at in a precision (its ``by_precision`` table may change it)."""
    from tinycifar.config import apply_precision_recipe, resolve_config

    cfg = resolve_config(preset)
    apply_precision_recipe(cfg, precision)
    return cfg.batch_size


def require_airbench(prog: str) -> None:
    """Exit with one line, before anything runs, where airbench (a benchmark-only dependency) is missing."""
    import importlib.util

    if importlib.util.find_spec("airbench") is None:
        sys.exit(f"{prog}: airbench is not installed: pip install airbench==0.1.8 --no-deps")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    from tinycifar.training.train import cpu_supports_bf16

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_bf16": cpu_supports_bf16(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    return info


# Set, these change which kernels run (the lab approximates AVX2-only CPUs with them): a result's
# command must carry them to be reproduced.
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def command_line() -> str:
    variables = [f"{k}={os.environ[k]}" for k in KERNEL_VARIABLES if os.environ.get(k)]
    return " ".join(shlex.quote(a) for a in [*variables, os.path.basename(sys.executable), *sys.argv])


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}"
    return str(v)


def write_results(out: str | Path, title: str, body: list[str], **fields) -> dict:
    """``out``.json (the command, the machine and ``fields``) and ``out``.md (a title, the command and
    machine lines, then ``body``); prints the Markdown. Returns the JSON's dict."""
    report = {"command": command_line(), "machine": machine_info(), **fields}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# {title}", "", f"Command: `{report['command']}`", "",
          "Machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()), "", *body]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return report


MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]  # CIFAR-10's, near enough for synthetic images


@dataclass
class SyntheticStep:
    """What one training step of a preset needs: its config, network, optimizer and loss, one batch."""

    cfg: TrainConfig
    model: nn.Module
    optimizer: Optimizer
    criterion: nn.Module
    x_raw: torch.Tensor  # normalized, not yet augmented
    y: torch.Tensor
    generator: torch.Generator  # the augmentation's, seeded
    memory_format: torch.memory_format  # the network's, and each batch's


def synthetic_step(preset: str, memory_format: torch.memory_format, batch_size: int | None = None,
                   keep_freed: bool = True, precision: str | None = None) -> SyntheticStep:
    """The preset's network (whitened stem, ``memory_format``), optimizer and loss, with one batch of
    synthetic images (the preset's batch size unless given): the step benchmarks time the training step,
    not the data, so they share this set-up. With ``precision``, the preset's recipe for it (``fast``'s
    fp32 table: batch 128, Muon for the filters), as a run in that precision trains. The initial weights
    come from torch's global RNG: seed it first to repeat them. ``keep_freed=False`` leaves glibc's
    malloc as it is (benchmarks/page_faults.py)."""
    from tinycifar.config import apply_precision_recipe, resolve_config
    from tinycifar.data import synthetic_cifar10
    from tinycifar.devices import keep_freed_memory
    from tinycifar.training.train import build_network, build_optimizer, prepare_model

    cfg = resolve_config(preset, overrides={"batch_size": batch_size} if batch_size else None)
    if precision:
        apply_precision_recipe(cfg, precision)
    if keep_freed:  # as CPU training does (train.tune_backends): freed memory stays for the next step
        keep_freed_memory()
    train, _ = synthetic_cifar10(max(cfg.batch_size, 256) * 4, 10)  # a batch, and the whitening statistics
    model, _ = build_network(cfg)
    prepare_model(model, cfg, train, MEAN, STD)
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer(model, cfg)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x_raw = (train.images[: cfg.batch_size].float() / 255 - mean) / std
    y = train.labels[: cfg.batch_size]
    return SyntheticStep(cfg, model, optimizer, criterion, x_raw, y, torch.Generator().manual_seed(0), memory_format)


def training_step(s: SyntheticStep, resolution: int = 32, precision: str = "fp32",
                  net: nn.Module | None = None) -> Callable[[], None]:
    """One training step as train_one_epoch takes it: augment, resize to ``resolution`` (progressive
    resizing), forward under bf16 autocast or not, backward, optimizer. ``net`` stands in for
    ``s.model`` in the forward (a compiled wrapper of it)."""
    from tinycifar.data.augment import augment
    from tinycifar.data.loader import resized

    net = net or s.model

    def step() -> None:
        x = resized(augment(s.x_raw, s.cfg.aug, s.generator), resolution)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            logits = net(x.contiguous(memory_format=s.memory_format))
        loss = s.criterion(logits.float(), s.y)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()

    return step


def input_shapes(model: nn.Module, resolution: int, keep: Callable[[nn.Module], bool]) -> dict[nn.Module, torch.Size]:
    """Each module of ``model`` that ``keep`` picks, with the shape of its input (batch 1) at ``resolution``."""
    shapes: dict[nn.Module, torch.Size] = {}

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        shapes[module] = args[0].shape

    hooks = [m.register_forward_hook(record) for m in model.modules() if keep(m)]
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution).contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    return shapes
