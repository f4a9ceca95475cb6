"""Training configuration: one plain dataclass, named presets, and overrides.

Resolution order: dataclass defaults < preset < config file < command-line options.
The resolved config is written to every run folder as ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.augment import BORDER_MODES, POLICIES, AugmentConfig
from .data.augmix import MODES as AUGMIX_MODES
from .data.mixing import MODES as MIX_MODES


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option."""


@dataclass
class TrainConfig:
    preset: str = "fast"
    # The preset's overrides by the precision a run resolves to, e.g. {"fp32": {"low_res_fraction": 0.5}}:
    # applied once the device, and so --precision auto, is known (apply_precision_recipe); whatever the
    # config file or the command line sets is left out of them, so it wins. --set by_precision={} turns them off.
    by_precision: dict[str, Any] = field(default_factory=dict)
    # a registered name, a plugin's name, path/to/file.py:factory or package.module:factory
    model: str = "era9"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the model's factory
    dropout: float | None = None  # None: the model's own default
    # data
    data: str = field(default_factory=lambda: os.environ.get("CIFAR10_ROOT", "./data"))
    dataset: str = "cifar10"  # or "folder" (DIR/train/<class>/, DIR/test/<class>/) or "synthetic" (tests)
    image_size: int = 32  # folder datasets: images are decoded to image_size x image_size
    strict: bool = False  # folder datasets: refuse unreadable files instead of skipping them
    synthetic_size: int = 2000
    download: bool = True
    allow_modified: bool = False  # accept files whose md5 differs from the official ones
    allow_changed_source: bool = False  # resume although the network's source file changed
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    # an albumentations pipeline file (A.save, JSON or YAML) instead of the batched policy: applied per
    # image by aug_workers CPU processes, then normalized on the device (data/pipeline.py)
    aug_pipeline: str = ""
    aug_workers: int = 2
    # optimisation
    epochs: int = 10
    batch_size: int = 512
    drop_last: bool = True  # skip the last partial batch of an epoch (the reference kept it: 98 batches)
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    muon_lr: float = 0.0  # > 0: convolutions that batch norm follows step by Muon (orthogonalized) at this peak lr
    wd_on_norm_and_bias: bool = False
    norm_bias_lr_scale: float = 1.0  # airbench: batch-norm biases like a higher learning rate
    freeze_norm_scale: bool = False  # keep batch-norm scales at 1 (airbench)
    low_res: int = 0  # progressive resizing: train the first epochs at low_res x low_res (0 = off)
    low_res_fraction: float = 0.5  # share of the epochs trained at low_res
    # a second step of the resizing: the mid_res_epochs epochs after the low_res ones train at mid_res x mid_res
    # (0 = off; low_res=0 turns both off), an epoch cheaper than at full size
    mid_res: int = 0
    mid_res_epochs: int = 1
    whiten_stem: bool = False  # first conv = frozen whitening of training patches (airbench)
    freeze_stem_after: int = -1  # with whiten_stem: epochs before its batch norm freezes too (-1 never)
    # FreezeOut (Brock et al., 2017), opt-in: the network's first N feature blocks stop training for the
    # last late_freeze_epochs epochs, when the lr has annealed; backward stops at block N (no preset: it
    # cost the fast preset 0.25 points for 0.91x the training in fp32, benchmarks/README.md "Speed VI")
    late_freeze_blocks: int = 0
    late_freeze_epochs: int = 1
    # Online batch selection (Loshchilov & Hutter, 2015), per epoch: the last keep_hardest_epochs epochs
    # (never the first) train only on the keep_hardest share of the training images whose loss was highest
    # when last seen; each covers its share of the lr schedule in fewer steps. 1.0 = every image.
    keep_hardest: float = 1.0
    keep_hardest_epochs: int = 1
    schedule: str = "onecycle"  # onecycle | cosine | step | constant
    warmup_epochs: float = 0.0
    pct_start: float = 0.25  # one-cycle: share of the run spent rising
    final_lr_scale: float = 0.0  # lr at the end, as a fraction of the peak
    step_size: int = 25  # step schedule: epochs between decays
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # 0 = off
    grad_clip: float = 0.0  # 0 = off; max global gradient norm
    # execution
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    channels_last: bool = True
    compile: bool = False
    threads: int = 0  # 0 = torch's default
    seed: int = 0
    # run bookkeeping
    out: str = ""  # run folder; default runs/<preset>-<model>-<time>
    eval_every: int = 1  # evaluate every N epochs (and always after the last); 0 = only after the last
    target_acc: float = 0.0  # stop at the first epoch reaching it (0 = run all epochs)
    target_for_summary: float = 85.0  # 'epoch_reached_target' in the summary
    tta: bool = False  # also report the final accuracy with test-time augmentation
    tta_views: str = "flip+translate"  # flip (2 views) or flip+translate (6 views)
    lr_range_test: dict[str, Any] = field(default_factory=dict)  # what `--lr auto` found (lr_find.py)
    resume: bool = False
    tensorboard: bool = False  # event files in RUN/tensorboard (the tensorboard extra)
    quiet: bool = False
    report: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Each preset lists only what differs from the defaults; the comments say why.
