"""The training engine.

dataset -> DeviceLoader (augmentation on the device) -> model -> loss/optimizer
-> metrics -> run folder. Every epoch ends with an atomic ``last.pt`` holding all that
``--resume`` needs; the random streams are derived from (seed, epoch), so a resumed run
retraces the uninterrupted one exactly on the CPU.

Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel,
``batch_size`` is the global batch split evenly across ranks, and only rank 0 prints
and writes files.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm  # a widget in Jupyter, a text bar in a terminal

from ..checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    recorded_source,
    save_checkpoint,
    user_code_refusal,
)
from ..config import ConfigError, TrainConfig, apply_precision_recipe, in_final_epochs, train_resolution
from ..data import DatasetError, Split, load_cifar10, synthetic_cifar10
from ..data.folders import load_image_folders
from ..data.loader import DeviceLoader, channel_stats
from ..devices import keep_freed_memory
from ..evaluate import EvalResult, autocast_context, eval_batch_size, evaluate, evaluate_views
from ..models import ModelError, ModelSource, build_model, count_params, init_whitening
from ..models.registry import check_output, short_name
from .ema import WarmupEMA
from .losses import build_criterion
from .progress import BarReadout
from .selection import ImageLosses, selects_hardest
from .sgd import SGD

# what build_optimizer makes: our SGD (the recipes' optimizer), or torch's Adam/AdamW
Optimizer = SGD | torch.optim.Optimizer

METRIC_FIELDS = [
    "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "train_seconds_total", "eval_seconds",
    "finished_unix_seconds",  # Unix time the epoch and its test pass ended: whole-process time-to-accuracy
    "skipped_steps",  # fp16: steps the gradient scaler skipped because the gradients overflowed
    "compile_seconds",  # --compile: the first step at each new image size, where it compiles (not in seconds)
    "train_images",  # images the epoch trained on (all ranks): fewer than the split's under keep_hardest
    "train_size",  # the side in pixels of the images it trained at: low_res, mid_res or their own
]


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable run folder); the message says why."""


# ---------------------------------------------------------------------------- environment


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