PRESETS: dict[str, dict[str, Any]] = {
    # The reference run (ERA V1 session 9): batch 512 keeping the last partial batch (98 steps an
    # epoch), 75 epochs, and its albumentations pipeline as its notebook wrote it: flip +
    # shift-scale-rotate (0.05, 0.05, 15 degrees, reflect-101 border) + one 16x16 coarse-dropout
    # hole, each with p=0.5. Its optimizer (plain SGD at a constant 0.01, no weight decay) started
    # era9 far slower than its own network (32.8% vs 44.9% after one epoch, measured), so the
    # preset keeps Nesterov SGD with a cosine decay from 0.05, which follows its curve's start.
    "seed": dict(
        model="era9", epochs=75, batch_size=512, drop_last=False, aug=dict(policy="seed"), optimizer="sgd",
        lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine", label_smoothing=0.0,
    ),
    # The README's main job and the speed recipe (benchmarks/README.md has the measurements and
    # the ablation): fastnet (downsamples at once, residual blocks), a frozen whitening stem so
    # the first epochs count, the first third of the epochs at 20x20 (0.45x the compute), batch
    # 256 (the CPU's fastest, and twice the steps), one-cycle Nesterov SGD peaking at the lr the
    # range test finds (0.175; tinycifar lr-find), batch-norm biases at 4x the lr, label smoothing,
    # flip + translate, an evaluated EMA of the weights; six epochs, one test pass at the end (each
    # per-epoch pass cost 1.7 s) that also scores flip TTA from the same forward passes.
    # bf16 + channels_last. Where the CPU has no fast bf16 (--precision auto resolves to fp32: AVX2-only
    # CPUs such as AMD Zen 3 and most Intel laptops) a step costs about 3x more. There the full
    # convolutions' filters step by Muon (orthogonalized momentum, muon_lr 0.02; 0.012 and 0.03 were
    # worse), which learns enough more per step that five epochs do what six did: two at 20x20 (0.4x
    # a 32x32 one), three at 32x32, batch 128 (twice as many steps learn more per epoch), airbench's
    # free alternating flips; the stem's batch norm stops training after the 20x20 epochs, so that
    # backward never reaches the 32x32 maps (a step 0.90x); every epoch after the first trains on
    # the 55% of the images with the highest loss (keep_hardest), 0.55x its steps (50%: -0.4 points);
    # the other parameters' peak lr is 0.22. Without Muon six epochs on 65% were needed (Speed XI).
    # benchmarks/README.md, "Speed III" to "Speed XIII", has the runs, and the levers that lost the
    # promise or saved nothing (four epochs with Muon: -1.1 points; late_freeze_blocks=2: 0.91x the
    # training, -0.25 points; C1 frozen at 32x32: -0.76; a 24x24 fourth epoch: about -0.7; a 28x28
    # one, mid_res=28: 0.97x the wall clock, -0.28; fastnet without its 16x16 block, block16=False:
    # -1.2 points in six epochs, and seven took as long as fastnet's six approximating AVX2).
    "fast": dict(
        model="fastnet", epochs=6, batch_size=256, aug=dict(policy="fast", cutout_size=0),
        optimizer="sgd", lr=0.175, nesterov=True, weight_decay=5e-4, schedule="onecycle",
        pct_start=0.25, norm_bias_lr_scale=4.0, label_smoothing=0.1, whiten_stem=True, low_res=20,
        low_res_fraction=0.34, ema_decay=0.99, eval_every=0, tta=True, tta_views="flip",
        by_precision={"fp32": dict(epochs=5, batch_size=128, lr=0.22, muon_lr=0.02, low_res_fraction=0.4,
                                   freeze_stem_after=2, keep_hardest=0.55, keep_hardest_epochs=4,
                                   aug=dict(alternate_flip=True))},
    ),
    # Accuracy under 200k parameters in about 67 minutes of 2 CPU threads (issue 17): a
    # ResNet-style network with squeeze-and-excitation in its 8x8 blocks (slimres200k_se) and
    # four times fastnet's compute, 100 epochs at batch 256 (the CPU's fastest, and twice the
    # steps), the fast recipe's levers, the standard pad-4 crop, the first 30% of the epochs at
    # 24x24, one test pass at the end with TTA. 40 -> 100 epochs gave +0.9 points, SE +0.4
    # with TTA (docs/best.md, "Levers toward 93.5%").
    "best": dict(
        model="slimres200k_se", epochs=100, batch_size=256,
        aug=dict(policy="fast", translate_pad=4, cutout_size=8, alternate_flip=True),
        optimizer="sgd", lr=0.2, nesterov=True, weight_decay=5e-4, schedule="onecycle",
        pct_start=0.2, label_smoothing=0.1, whiten_stem=True, low_res=24, low_res_fraction=0.3,
        eval_every=0, tta=True,
    ),
}


def in_final_epochs(cfg: TrainConfig, epoch: int, last: int) -> bool:
    """Whether epoch (0-based) is among the run's ``last`` epochs; never the first, before which nothing
    has trained (so no block is frozen untrained and no loss is known to select by)."""
    return epoch >= max(1, cfg.epochs - last)


def train_resolution(cfg: TrainConfig, epoch: int) -> int | None:
    """The size epoch (0-based) trains at: low_res, then mid_res, then None (the images' own size).
    low_res=0 turns the resizing off, mid_res with it: the images' own size throughout."""
    if not cfg.low_res:
        return None
    low_epochs = int(cfg.low_res_fraction * cfg.epochs)
    if epoch < low_epochs:
        return cfg.low_res
    if cfg.mid_res and epoch < low_epochs + cfg.mid_res_epochs:
        return cfg.mid_res
    return None


def apply_overrides(cfg: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    """A copy of cfg with one layer of values on top; `source` names that layer in errors."""
    cfg = dataclasses.replace(cfg)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        if key == "aug":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: 'aug' must be a table of augmentation options")
            aug_fields = {f.name for f in dataclasses.fields(AugmentConfig)}
            unknown = set(value) - aug_fields
            if unknown:
                raise ConfigError(f"{source}: unknown augmentation option(s) {sorted(unknown)}")
            cfg.aug = dataclasses.replace(cfg.aug, **value)
        elif key == "by_precision":
            cfg.by_precision = value  # checked whole by validate: it names the precision and the option
        elif key == "model_kwargs":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: 'model_kwargs' must be a table of keyword arguments")
            cfg.model_kwargs = {**cfg.model_kwargs, **value}
        elif key in fields:
            setattr(cfg, key, value)
        else:
            raise ConfigError(f"{source}: unknown option {key!r}")
    return cfg


def without_keys_of(table: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """``table`` less the options ``explicit`` sets; nested tables (aug, model_kwargs) option by option."""
    kept: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and isinstance(explicit.get(key), dict):
            value = without_keys_of(value, explicit[key])
            if value:
                kept[key] = value
        elif key not in explicit:
            kept[key] = value
    return kept


def apply_precision_recipe(cfg: TrainConfig, precision: str) -> dict[str, Any]:
    """Layer the preset's overrides for ``precision`` (``by_precision``) onto ``cfg``, in place, and return
    them: the precision is known only once the device is, after the config was resolved and handed on,
    and config.json must record what the run used. Applying it twice (a resumed run) changes nothing."""
    table = cfg.by_precision.get(precision, {})
    if table:
        chosen = apply_overrides(cfg, table, f"by_precision.{precision}")
        for f in dataclasses.fields(cfg):
            setattr(cfg, f.name, getattr(chosen, f.name))
    return table


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from None
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({e})") from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """'lr=0.1' or 'aug.cutout_size=8' -> key and a JSON-ish value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def parse_assignments(texts: list[str]) -> dict[str, Any]:
    """Several --set values as one override dict; 'aug.X' and 'model_kwargs.X' keys go into their tables."""
    values: dict[str, Any] = {}
    for text in texts:
        key, value = parse_assignment(text)
        table, dot, name = key.partition(".")
        if dot and table in ("aug", "model_kwargs") and name:
            values.setdefault(table, {})[name] = value
        else:
            values[key] = value
    return values


def resolve_config(preset: str, file_values: dict[str, Any] | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: unknown; choose from {', '.join(PRESETS)}")
    cfg = apply_overrides(TrainConfig(preset=preset), PRESETS[preset], f"preset {preset}")
    if file_values:
        cfg = apply_overrides(cfg, file_values, "config file")
    if overrides:
        cfg = apply_overrides(cfg, overrides, "command line")
    explicit = {**(file_values or {}), **(overrides or {})}
    if explicit.get("optimizer", "sgd") != "sgd":  # the tables' Muon steps with our SGD: another optimizer drops it
        explicit.setdefault("muon_lr", 0.0)
    if isinstance(cfg.by_precision, dict):  # validate names a malformed table
        cfg.by_precision = {p: without_keys_of(t, explicit) if isinstance(t, dict) else t
                            for p, t in cfg.by_precision.items()}
    validate(cfg)
    return cfg


_KINDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
          "float | None": "a finite number or null", "dict[str, Any]": "a table of keyword arguments"}


def _has_kind(value: Any, kind: str) -> bool:
    if kind == "float | None":
        return value is None or _has_kind(value, "float")
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict[str, Any]":
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


# the config keys `tinycifar train` has a value flag of its own for (cli.py's; tests/test_cli.py keeps the
# two lists the same): an error names the flag the user can type, and any other key as --set and config
# files write it (momentum, muon_lr)
FLAGGED_KEYS = frozenset({
    "preset", "model", "data", "dataset", "image_size", "epochs", "batch_size", "lr", "optimizer", "schedule",
    "warmup_epochs", "weight_decay", "label_smoothing", "ema_decay", "grad_clip", "seed", "out", "device",
    "precision", "threads", "target_acc", "eval_every", "aug_pipeline", "aug_workers",
})


def option_name(key: str) -> str:
    """How an error names a config key: ``--batch-size`` for a key with its own flag, else ``momentum``."""
    return f"--{key.replace('_', '-')}" if key in FLAGGED_KEYS else key


def check_types(obj: Any, prefix: str = "") -> None:
    """Every value has its field's declared type: config files and --set let anything in."""
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), str(f.type)  # postponed annotations: the type is a string
        option = f"aug.{f.name}" if prefix else option_name(f.name)
        if kind == "AugmentConfig":
            check_types(value, "aug.")
        elif kind in _KINDS and not _has_kind(value, kind):
            raise ConfigError(f"{option}: expected {_KINDS[kind]}, got {value!r}")


def _validate_aug(aug: AugmentConfig) -> None:
    def need(ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"aug.{name}: expected {expected}, got {getattr(aug, name)!r}")

    for name in ("flip", "ssr_p", "dropout_p", "cutout_p"):
        need(0 <= getattr(aug, name) <= 1, name, "a probability in [0, 1]")
    for name in ("shift", "rotate"):
        need(getattr(aug, name) >= 0, name, "a non-negative number")
    need(0 <= aug.scale < 1, "scale", "a number in [0, 1)")
    for name in ("dropout_size", "cutout_size"):
        need(0 <= getattr(aug, name) <= 32, name, "a size in pixels, 0..32")
    need(0 <= aug.translate_pad <= 16, "translate_pad", "a padding in pixels, 0..16")
    need(aug.border in BORDER_MODES, "border", f"one of {', '.join(BORDER_MODES)}")
    need(aug.augmix in AUGMIX_MODES, "augmix", f"one of {', '.join(AUGMIX_MODES)}")
    need(1 <= aug.augmix_severity <= 10, "augmix_severity", "an integer in 1..10")
    need(1 <= aug.augmix_width <= 8, "augmix_width", "an integer in 1..8")
    need(0 <= aug.augmix_depth <= 5, "augmix_depth", "an integer in 0..5 (0 = 1..3 at random)")
    need(aug.jsd_weight >= 0, "jsd_weight", "a non-negative number")
    need(aug.mix in MIX_MODES, "mix", f"one of {', '.join(MIX_MODES)}")
    need(aug.mix_alpha > 0, "mix_alpha", "a positive number")
    need(0 <= aug.mix_p <= 1, "mix_p", "a probability in [0, 1]")
    need(aug.mix == "off" or aug.augmix != "jsd", "mix",
         "off with augmix=jsd (the consistency loss compares views of one labelled image)")


PRECISIONS = ("bf16", "fp16", "fp32")


def _validate_by_precision(cfg: TrainConfig) -> None:
    """Each precision's table is a valid layer on cfg; it may not pick the device or the precision."""
    for precision, table in cfg.by_precision.items():
        if precision not in PRECISIONS or not isinstance(table, dict):
            raise ConfigError(f"by_precision: expected tables of options under {', '.join(PRECISIONS)}, "
                              f"got {precision!r}: {table!r}")
        fixed = sorted({"precision", "device", "by_precision"} & set(table))
        if fixed:
            raise ConfigError(f"by_precision.{precision}: cannot set {', '.join(fixed)} (they choose the table)")
        try:
            validate(apply_overrides(cfg, {**table, "by_precision": {}}, f"by_precision.{precision}"))
        except ConfigError as e:
            named = str(e) if str(e).startswith("by_precision") else f"by_precision.{precision}: {e}"
            raise ConfigError(named) from None


def validate(cfg: TrainConfig) -> None:
    from .models import ModelError, check_spec

    def need(ok: bool, option: str, expected: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{option}: expected {expected}, got {value!r}")

    if not isinstance(cfg.aug, AugmentConfig):
        raise ConfigError(f"aug: expected a table of augmentation options, got {cfg.aug!r}")
    check_types(cfg)
    _validate_aug(cfg.aug)
    _validate_by_precision(cfg)
    need(cfg.dropout is None or 0 <= cfg.dropout < 1, "dropout", "a number in [0, 1) or null", cfg.dropout)
    need(0 <= cfg.seed < 2**32, "--seed", "an integer in 0..2**32-1", cfg.seed)
    need(cfg.step_gamma > 0, "step_gamma", "a positive number", cfg.step_gamma)
    need(0 <= cfg.target_for_summary <= 100, "target_for_summary", "a percentage in [0, 100]",
         cfg.target_for_summary)
    positive_ints = [("epochs", cfg.epochs), ("batch_size", cfg.batch_size), ("synthetic_size", cfg.synthetic_size)]
    for name, value in positive_ints:
        need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             option_name(name), "a positive integer", value)
    for name in ("lr", "momentum", "weight_decay", "label_smoothing", "ema_decay", "grad_clip",
                 "warmup_epochs", "target_acc", "norm_bias_lr_scale", "final_lr_scale"):
        value = getattr(cfg, name)
        need(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
             option_name(name), "a non-negative number", value)
    need(cfg.muon_lr >= 0, "muon_lr", "0 (off) or a positive learning rate", cfg.muon_lr)
    need(cfg.lr > 0, "--lr", "a positive number", cfg.lr)
    need(cfg.label_smoothing < 1, "--label-smoothing", "a number in [0, 1)", cfg.label_smoothing)
    need(cfg.ema_decay < 1, "--ema-decay", "a number in [0, 1)", cfg.ema_decay)
    need(cfg.target_acc <= 100, "--target-acc", "a percentage in [0, 100]", cfg.target_acc)
    need(0 < cfg.pct_start < 1, "pct_start", "a number in (0, 1)", cfg.pct_start)
    need(cfg.warmup_epochs < cfg.epochs or cfg.warmup_epochs == 0, "--warmup-epochs",
         f"fewer than --epochs ({cfg.epochs})", cfg.warmup_epochs)
    try:
        check_spec(cfg.model)  # the file is imported when the run builds the network, not here
    except ModelError as e:
        raise ConfigError(str(e)) from None
    need(cfg.optimizer in ("sgd", "adam", "adamw"), "--optimizer", "sgd, adam or adamw", cfg.optimizer)
    need(cfg.muon_lr == 0 or cfg.optimizer == "sgd", "muon_lr", f"0 with --optimizer {cfg.optimizer} (Muon's "
         "filters share the momentum of our SGD)", cfg.muon_lr)
    need(cfg.schedule in ("onecycle", "cosine", "step", "constant"), "--schedule",
         "onecycle, cosine, step or constant", cfg.schedule)
    need(cfg.precision in ("auto", "bf16", "fp16", "fp32"), "--precision", "auto, bf16, fp16 or fp32", cfg.precision)
    need(cfg.dataset in ("cifar10", "folder", "synthetic"), "--dataset", "cifar10, folder or synthetic", cfg.dataset)
    need(8 <= cfg.image_size <= 256, "--image-size", "a size in pixels, 8..256", cfg.image_size)
    need(cfg.aug.policy in POLICIES, "--aug", f"one of {', '.join(POLICIES)}", cfg.aug.policy)
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None, "--device",
         "auto, cpu, cuda or cuda:N", cfg.device)
    need(isinstance(cfg.threads, int) and cfg.threads >= 0, "--threads", "a non-negative integer", cfg.threads)
    need(cfg.step_size > 0, "step_size", "a positive integer", cfg.step_size)
    need(not (cfg.aug_pipeline and cfg.aug.augmix != "off"), "--augmix",
         "off with --aug-pipeline (AugMix runs after the batched policies on the device)", cfg.aug.augmix)
    need(not (cfg.aug_pipeline and cfg.aug.mix != "off"), "aug.mix",
         "off with --aug-pipeline (batch mixing runs on the device loader's batches)", cfg.aug.mix)
    need(cfg.aug_workers >= 0, "--aug-workers", "a non-negative number of worker processes", cfg.aug_workers)
    need(cfg.tta_views in ("flip", "flip+translate"), "tta_views", "flip or flip+translate", cfg.tta_views)
    need(cfg.eval_every >= 0, "--eval-every", "a non-negative integer (0 = only after the last epoch)",
         cfg.eval_every)
    need(cfg.low_res == 0 or 8 <= cfg.low_res <= 32, "low_res", "0 (off) or a size in 8..32", cfg.low_res)
    need(0 <= cfg.low_res_fraction <= 1, "low_res_fraction", "a number in [0, 1]", cfg.low_res_fraction)
    need(cfg.mid_res == 0 or 8 <= cfg.mid_res <= 32, "mid_res", "0 (off) or a size in 8..32", cfg.mid_res)
    need(cfg.mid_res_epochs >= 1, "mid_res_epochs", "a positive number of epochs", cfg.mid_res_epochs)
    need(cfg.freeze_stem_after >= -1, "freeze_stem_after", "-1 (never), 0 (from the start) or a number of epochs",
         cfg.freeze_stem_after)
    need(cfg.late_freeze_blocks >= 0, "late_freeze_blocks", "0 (off) or a number of leading feature blocks",
         cfg.late_freeze_blocks)
    need(cfg.late_freeze_epochs >= 1, "late_freeze_epochs", "a positive number of final epochs", cfg.late_freeze_epochs)
    need(0 < cfg.keep_hardest <= 1, "keep_hardest", "a share of the training images in (0, 1] (1 = all)",
         cfg.keep_hardest)
    need(cfg.keep_hardest_epochs >= 1, "keep_hardest_epochs", "a positive number of final epochs",
         cfg.keep_hardest_epochs)