# oneDNN instruction sets without bf16 arithmetic: ONEDNN_MAX_CPU_ISA set to one of them makes a bf16
# CPU emulate bf16 as an AVX2 or AVX-512 one would (the lab approximates AVX2-only CPUs that way).
ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def onednn_max_isa() -> str:
    """The instruction-set cap oneDNN runs under (``ONEDNN_MAX_CPU_ISA``, or its older name
    ``DNNL_MAX_CPU_ISA``), upper-case; empty where none is set."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()


def cpu_supports_bf16() -> bool:
    """Fast bf16 on the CPU needs AVX512-BF16 or AMX, and oneDNN allowed to use them
    (``ONEDNN_MAX_CPU_ISA``); elsewhere autocast is slower than fp32."""
    max_isa = onednn_max_isa()
    if max_isa in ONEDNN_ISAS_WITHOUT_BF16:
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cuda_supports_bf16(device: torch.device) -> bool:
    """Native bf16 tensor cores arrive with compute capability 8.0 (A100). ``torch.cuda.is_bf16_supported()``
    also counts emulation, which says yes on a T4 (7.5) and runs slow fallback kernels, and it asks
    the current device rather than the chosen one (``--device cuda:1``)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast precision for ``device``: auto picks bf16 where it is native, else fp16 on CUDA
    (trained with a gradient scaler) and fp32 on CPUs without fast bf16."""
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16: not supported on the CPU; use bf16 or fp32")
    if device.type != "cuda":
        return precision if precision != "auto" else "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "auto":
        return "bf16" if cuda_supports_bf16(device) else "fp16"
    if precision == "bf16" and not cuda_supports_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        print(f"tinycifar: warning: --precision bf16 on {device} (compute capability {major}.{minor}) is emulated "
              "and slow; --precision fp16 or auto uses its fp16 tensor cores", file=sys.stderr)
    return precision


def tune_backends(device: torch.device) -> None:
    """On a GPU, let cuDNN time its convolution algorithms for each input shape and keep the fastest:
    the shapes are fixed within a phase (full batches at one resolution), so the timing is paid once
    per shape. On the CPU, keep the memory each step frees for the next (``keep_freed_memory``)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif device.type == "cpu":
        keep_freed_memory()


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this call created the process group, so it destroys it at the end
    wait_group: Any = None  # rank0_first's group: gloo, with RANK0_WAIT as its timeout (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistEnv:
    """Join the torchrun process group when launched by torchrun; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        gpus = torch.cuda.device_count()
        if env.local_rank >= gpus:
            raise ConfigError(f"torchrun: process {env.local_rank} of this machine has no GPU of its own ({gpus} "
                              f"GPU{'s' * (gpus != 1)}); pass --nproc-per-node {gpus} or fewer")
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        env.owns_group = True
    env.wait_group = dist.new_group(backend="gloo", timeout=RANK0_WAIT)
    return env


_SHARED_ERRORS = (ConfigError, DatasetError, CheckpointError, ModelError)
# How long the other ranks wait for rank 0 to download CIFAR-10 or decode a large image folder. NCCL's
# own timeout (10 minutes) would abort a slow download, so the wait runs on a gloo group of its own.
RANK0_WAIT = timedelta(hours=2)


def rank0_first(env: DistEnv, fn: Callable[[], Any], share: bool = False) -> Any:
    """Run ``fn`` on rank 0, then on the other ranks (or hand them rank 0's result when ``share``).

    A bad-input error on rank 0 is raised on every rank, so no rank waits for a partner that
    has already given up; rank 0 going first also keeps ranks from downloading side by side.
    """
    if env.world_size == 1:
        return fn()
    result, failure = None, None
    if env.is_main:
        try:
            result = fn()
        except _SHARED_ERRORS as e:
            failure = e
    box = [None if failure is None else (type(failure).__name__, str(failure)), result if share else None]
    dist.broadcast_object_list(box, src=0, group=env.wait_group)
    if failure is not None:
        raise failure
    if box[0] is not None:
        kind, message = box[0]
        raise next(c for c in _SHARED_ERRORS if c.__name__ == kind)(message)
    if env.is_main:
        return result
    return box[1] if share else fn()


@torch.no_grad()
def sync_buffers(env: DistEnv, *modules: nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics drift apart between DDP forwards),
    so all ranks evaluate the very network that rank 0 saves."""
    if env.world_size > 1:
        for module in modules:
            for buf in module.buffers():
                dist.broadcast(buf, src=0)


# ---------------------------------------------------------------------------- optimisation


def prepare_model(model: nn.Module, cfg: TrainConfig, train_split: Split, mean: list[float],
                  std: list[float]) -> None:
    """Apply the recipe's surgery: a frozen whitening stem (and its batch norm), frozen batch-norm scales."""
    if cfg.whiten_stem:
        stem = first_conv(model)
        if stem is None or stem.in_channels != 3:
            raise ConfigError(f"whiten_stem: {cfg.model} has no first convolution on the 3 image channels to "
                              "whiten; pass --set whiten_stem=false")
        # normalized in place on the CPU; init_whitening moves it to the device chunk by chunk
        sample = train_split.images[:5000].float().div_(255)
        sample.sub_(torch.tensor(mean).view(1, -1, 1, 1)).div_(torch.tensor(std).view(1, -1, 1, 1))
        try:
            init_whitening(stem, sample)
        except ValueError as e:
            raise ConfigError(f"whiten_stem: the first convolution of {cfg.model} ({stem}) cannot hold the "
                              f"whitening filters: {e}; pass --set whiten_stem=false") from None
        stem.weight.requires_grad_(False)
        if cfg.freeze_stem_after == 0:
            freeze_stem_norm(model)
    if cfg.late_freeze_blocks and not can_freeze_leading_blocks(model, cfg.late_freeze_blocks):
        raise ConfigError(f"late_freeze_blocks: {cfg.model} has no `features` sequence of at least "
                          f"{cfg.late_freeze_blocks} blocks to freeze (tinycifar's networks are features -> head); "
                          "pass --set late_freeze_blocks=0")
    if cfg.freeze_norm_scale:
        stop_training(m.weight for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None)


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    """The convolution that the whitening stem takes over: the network's first."""
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def freeze_stem_norm(model: nn.Module) -> bool:
    """Freeze the batch norm right after the (whitened, frozen) first convolution; it still normalizes
    by the batch. With nothing before it to train, backward stops at the second layer's weights and
    never touches the largest maps: a 32x32 fp32 step at batch 128 costs 0.90x on a Zen 3 (airbench
    freezes its whitening layer too). Returns whether the norm trained until now."""
    modules = list(model.modules())
    after_stem = modules[modules.index(first_conv(model)) + 1:]
    norm = next((m for m in after_stem if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm))), None)
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return False  # the stem feeds a trained layer straight away
    return stop_training(norm.parameters())  # False when its norm is frozen already


def stop_training(parameters: Iterable[nn.Parameter]) -> bool:
    """Freeze the parameters; returns whether any of them trained until now (then DDP and a compiled
    step must be built again)."""
    trained = [p for p in parameters if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    return bool(trained)


def can_freeze_leading_blocks(model: nn.Module, blocks: int) -> bool:
    """Whether the network is tinycifar's features -> head, with at least ``blocks`` feature blocks."""
    features = getattr(model, "features", None)
    return isinstance(features, nn.Sequential) and len(features) >= blocks


def freeze_leading_blocks(model: nn.Module, blocks: int) -> bool:
    """Stop training the first ``blocks`` blocks of ``model.features`` (their batch norms still normalize
    by the batch). Backward then stops at the next block: with the first two of fastnet's frozen, a
    32x32 fp32 step at batch 128 costs 0.59x on a Zen 3. Returns whether anything trained until now."""
    return stop_training(model.features[:blocks].parameters())


def freeze_for_epoch(model: nn.Module, cfg: TrainConfig, epoch: int) -> bool:
    """What the recipe stops training from this epoch on (0-based): the whitening stem's batch norm after
    ``freeze_stem_after`` epochs; the first ``late_freeze_blocks`` blocks for the last
    ``late_freeze_epochs``, never from the first (blocks that never trained would stay random).
    Idempotent, so a resumed run freezes what the whole run had frozen by then. Returns whether
    anything changed (then DDP and a compiled step must be built again)."""
    changed = bool(cfg.whiten_stem and 0 < cfg.freeze_stem_after <= epoch and freeze_stem_norm(model))
    if cfg.late_freeze_blocks and in_final_epochs(cfg, epoch, cfg.late_freeze_epochs):
        changed = freeze_leading_blocks(model, cfg.late_freeze_blocks) or changed
    return changed


def normalized_filters(model: nn.Module) -> set[nn.Conv2d]:
    """Full convolutions (groups 1) registered right before a batch norm of their width, as in ConvBNAct or
    nn.Sequential(conv, bn, ...): their scale is lost in the norm, which is what lets Muon hold it fixed.
    Squeeze-excite gates and convolutional heads are left out. Registration order stands in for the
    forward's: a module that registers conv1, conv2, bn1, bn2 loses Muon for conv1 (SGD, the safe side);
    one that normalizes a sum, bn(conv(x) + x), should pass --set muon_lr=0."""
    modules = list(model.modules())
    return {m for m, after in zip(modules, modules[1:], strict=False)
            if isinstance(m, nn.Conv2d) and m.groups == 1
            and isinstance(after, nn.modules.batchnorm._BatchNorm) and after.num_features == m.out_channels}


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Weights with decay; norm scales/biases and all biases without (unless asked), at their own lr;
    with muon_lr, the filters that batch norm follows in a group of their own (Muon's)."""
    decay, norm_scale, no_decay_bias, filters = [], [], [], []
    muon_takes = normalized_filters(model) if cfg.muon_lr > 0 else set()
    for module in model.modules():
        is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        is_filter = module in muon_takes
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias":
                no_decay_bias.append(p)
            elif is_norm:
                norm_scale.append(p)
            elif is_filter:
                filters.append(p)
            else:
                decay.append(p)
    wd_extra = cfg.weight_decay if cfg.wd_on_norm_and_bias else 0.0
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": norm_scale, "weight_decay": wd_extra, "lr_scale": 1.0},
        {"params": no_decay_bias, "weight_decay": wd_extra, "lr_scale": cfg.norm_bias_lr_scale},
        {"params": filters, "weight_decay": 0.0, "lr_scale": cfg.muon_lr / cfg.lr, "orthogonalize": True},
    ]
    return [g for g in groups if g["params"]]


def gradient_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16's narrow range flushes small gradients to zero: the scaler multiplies the loss before the
    backward pass and skips a step whose gradients overflowed. bf16 and fp32 need none (a no-op scaler)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def overflowed(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> bool:
    """Whether the unscaled gradients hold an inf or NaN, so ``scaler.step`` will skip the step.
    ``GradScaler.step`` reads these same flags on the host, so reading them adds no synchronisation."""
    return any(bool(flag.item()) for flag in scaler._found_inf_per_device(optimizer).values())


def apply_gradients(optimizer: Optimizer, scaler: torch.amp.GradScaler, model: nn.Module,
                    grad_clip: float) -> bool:
    """Unscale (clipping must see the true gradients), clip, step, update the scale; returns False when
    the fp16 gradients overflowed and the step was skipped (weights and momentum untouched)."""
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    skipped = scaler.is_enabled() and overflowed(scaler, optimizer)
    scaler.step(optimizer)
    scaler.update()
    return not skipped


class CompiledOnce(nn.Module):
    """``torch.compile`` of ``net`` whose batches have a symbolic batch size and image size, so the
    partial last batch, and the switch from low-resolution to full-resolution epochs where the network
    allows it, reuse the first compilation instead of compiling again in the middle of an epoch.
    Padding or dropping the partial batch would change what is trained, and warming up every shape
    before the run would take training steps on the real weights; symbolic sizes cost little, as
    convolutions go to cuDNN whatever the shape. What fixes one image size (a flatten into a fixed Linear;
    torch 2.13's inductor on the CPU, whose backward checks memory formats on the sizes) compiles once per
    size: ``maybe_mark_dynamic`` lets it, where ``mark_dynamic`` would fail, and ``train_one_epoch`` times
    the first step at each size apart."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.compiled = torch.compile(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for dim in (0, 2, 3):  # batch, height, width
            torch._dynamo.maybe_mark_dynamic(x, dim)
        return self.compiled(x)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> Optimizer:
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    if cfg.optimizer == "sgd":
        return SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at ``step`` (0-based) of ``total``: warm-up then the schedule."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)  # 0 -> 1 over the rest
    end = cfg.final_lr_scale
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.step_gamma ** ((step // steps_per_epoch) // cfg.step_size)
    if cfg.schedule == "cosine":
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))
    # one-cycle (Smith): linear rise from 1/25 of the peak, cosine fall to ``end``
    rise = cfg.pct_start if warmup == 0 else 0.0
    if t < rise:
        return 0.04 + 0.96 * t / rise
    u = (t - rise) / (1 - rise)
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * u))


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


# ---------------------------------------------------------------------------- run folder


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.preset}-{short_name(cfg.model)}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue().encode()))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def prepare_run_dir(cfg: TrainConfig) -> Path:
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: exists and is not a folder")
    if cfg.resume:
        if not (run_dir / "last.pt").is_file():
            raise ConfigError(f"--resume: {run_dir / 'last.pt'} not found; nothing to resume")
    elif (run_dir / "last.pt").exists():
        raise ConfigError(f"--out {run_dir}: already holds a run (last.pt); pass --resume to continue it "
                          "or choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
        if cfg.resume:  # half-written files of a killed run (atomic_write_bytes' temporaries)
            for stale in run_dir.glob(".*.tmp"):
                stale.unlink()
    except OSError as e:
        raise ConfigError(f"--out {run_dir}: run folder is not writable ({e.strerror})") from None
    return run_dir


# ---------------------------------------------------------------------------- data


def load_data(cfg: TrainConfig) -> tuple[Split, Split]:
    if cfg.dataset == "folder":
        return load_image_folders(cfg.data, cfg.image_size, cfg.strict, quiet=cfg.quiet)
    if cfg.dataset == "synthetic":
        return synthetic_cifar10(cfg.synthetic_size, max(cfg.synthetic_size // 4, 10), seed=cfg.seed)
    return load_cifar10(cfg.data, verify_md5=not cfg.allow_modified, download=cfg.download)


# ---------------------------------------------------------------------------- the loop


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    is_main: bool = True  # False on the other ranks under torchrun: they write nothing
    model: nn.Module | None = None  # the evaluated network at the end (the EMA of the weights when kept)


def model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    return {**cfg.model_kwargs, **({} if cfg.dropout is None else {"dropout": cfg.dropout})}


def build_network(cfg: TrainConfig, model: nn.Module | None = None) -> tuple[nn.Module, ModelSource]:
    """The run's network: ``model`` when the Python API was handed one, else the one ``cfg.model``
    names, checked to map the batches this recipe feeds it (its smaller epochs included)."""
    network, source = build_model(model if model is not None else cfg.model, model_kwargs(cfg),
                                  cfg.model_kwargs.get("num_classes", 10), cfg.image_size)
    for size in sorted({train_resolution(cfg, epoch) for epoch in range(cfg.epochs)} - {None}):
        option = "low_res" if size == cfg.low_res else "mid_res"
        try:
            check_output(network, f"--model {source.spec}", cfg.model_kwargs.get("num_classes", 10), size)
        except ModelError as e:
            raise ModelError(f"{e}; this run trains epochs at {size}x{size} ({option}): "
                             f"pass --set {option}=0 to leave that size out") from None
    return network, source


def train(cfg: TrainConfig, data: tuple[Split, Split] | None = None, model: nn.Module | None = None,
          on_epoch: Callable[[int, float], None] | None = None) -> RunResult:
    """Train as ``cfg`` says (the network ``model`` in place, when given); returns the run folder and summary.

    ``on_epoch(epoch, test_accuracy)`` is called after each epoch's checkpoint (a sweep reports to
    its pruner there, and may stop the run by raising).
    """
    cfg = dataclasses.replace(cfg)  # prepare() may set model_kwargs.num_classes; the caller's config stays
    env = init_distributed(cfg.device)
    threads = torch.get_num_threads()
    try:
        result = _train(cfg, env, data, model, on_epoch)
        if env.owns_group:
            dist.barrier()  # no rank tears the group down while another still writes or reduces
        return result
    finally:
        torch.set_num_threads(threads)  # --threads is for this run, not for the caller's process
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        elif env.wait_group is not None and dist.is_initialized():  # the caller's group stays; ours goes
            dist.destroy_process_group(env.wait_group)


@dataclass
class Run:
    """One run between its epochs: built by ``setup``, advanced by ``train_one_epoch`` and
    ``evaluate_and_checkpoint``, closed by ``finish``."""

    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    precision: str
    run_dir: Path
    model: nn.Module  # the network being trained
    net: nn.Module  # what a step calls: the model, wrapped in DDP and/or torch.compile
    ema: WarmupEMA | None
    source: ModelSource
    optimizer: Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    train_loader: DeviceLoader
    test_loader: DeviceLoader
    mean: list[float]
    std: list[float]
    classes: tuple[str, ...]
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    train_seconds: float = 0.0
    best_acc: float = -1.0
    saved_epoch: int = 0  # epoch of the newest last.pt on disk
    log: Any = None  # TensorBoardLog when --tensorboard (rank 0)
    tta_result: EvalResult | None = None  # the last epoch's, when the run reports TTA
    last_result: EvalResult | None = None  # the newest test pass's
    compiled_sizes: set[int | None] = field(default_factory=set)  # --compile: the image sizes compiled for
    image_losses: ImageLosses | None = None  # keep_hardest: what its epochs select by

    @property
    def quiet(self) -> bool:
        return self.cfg.quiet or not self.env.is_main

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and used for inference: the moving average of the weights when kept."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def steps_per_epoch(self) -> int:
        """Steps in an epoch over the whole training split (the lr schedule's unit)."""
        return self.train_loader.batches_over(None)

    @property
    def params(self) -> int:
        return count_params(self.model)

    def checkpoint_state(self, epoch: int) -> dict[str, Any]:
        ema = self.ema
        return {
            "model": self.cfg.model, "model_kwargs": model_kwargs(self.cfg), "model_source": self.source.to_dict(),
            "epoch": epoch, "model_state": self.model.state_dict(), "optimizer_state": self.optimizer.state_dict(),
            "ema_state": ema.module.state_dict() if ema is not None else None,
            "ema_full_state": ema.state_dict() if ema is not None else None,
            "scaler_state": self.scaler.state_dict(),  # empty unless fp16
            "config": self.cfg.to_dict(), "mean": self.mean, "std": self.std, "history": self.history,
            "params": self.params, "classes": list(self.classes),
            "image_losses": self.image_losses.latest if self.image_losses is not None else None,  # keep_hardest
        }


def _train(cfg: TrainConfig, env: DistEnv, data: tuple[Split, Split] | None, model: nn.Module | None,
           on_epoch: Callable[[int, float], None] | None = None) -> RunResult:
    run = setup(cfg, env, data, model)
    stop_reason = ""
    for epoch in range(run.start_epoch, cfg.epochs):
        stats = train_one_epoch(run, epoch)
        accuracy = evaluate_and_checkpoint(run, epoch, stats)
        if accuracy is None:
            continue
        if on_epoch is not None:
            on_epoch(epoch + 1, accuracy)
        if cfg.target_acc and accuracy >= cfg.target_acc:
            stop_reason = f"reached --target-acc {cfg.target_acc}% at epoch {epoch + 1}"
            break
    return finish(run, stop_reason)


@dataclass
class Prepared:
    """A recipe made ready on its device: what a run and the learning-rate range test both start from."""

    device: torch.device
    precision: str
    model: nn.Module
    source: ModelSource
    train_split: Split
    test_split: Split
    mean: list[float]
    std: list[float]
    train_loader: DeviceLoader


def prepare(cfg: TrainConfig, env: DistEnv, data: tuple[Split, Split] | None = None,
            model: nn.Module | None = None) -> Prepared:
    """Device and precision, the data, the network with the recipe's surgery, the training loader."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and env.world_size > 1:
        device = torch.device("cuda", env.local_rank)
    precision = resolve_precision(cfg.precision, device)
    apply_precision_recipe(cfg, precision)  # before anything reads the recipe
    tune_backends(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % env.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size}: must be divisible by the {env.world_size} processes")
    train_split, test_split = data if data is not None else rank0_first(env, lambda: load_data(cfg))
    if len(train_split.classes) != 10 and "num_classes" not in cfg.model_kwargs:  # the network follows the data
        cfg.model_kwargs = {**cfg.model_kwargs, "num_classes": len(train_split.classes)}
    mean, std = channel_stats(train_split.images)
    torch.manual_seed(cfg.seed)
    model, source = build_network(cfg, model)
    model = model.to(device)
    prepare_model(model, cfg, train_split, mean, std)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader = training_loader(cfg, env, train_split, mean, std, device)
    if len(train_loader) == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size}: larger than the {len(train_split)} training images")
    return Prepared(device, precision, model, source, train_split, test_split, mean, std, train_loader)


def training_loader(cfg: TrainConfig, env: DistEnv, split: Split, mean: list[float], std: list[float],
                    device: torch.device) -> DeviceLoader:
    """The batched policy on the device, or the user's albumentations pipeline in CPU workers."""
    common = dict(seed=cfg.seed, channels_last=cfg.channels_last, drop_last=cfg.drop_last, rank=env.rank,
                  world_size=env.world_size, device=device)
    if cfg.aug_pipeline:
        from ..data.pipeline import PipelineError, PipelineLoader, load_pipeline

        try:
            pipeline = load_pipeline(cfg.aug_pipeline, split.images[:8])
        except PipelineError as e:
            raise ConfigError(str(e)) from None
        return PipelineLoader(split, cfg.batch_size // env.world_size, mean, std, pipeline, cfg.aug_workers, **common)
    return DeviceLoader(split, cfg.batch_size // env.world_size, mean, std, train=True, aug=cfg.aug, **common)


def setup(cfg: TrainConfig, env: DistEnv, data: tuple[Split, Split] | None = None,
          model: nn.Module | None = None) -> Run:
    """Device, data, network, run folder, loaders, optimizer; restores a resumed run's state."""
    # The data and the network first: a missing dataset or a broken network file must not leave an
    # empty run folder behind.
    p = prepare(cfg, env, data, model)
    device, model, mean, std = p.device, p.model, p.mean, p.std
    test_loader = DeviceLoader(p.test_split, eval_batch_size(device), mean, std, device, train=False,
                               channels_last=cfg.channels_last, rank=env.rank, world_size=env.world_size)

    if cfg.tensorboard and env.is_main:
        from .tensorboard_log import writer_class

        writer_class()  # a missing extra is said before a run folder exists
    # Rank 0 checks and creates the run folder; every rank gets its path (the default one is
    # timestamped) and reads the resume checkpoint from it before rank 0 can overwrite it
    # (that happens only after the collectives of a whole epoch).
    run_dir = rank0_first(env, lambda: prepare_run_dir(cfg), share=True)
    ema = WarmupEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    run = Run(cfg, env, device, p.precision, run_dir, model, wrap(model, cfg, env, device), ema, p.source,
              build_optimizer(model, cfg), gradient_scaler(device, p.precision), build_criterion(cfg), p.train_loader,
              test_loader, mean, std, p.train_split.classes)
    if cfg.keep_hardest < 1:
        run.image_losses = ImageLosses(len(p.train_split), device)
    resumed = cfg.resume and restore(run, load_checkpoint(run_dir / "last.pt"))
    announce(run, len(p.train_split), len(p.test_split), resumed)
    if cfg.tensorboard and env.is_main:
        from .tensorboard_log import TensorBoardLog

        run.log = TensorBoardLog(run_dir, cfg, p.train_split, mean, std)
    return run


def wrap(model: nn.Module, cfg: TrainConfig, env: DistEnv, device: torch.device) -> nn.Module:
    """What a step calls: the model in DDP across processes, compiled with --compile."""
    net = model
    if env.world_size > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return CompiledOnce(net) if cfg.compile else net


def restore(run: Run, state: dict[str, Any]) -> bool:
    """Continue from a run's last.pt: the same code (unless allowed), weights, optimizer, EMA, history."""
    check_resumed_source(recorded_source(state), run.source, run.cfg.allow_changed_source, run.run_dir / "last.pt")
    run.model.load_state_dict(state["model_state"])
    run.optimizer.load_state_dict(state["optimizer_state"])
    if run.ema is not None and state.get("ema_full_state"):
        run.ema.load_state_dict(state["ema_full_state"])
    if run.scaler.is_enabled() and state.get("scaler_state"):  # fp16's scale goes on where it was
        run.scaler.load_state_dict(state["scaler_state"])
    if run.image_losses is not None and state.get("image_losses") is not None:  # what the next epoch selects by
        run.image_losses.latest = state["image_losses"].to(run.device)
    run.history = list(state["history"])
    run.start_epoch = run.saved_epoch = int(state["epoch"])
    run.train_seconds = float(run.history[-1]["train_seconds_total"]) if run.history else 0.0
    run.best_acc = max((h["test_acc"] for h in evaluated(run.history)), default=-1.0)
    return True


def announce(run: Run, n_train: int, n_test: int, resumed: bool) -> None:
    """config.json (rank 0) and the run's first line."""
    cfg, env = run.cfg, run.env
    if env.is_main:
        try:
            write_json(run.run_dir / "config.json", {**cfg.to_dict(), "resolved": {
                "device": str(run.device), "precision": run.precision, "world_size": env.world_size,
                "precision_recipe": cfg.by_precision.get(run.precision, {}),
                "per_rank_batch": cfg.batch_size // env.world_size, "steps_per_epoch": run.steps_per_epoch,
                "params": run.params, "mean": run.mean, "std": run.std, "torch": torch.__version__}})
            if resumed:  # a kill between last.pt and metrics.csv leaves the csv behind
                write_metrics_csv(run.run_dir / "metrics.csv", run.history)
        except OSError as e:
            raise TrainingError(f"cannot write to {run.run_dir} ({e.strerror or e}); no epoch was run") from None
    if not run.quiet:
        print(f"tinycifar: {cfg.model} ({run.params:,} parameters), {n_train:,} train / {n_test:,} test images, "
              f"{run.device} {run.precision}, batch {cfg.batch_size}, {cfg.epochs} epochs -> {run.run_dir}")
        if cfg.by_precision.get(run.precision):
            print(f"{run.precision} recipe (by_precision): {json.dumps(cfg.by_precision[run.precision])}")
        if resumed:
            print(f"resuming after epoch {run.start_epoch}")


@dataclass
class EpochStats:
    train_loss: float
    train_acc: float
    seconds: float
    lr: float  # the last step's
    skipped_steps: int = 0
    compile_seconds: float = 0.0  # --compile: the step that compiled at this image size, not in ``seconds``
    images: int = 0  # trained on, all ranks
    size: int = 0  # the side of the images trained on (progressive resizing)


def choose_images(run: Run, epoch: int) -> torch.Tensor | None:
    """The images the epoch trains on (None: all), and with keep_hardest a fresh record of their losses."""
    losses = run.image_losses
    if losses is None:
        return None
    losses.start_epoch()
    return losses.hardest(run.cfg.keep_hardest, run.cfg.batch_size) if selects_hardest(run.cfg, epoch) else None


def train_one_epoch(run: Run, epoch: int) -> EpochStats:
    """One pass over the training set (or its hardest images): the recipe's steps, with a progress bar (rank 0).

    An epoch of fewer steps (``keep_hardest``) covers the same share of the lr schedule as a whole one.
    """
    cfg, device, steps, losses = run.cfg, run.device, run.steps_per_epoch, run.image_losses
    run.train_loader.set_epoch(epoch)
    run.train_loader.resolution = train_resolution(cfg, epoch)
    run.train_loader.subset = choose_images(run, epoch)
    batches = len(run.train_loader)
    # dropout stream: reproducible on resume, and its own on each rank
    torch.manual_seed(cfg.seed * 1_000_003 + epoch + 7919 * run.env.rank)
    if freeze_for_epoch(run.model, cfg, epoch):
        run.net = wrap(run.model, cfg, run.env, device)  # DDP reduces the gradients it saw at its start,
        run.compiled_sizes.clear()  # and a new torch.compile wrapper compiles again
    run.model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, lr, skipped, compile_seconds = 0, cfg.lr, 0, 0.0
    compiles = cfg.compile and run.train_loader.resolution not in run.compiled_sizes
    if not run.quiet:
        print(f"EPOCH: {epoch + 1}")
    bar = tqdm(run.train_loader, total=batches, disable=run.quiet, dynamic_ncols=True, leave=True)
    readout = BarReadout(device)
    if compiles:  # the queue drained, so the compiling step's time is its own
        wait_for_device(device)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(bar):
        lr = cfg.lr * lr_factor(epoch * steps + int(i * steps / batches), steps * cfg.epochs, steps, cfg)
        set_lr(run.optimizer, lr)
        with autocast_context(device, run.precision):
            logits = run.net(x)
            loss = run.criterion(logits.float(), y)
        if losses is not None:
            losses.record(run.train_loader.last_indices, logits, y)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        applied = apply_gradients(run.optimizer, run.scaler, run.model, cfg.grad_clip)
        skipped += not applied
        if run.ema is not None and applied:  # a skipped fp16 step changed no weight: nothing to average
            run.ema.update_parameters(run.model)
        if compiles and i == 0:
            compile_seconds, t0 = compiled_step_seconds(run, t0), time.perf_counter()
        if run.log is not None:
            run.log.step(epoch * steps + i, loss, lr)
        loss_sum += loss.detach() * len(y)
        # the labelled images, not AugMix's views; a mixed image counts for its larger share's class
        correct += (logits[: len(y)].argmax(1) == (y if y.ndim == 1 else y.argmax(1))).sum()
        seen += len(y)
        if not run.quiet and (i % 10 == 0 or i == batches - 1):
            readout.push(i, loss, correct, seen)
            show(bar, readout.text(wait=i == batches - 1))  # the newest that arrived; the last step's awaited
    if losses is not None:
        losses.finish_epoch(run.env.world_size)
    wait_for_device(device)
    seconds = time.perf_counter() - t0
    bar.close()
    totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=device,
                                                                            dtype=torch.float64)])
    if run.env.world_size > 1:
        dist.all_reduce(totals)
    train_loss, train_acc = (totals[0] / totals[2]).item(), (100 * totals[1] / totals[2]).item()
    if not math.isfinite(train_loss):
        good = (f"the last good checkpoint is {run.run_dir / 'last.pt'} (epoch {run.saved_epoch})" if run.saved_epoch
                else "no checkpoint was written yet")
        raise TrainingError(f"epoch {epoch + 1}: training loss is {train_loss}; stopped, {good}; "
                            "lower --lr or set a --grad-clip")
    size = x.shape[-1] if batches else 0  # what the network saw, after any pipeline's crop or resize
    # every rank takes as many images; counted on the host, so no read from the device
    return EpochStats(train_loss, train_acc, seconds, lr, skipped, compile_seconds, seen * run.env.world_size, size)


def compiled_step_seconds(run: Run, t0: float) -> float:
    """The seconds of the first step at a new image size, where ``--compile`` compiles (forward and
    backward), kept apart from the epoch's so that ``seconds`` and images/s measure training alone;
    that one step's own work is in it."""
    wait_for_device(run.device)
    run.compiled_sizes.add(run.train_loader.resolution)
    return time.perf_counter() - t0


def wait_for_device(device: torch.device) -> None:
    """Let the GPU finish what was queued, so that a clock read next measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def show(bar: tqdm, text: str | None) -> None:
    if text is not None:
        bar.set_description(text)


def evaluates_after(cfg: TrainConfig, epoch: int) -> bool:
    """Whether epoch (0-based) ends with a test pass: every ``eval_every`` epochs, after the last, and
    after every epoch when a ``target_acc`` may stop the run there."""
    last = epoch + 1 == cfg.epochs
    return last or cfg.target_acc > 0 or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0)


def evaluated(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The epochs that ended with a test pass (``--eval-every`` may skip some)."""
    return [h for h in history if h.get("test_acc") is not None]


def evaluate_and_checkpoint(run: Run, epoch: int, stats: EpochStats) -> float | None:
    """Test accuracy after the epoch (when it is due), its metrics row, best.pt/last.pt/metrics.csv;
    returns the accuracy, or None for an epoch without a test pass."""
    run.train_seconds += stats.seconds
    t_eval = time.perf_counter()
    result = None
    if evaluates_after(run.cfg, epoch):
        sync_buffers(run.env, run.model, *([run.ema.module] if run.ema is not None else []))
        if run.cfg.tta and epoch + 1 == run.cfg.epochs:  # the TTA views include the plain one: one pass
            run.tta_result, result = evaluate_views(run.eval_model, run.test_loader, run.precision, run.cfg.tta_views)
        else:
            result = evaluate(run.eval_model, run.test_loader, run.precision)
        run.last_result = result
    run.history.append({
        "epoch": epoch + 1, "lr": stats.lr, "train_loss": round(stats.train_loss, 6),
        "train_acc": round(stats.train_acc, 4), "test_loss": round(result.loss, 6) if result else None,
        "test_acc": round(result.accuracy, 4) if result else None, "seconds": round(stats.seconds, 3),
        "train_seconds_total": round(run.train_seconds, 3), "eval_seconds": round(time.perf_counter() - t_eval, 3),
        "finished_unix_seconds": round(time.time(), 3), "skipped_steps": stats.skipped_steps,
        "compile_seconds": round(stats.compile_seconds, 3), "train_images": stats.images,
        "train_size": stats.size})
    if result is not None and not run.quiet:
        print(f"\n{result.line()}\n")
    if result is not None and run.log is not None:
        run.log.epoch(run.history[-1], result.confusion)
    if run.env.is_main:
        state = run.checkpoint_state(epoch + 1)
        try:
            if result is not None and result.accuracy > run.best_acc:
                save_checkpoint(run.run_dir / "best.pt", state)
                run.best_acc = result.accuracy
            save_checkpoint(run.run_dir / "last.pt", state)
            run.saved_epoch = epoch + 1
            write_metrics_csv(run.run_dir / "metrics.csv", run.history)
        except OSError as e:  # disk full, folder gone: the atomic writes left the old files whole
            raise TrainingError(
                f"epoch {epoch + 1}: cannot write to {run.run_dir} ({e.strerror or e}); the previous checkpoint "
                f"{run.run_dir / 'last.pt'} (epoch {run.saved_epoch}) is intact; make room, then --resume") from None
    return result.accuracy if result is not None else None


def finish(run: Run, stop_reason: str) -> RunResult:
    """The summary (with TTA when asked), written by rank 0, and the closing lines."""
    cfg, history = run.cfg, run.history
    summary = build_summary(cfg, history, run.params, run.precision, run.device, run.env, stop_reason,
                            run.steps_per_epoch * cfg.batch_size)
    if summary["final_acc"] is not None:  # a resumed, finished run tests its weights again
        final = run.last_result or evaluate(run.eval_model, run.test_loader, run.precision)
        summary["final_ece"] = round(final.ece, 4)
    if cfg.tta and history:
        tta_result = run.tta_result or evaluate(run.eval_model, run.test_loader, run.precision, tta=cfg.tta_views)
        summary["final_acc_tta"] = round(tta_result.accuracy, 4)
        summary["final_ece_tta"] = round(tta_result.ece, 4)
    if run.env.is_main:
        try:
            write_json(run.run_dir / "summary.json", summary)
        except OSError as e:
            raise TrainingError(f"cannot write {run.run_dir / 'summary.json'} ({e.strerror or e}); training finished "
                                f"and {run.run_dir / 'last.pt'} (epoch {run.saved_epoch}) is intact; --resume writes "
                                "the summary") from None
    if run.log is not None:
        run.log.close()
    if not run.quiet:
        print(summary_line(summary))
        print(f"run folder: {run.run_dir}")
    return RunResult(run.run_dir, summary, history, run.env.is_main, run.eval_model)


def check_resumed_source(recorded: ModelSource, current: ModelSource, allow_changed: bool, path: Path) -> None:
    """A resumed run continues with the code it started with, unless the user says otherwise."""
    if recorded.sha256 and current.sha256 != recorded.sha256 and not allow_changed:
        raise ConfigError(f"--resume: {current.path or current.spec} has changed since {path} was written; pass "
                          "--allow-changed-source to continue with the new code")


def build_summary(cfg: TrainConfig, history: list[dict[str, Any]], params: int, precision: str,
                  device: torch.device, env: DistEnv, stop_reason: str, images_per_epoch: int) -> dict[str, Any]:
    tested = evaluated(history)
    reached = next((h for h in tested if h["test_acc"] >= cfg.target_for_summary), None)
    train_seconds = history[-1]["train_seconds_total"] if history else 0.0
    best = max(tested, key=lambda h: h["test_acc"]) if tested else None
    final = tested[-1] if tested and tested[-1] is history[-1] else None
    return {
        "model": cfg.model, "preset": cfg.preset, "params": params, "epochs_run": len(history),
        "best_acc": best["test_acc"] if best else None, "best_epoch": best["epoch"] if best else None,
        "final_acc": final["test_acc"] if final else None, "final_loss": final["test_loss"] if final else None,
        "target": cfg.target_for_summary,
        "epoch_reached_target": reached["epoch"] if reached else None,
        "seconds_to_target": reached["train_seconds_total"] if reached else None,
        "train_seconds": train_seconds,
        "compile_seconds": round(sum(h.get("compile_seconds") or 0.0 for h in history), 3),
        "images_per_second": round(sum(h.get("train_images") or images_per_epoch for h in history) / train_seconds, 1)
        if train_seconds else None,
        "device": str(device), "precision": precision, "world_size": env.world_size,
        "stop_reason": stop_reason,
    }


def summary_line(s: dict[str, Any]) -> str:
    reached = (f"{s['target']:g}% first at epoch {s['epoch_reached_target']} ({s['seconds_to_target']:.1f} s)"
               if s["epoch_reached_target"] else f"{s['target']:g}% not reached")
    ips = f", {s['images_per_second']:,.0f} images/s" if s.get("images_per_second") else ""
    tta = f", with TTA {s['final_acc_tta']:.2f}%" if "final_acc_tta" in s else ""
    ece = f", ECE {s['final_ece']:.2f}%" if "final_ece" in s else ""
    compiling = f" (+{s['compile_seconds']:.1f} s compiling)" if s.get("compile_seconds") else ""
    return (f"Done: best {s['best_acc']:.2f}% (epoch {s['best_epoch']}), final {s['final_acc']:.2f}%{tta}{ece}, "
            f"{reached}, {s['train_seconds']:.1f} s training{compiling}{ips}")


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> TrainConfig:
    """The config a run was started with, plus the execution options that may change on resume."""
    from ..config import apply_overrides, validate

    try:
        state = load_checkpoint(run_dir / "last.pt")
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from None
    missing = {"config", "epoch", "history", "optimizer_state"} - set(state)
    if missing or not isinstance(state["config"], dict):
        raise ConfigError(f"--resume: {run_dir / 'last.pt'} is not a resumable training checkpoint "
                          f"(missing {', '.join(sorted(missing)) or 'config'})")
    recorded = recorded_source(state)
    if recorded.is_user_code and "model" not in overrides:  # its file runs only when the user names it
        raise ConfigError(f"--resume: {user_code_refusal(run_dir / 'last.pt', recorded)}")
    saved = dict(state["config"])
    cfg = apply_overrides(TrainConfig(), saved, f"{run_dir / 'last.pt'}")
    allowed = {"quiet", "report", "device", "threads", "resume", "out", "data", "download", "allow_changed_source",
               "tensorboard"}
    # Compare merged configs, not raw options: `--aug X` names one field of the saved table.
    merged = apply_overrides(cfg, overrides, "command line")
    before, after = cfg.to_dict(), merged.to_dict()
    changed = {k for k in after if k not in allowed and after[k] != before[k]}
    if changed:
        raise ConfigError(f"--resume: cannot change {', '.join(sorted(changed))} of a started run")
    cfg = merged
    cfg.resume, cfg.out = True, str(run_dir)
    # The saved config already holds the recipe its precision chose; resumed on a machine where --precision
    # auto resolves otherwise, another table would change the batch or the schedule mid-run.
    cfg.by_precision = {}
    validate(cfg)
    return cfg
