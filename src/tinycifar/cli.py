"""The ``tinycifar`` command line: train, lr-find, sweep, check, eval, models, summary, download, report,
compare, predict, export, serve.

Bad input (an option, a file, a dataset) ends with one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import CheckpointError
from .config import PRESETS, ConfigError, load_config_file, parse_assignments, resolve_config, without_keys_of
from .data import DatasetError, classes_of
from .data.augmix import MODES as AUGMIX_MODES
from .data.mixing import MODES as MIX_MODES
from .models import ModelError
from .models.rules import RulesError

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 1


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes end like every other bad input: one line on stderr, exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def learning_rate(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """Options that map one-to-one onto TrainConfig fields; unset ones keep the preset's value."""
    p.add_argument("--preset", default="fast", help=f"one of {', '.join(PRESETS)} (default: fast)")
    p.add_argument("--config", metavar="FILE", help="TOML or JSON file of config values")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. --set momentum=0.85 --set aug.cutout_size=12")
    fields: list[tuple[str, type, str]] = [
        ("--model", str, "a registered network (see `tinycifar models`), a plugin's name, path/to/file.py:factory "
                         "or package.module:factory"),
        ("--data", str, "CIFAR-10 folder (default: $CIFAR10_ROOT or ./data)"),
        ("--dataset", str, "cifar10, folder (--data DIR with train/<class>/ and test/<class>/) or synthetic"),
        ("--image-size", int, "folder datasets: decode images to this size (default 32)"),
        ("--epochs", int, "training epochs"),
        ("--batch-size", int, "global batch size (split across processes)"),
        ("--lr", learning_rate, "peak learning rate, or auto: the range test's suggestion (see lr-find)"),
        ("--optimizer", str, "sgd, adam or adamw"),
        ("--schedule", str, "onecycle, cosine, step or constant"),
        ("--warmup-epochs", float, "linear warm-up length"),
        ("--weight-decay", float, "weight decay"),
        ("--label-smoothing", float, "label smoothing"),
        ("--ema-decay", float, "EMA of weights (0 = off)"),
        ("--grad-clip", float, "max gradient norm (0 = off)"),
        ("--seed", int, "random seed"),
        ("--out", str, "run folder (default: runs/<preset>-<model>-<time>)"),
        ("--device", str, "auto, cpu, cuda or cuda:N"),
        ("--precision", str, "auto, bf16, fp16 or fp32"),
        ("--threads", int, "CPU threads (0 = torch's default)"),
        ("--target-acc", float, "stop at the first epoch reaching this test accuracy (percent)"),
        ("--eval-every", int, "test every N epochs and after the last (0 = only after the last)"),
        ("--aug-pipeline", str, "albumentations pipeline file (A.save, JSON or YAML) used instead of --aug, "
                                "per image in CPU workers"),
        ("--aug-workers", int, "worker processes for --aug-pipeline (0 = in the training process)"),
    ]
    for flag, kind, text in fields:
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--aug", dest="aug_policy", default=None, help="augmentation policy: seed, fast or none")
    p.add_argument("--augmix", dest="augmix_mode", default=None, choices=AUGMIX_MODES,
                   help="AugMix after the policy, for robustness to corruptions: mix (one AugMix view per image) "
                        "or jsd (two views and the Jensen-Shannon consistency loss; 3x the images a step)")
    p.add_argument("--mix", dest="mix_mode", default=None, choices=MIX_MODES,
                   help="blend each batch with a shuffled copy of itself, targets included: mixup (pixels) or "
                        "cutmix (a pasted box); aug.mix_alpha and aug.mix_p tune it")
    flags = [("--resume", "resume", True, "continue the run in --out from its last.pt"),
             ("--quiet", "quiet", True, "no progress output"),
             ("--report", "report", True, "write the HTML report at the end"),
             ("--tensorboard", "tensorboard", True, "write TensorBoard event files into RUN/tensorboard"),
             ("--tta", "tta", True, "also report final accuracy with test-time augmentation"),
             ("--compile", "compile", True, "torch.compile the model"),
             ("--no-channels-last", "channels_last", False, "keep NCHW memory format"),
             ("--allow-modified", "allow_modified", True, "accept data files whose md5 is not the official one"),
             ("--strict", "strict", True, "folder datasets: refuse unreadable files instead of skipping them"),
             ("--allow-changed-source", "allow_changed_source", True,
              "--resume although the network's source file changed"),
             ("--no-download", "download", False, "never download CIFAR-10")]
    for flag, dest, value, text in flags:
        p.add_argument(flag, dest=dest, action="store_const", const=value, default=None, help=text)
    _add_model_arg(p)


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for the network's factory, e.g. --model-arg width=48 "
                        "(same as --set model_kwargs.width=48)")


def _add_checkpoint_model_options(p: argparse.ArgumentParser) -> None:
    """For commands that load a checkpoint: name the network's code when it is the user's own."""
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="the network's code, for a checkpoint of your own network (e.g. my_net.py:Net)")
    p.add_argument("--allow-changed-source", action="store_true",
                   help="load although the network's source file changed since training")


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return parse_assignments([f"model_kwargs.{text}" for text in args.model_arg]).get("model_kwargs", {})


_NOT_CONFIG = {"command", "preset", "config", "set", "aug_policy", "augmix_mode", "mix_mode", "func", "model_arg",
               "start_lr", "end_lr", "steps"}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG and v is not None}
    values.update(parse_assignments(args.set))
    if args.aug_policy is not None:
        values.setdefault("aug", {})["policy"] = args.aug_policy
    if args.augmix_mode is not None:
        values.setdefault("aug", {})["augmix"] = args.augmix_mode
    if args.mix_mode is not None:
        values.setdefault("aug", {})["mix"] = args.mix_mode
    if args.model_arg:
        values["model_kwargs"] = {**values.get("model_kwargs", {}), **_model_kwargs(args)}
    return values


def cmd_train(args: argparse.Namespace) -> int:
    from .training.train import resume_config, train

    overrides = _overrides(args)
    auto_lr = overrides.get("lr") == "auto"
    if auto_lr and args.resume:
        raise ConfigError("--lr auto: a resumed run keeps the learning rate it started with")
    if args.resume:
        if not args.out:
            raise ConfigError("--resume: needs --out RUN_DIR, the run to continue")
        cfg = resume_config(Path(args.out), overrides)
    else:
        file_values = load_config_file(args.config) if args.config else None
        cfg = resolve_config(args.preset, file_values, {k: v for k, v in overrides.items() if k != "lr" or not auto_lr})
    if auto_lr:
        cfg = _with_range_test_lr(cfg)
    result = train(cfg)
    if cfg.report and result.is_main:
        from .reports.report import write_report

        page = write_report(result.run_dir, model=cfg.model, allow_changed_source=cfg.allow_changed_source)
        if not cfg.quiet:
            print(f"report: {page}")
    return 0


def _with_range_test_lr(cfg):
    """``train --lr auto``: the recipe with the range test's suggested peak lr, the test recorded."""
    import os

    from .training.lr_find import lr_find

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--lr auto: not under torchrun; run `tinycifar lr-find` once and pass its --lr")
    result = lr_find(cfg)
    if not cfg.quiet:
        print(f"tinycifar: learning-rate range test: peak lr {result.suggestion:.4g} ({result.rule}), "
              f"instead of the preset's {cfg.lr:g}")
    cfg.lr_range_test = {**result.summary(), "preset_lr": cfg.lr}  # the recipe's lr for this precision
    cfg.lr = result.suggestion
    # the suggestion is set as --lr would be: no precision table may put the recipe's lr back
    cfg.by_precision = {p: without_keys_of(t, {"lr": cfg.lr}) for p, t in cfg.by_precision.items()}
    return cfg


def cmd_lr_find(args: argparse.Namespace) -> int:
    from .training.lr_find import check_range, default_out, lr_find, write

    check_range(args.start_lr, args.end_lr, args.steps)
    overrides = _overrides(args)
    if overrides.get("lr") == "auto":
        raise ConfigError("--lr auto: lr-find is what finds it; give a number to mark on the plot, or none")
    file_values = load_config_file(args.config) if args.config else None
    cfg = resolve_config(args.preset, file_values, overrides)
    result = lr_find(cfg, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps)
    out = Path(args.out) if args.out else default_out(cfg)
    try:
        csv_path, png_path = write(result, out, preset_lr=cfg.lr)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write ({e.strerror or e})") from None
    ended = "the loss diverged" if result.diverged else "the last step"
    print(f"{len(result.lrs)} steps from {args.start_lr:g} to {result.lrs[-1]:.3g} ({ended})")
    print(f"suggested peak lr: {result.suggestion:.4g} ({result.rule}); the {cfg.preset} preset uses {cfg.lr:g}")
    print(f"plot: {png_path}\ncsv: {csv_path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .data.loader import DeviceLoader
    from .evaluate import eval_batch_size, evaluate
    from .serving.inference import run_split
    from .training.train import resolve_device, resolve_precision

    state = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(state, args.checkpoint, args.model, args.allow_changed_source)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    config = {**state.get("config", {}), **({"allow_modified": True} if args.allow_modified else {})}
    test = run_split(config, train=False, data=args.data)  # synthetic runs regenerate their test set
    model = model.to(device, memory_format=torch.channels_last)  # 1.4x faster on these CPUs, measured
    args.batch_size = args.batch_size or eval_batch_size(device)
    if args.corruptions:
        return eval_corruptions(args, state, model, test, device, precision)
    loader = DeviceLoader(test, args.batch_size, state["mean"], state["std"], device, train=False, channels_last=True)
    result = evaluate(model, loader, precision, tta=args.tta)
    classes = classes_of(state)

    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "model": state["model"], "tta": args.tta,
                          "precision": precision, "accuracy": result.accuracy, "loss": result.loss,
                          "correct": result.correct, "total": result.total, "ece": result.ece,
                          "overconfidence": result.overconfidence,
                          "per_class": dict(zip(classes, result.per_class, strict=True)),
                          "confusion": result.confusion.tolist()}, indent=2))
        return 0
    print(result.line())
    lean = "over-confident" if result.overconfidence > 0 else "under-confident"
    print(f"Expected calibration error (15 bins): {result.ece:.2f}%; mean confidence minus accuracy "
          f"{result.overconfidence:+.2f} points ({lean})")
    print("\nper-class accuracy:")
    for name, acc in zip(classes, result.per_class, strict=True):
        print(f"  {name:<11}{acc:6.2f}%")
    print("\nconfusion matrix (rows: true class, columns: predicted):")
    print("            " + "".join(f"{c[:5]:>6}" for c in classes))
    for name, row in zip(classes, result.confusion.tolist(), strict=True):
        print(f"  {name:<10}" + "".join(f"{v:>6}" for v in row))
    return 0


def eval_corruptions(args: argparse.Namespace, state: dict, model, test, device, precision: str) -> int:
    """``eval --corruptions``: the table (or JSON), and corruptions.json/.png beside the checkpoint."""
    from .data.corruptions import parse_corruptions, parse_severities
    from .reports.robustness import evaluate_corruptions, save_report

    try:
        names, severities = parse_corruptions(args.corruptions), parse_severities(args.severities)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if tuple(test.images.shape[-2:]) != (32, 32):
        raise ConfigError(f"--corruptions: CIFAR-10-C's parameters are for 32x32 images; this run's are "
                          f"{test.images.shape[-1]}x{test.images.shape[-2]}")

    def progress(name: str, severity: int, accuracy: float) -> None:
        if not args.json:
            print(f"  {name} severity {severity}: {accuracy:.2f}%", file=sys.stderr, flush=True)

    report = evaluate_corruptions(model, test, state["mean"], state["std"], names, severities, device, precision,
                                  args.corruption_seed, args.batch_size, progress)
    written = save_report(report, args.checkpoint.parent, f"{state['model']}: ")
    print(json.dumps({"checkpoint": str(args.checkpoint), "model": state["model"], **report.to_dict()}, indent=2)
          if args.json else f"{report.table()}\nwrote {written[0]} and {written[1]}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import MODEL_REGISTRY, count_params, create_model, plugins
    from .models.summary import receptive_field

    rows = []
    for name in [*sorted(MODEL_REGISTRY), *sorted(set(plugins()) - set(MODEL_REGISTRY))]:
        row = {"model": name, "source": "built in" if name in MODEL_REGISTRY else f"plugin {plugins()[name].value}"}
        try:
            m = create_model(name)
            factory = MODEL_REGISTRY.get(name) or plugins()[name].load()
            row |= {"params": count_params(m), "receptive_field": receptive_field(m),
                    "description": ((factory.__doc__ or "").strip().splitlines() or [""])[0]}
        except ModelError as e:  # a broken plugin is listed with its reason, the others still are
            row |= {"params": None, "receptive_field": None, "description": f"cannot be built: {e}"}
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<14}{'params':>10}{'RF':>6}  description")
    for r in rows:
        params = f"{r['params']:,}" if r["params"] is not None else "-"
        rf = r["receptive_field"] if r["receptive_field"] is not None else "-"
        plugin = f" [{r['source']}]" if r["source"] != "built in" else ""
        print(f"{r['model']:<14}{params:>10}{rf:>6}  {r['description']}{plugin}")
    print("\nYour own network: --model path/to/file.py:factory or package.module:factory (any command).")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from .models import build_model
    from .models.summary import format_summary, model_summary

    model, _ = build_model(args.model, _model_kwargs(args))
    s = model_summary(model, name=args.model)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .models.rules import check

    report = check(args.model, args.rules, _model_kwargs(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.passed else 1


def cmd_aug_export(args: argparse.Namespace) -> int:
    from .data.cifar10 import CIFAR10_MEAN
    from .data.pipeline import PipelineError, policy_pipeline, save_pipeline

    cfg = resolve_config(args.preset, overrides=_aug_overrides(args))
    mean = [round(255 * m, 1) for m in CIFAR10_MEAN]
    try:
        save_pipeline(policy_pipeline(cfg.aug, tuple(mean)), args.out)
    except PipelineError as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
    print(f"{cfg.aug.policy} policy of the {cfg.preset} preset -> {args.out} (albumentations pipeline; holes and "
          f"borders filled with the CIFAR-10 mean {mean})")
    return 0


def _aug_overrides(args: argparse.Namespace) -> dict:
    values = parse_assignments(args.set)
    if args.policy:
        values.setdefault("aug", {})["policy"] = args.policy
    return values


def cmd_download(args: argparse.Namespace) -> int:
    from .data.cifar10 import ARCHIVE_MD5, download_cifar10, find_layout

    root = Path(args.data)
    try:
        print(f"CIFAR-10 already present in {root} ({find_layout(root)} layout)")
        return 0
    except DatasetError:
        pass
    path = download_cifar10(root, url=args.url, md5=None if args.no_md5 else ARCHIVE_MD5)
    print(f"CIFAR-10 ready in {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .reports.report import write_report

    try:
        page = write_report(args.run_dir, data=args.data, model=args.model,
                            allow_changed_source=args.allow_changed_source, cam_layer=args.cam_layer)
    except OSError as e:
        raise ConfigError(f"{args.run_dir}: cannot write the report ({e.strerror or e})") from None
    print(f"report: {page}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .serving.predict import run

    return run(args.checkpoint, args.inputs, top_k=args.top_k, as_json=args.json, model=args.model,
               allow_changed_source=args.allow_changed_source)


def cmd_export(args: argparse.Namespace) -> int:
    from .serving.export import export_checkpoint

    fmt = "onnx-int8" if args.int8 else args.format
    if args.int8 and args.format != "onnx":
        raise ConfigError(f"--int8: applies to --format onnx, not {args.format}")
    try:
        out = export_checkpoint(args.checkpoint, args.out, fmt, data=args.data, calibration_count=args.calibration,
                                model=args.model, allow_changed_source=args.allow_changed_source)
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
    print(f"exported {fmt} to {out} (input: float RGB 0..1, NCHW, any batch size; output: logits)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .reports.compare import format_table, read_runs, write_comparison

    def skip(message: str) -> None:
        print(f"tinycifar compare: {message}; skipped", file=sys.stderr)

    runs = read_runs(args.run_dirs, on_skip=skip)
    if not runs:
        raise ConfigError("none of the folders holds a run (config.json or metrics.csv)")
    try:
        page = write_comparison(runs, args.out)
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
    if args.json:
        print(json.dumps([r.row() for r in runs], indent=2))
    else:
        print(format_table(runs))
        print(f"curves and table: {page}")
    return 0


def _from_extra(extra: str, module: str):
    """A module of an optional extra; a missing package is one line saying what to install."""
    import importlib

    try:
        return importlib.import_module(module, __package__)
    except ImportError as e:
        raise ConfigError(f"{extra} needs the {extra} extra ({e.name} is missing): "
                          f"pip install 'tinycifar[{extra}]'") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    sweep = _from_extra("sweep", ".training.sweep")
    spec = sweep.load_sweep(args.file)
    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials {args.trials}: expected a positive integer")
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{spec.name}"
    extra = parse_assignments(args.set)
    if args.data:
        extra["data"] = args.data
    study = sweep.run_sweep(spec, out, args.storage, args.trials, extra)
    page = sweep.write_results(study, spec, out)
    rows = sweep.results_rows(study, spec)
    print(page.read_text())
    print(f"{len(rows)} trials in {out} (plots: {out / 'results.png'})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    serve = _from_extra("serve", ".serving.server").serve
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: expected 1..65535")
    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb {args.max_upload_mb}: expected a positive number")
    serve(args.checkpoint, args.model, host=args.host, port=args.port, engine=args.engine, int8=args.int8,
          data=args.data, allow_changed_source=args.allow_changed_source, max_upload_mb=args.max_upload_mb,
          max_batch=args.max_batch, threads=args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    import os

    from .data.cifar10 import URL
    from .evaluate import TTA_MODES

    parser = OneLineErrorParser(prog="tinycifar", description="Fast compact CIFAR-10 networks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="the installed release (what a bug report needs)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a network")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("lr-find", help="learning-rate range test: loss against an exponentially growing lr")
    _add_train_options(p)
    p.add_argument("--start-lr", type=float, default=1e-5, help="first learning rate (default: 1e-5)")
    p.add_argument("--end-lr", type=float, default=10.0, help="last learning rate (default: 10)")
    p.add_argument("--steps", type=int, default=100, help="training steps (default: 100)")
    p.set_defaults(func=cmd_lr_find, out=None)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the test set")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", default=None,
                   help="CIFAR-10 folder (default: the run's own, else $CIFAR10_ROOT or ./data; "
                        "synthetic runs need none)")
    p.add_argument("--tta", choices=TTA_MODES, default="none")
    p.add_argument("--corruptions", default=None, metavar="all|FAMILY|NAME,...",
                   help="accuracy under CIFAR-10-C corruptions (all; noise, blur, weather, digital; or names)")
    p.add_argument("--severities", default="1-5", help="with --corruptions: e.g. 1-5, 3 or 1,3,5 (default 1-5)")
    p.add_argument("--corruption-seed", type=int, default=0, help="with --corruptions: the corruptions' seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="test images a pass takes (default: 250 on a CPU, where they stay in cache; 1000 on a GPU)")
    p.add_argument("--allow-modified", action="store_true")
    p.add_argument("--json", action="store_true")
    _add_checkpoint_model_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("check", help="check a network against the assignment's rules (or your own)")
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="a registered network, a plugin's name, path/to/file.py:factory or package.module:factory")
    _add_model_arg(p)
    p.add_argument("--rules", default=None, metavar="FILE",
                   help="rules as TOML (default: the assignment's, tinycifar/models/assignment.toml)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("models", help="list the registered networks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="per-layer table of a network")
    p.add_argument("--model", default="era9", metavar="SPEC",
                   help="a registered network, a plugin's name, path/to/file.py:factory or package.module:factory")
    _add_model_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("aug", help="augmentation tools").add_subparsers(dest="aug_command", required=True,
                                                                          parser_class=OneLineErrorParser)
    p = p.add_parser("export", help="write a policy as an albumentations pipeline file (JSON, or YAML by suffix)")
    p.add_argument("--policy", default=None, help="seed or fast (default: the preset's)")
    p.add_argument("--preset", default="seed", help="preset whose augmentation options are used (default: seed)")
    p.add_argument("--set", action="append", default=[], metavar="aug.KEY=VALUE", help="override an aug option")
    p.add_argument("--out", required=True, help="file to write, e.g. seed.yaml")
    p.set_defaults(func=cmd_aug_export)

    p = sub.add_parser("download", help="download CIFAR-10 if it is not there")
    p.add_argument("--data", default=os.environ.get("CIFAR10_ROOT", "./data"))
    p.add_argument("--url", default=URL, help="archive URL (a mirror may be given)")
    p.add_argument("--no-md5", action="store_true", help="skip the archive checksum (mirrors of modified copies)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("report", help="write figures and a self-contained HTML report of a run")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--data", default=None,
                   help="CIFAR-10 folder (default: the run's own, else $CIFAR10_ROOT; synthetic runs need none)")
    p.add_argument("--cam-layer", default=None, metavar="NAME",
                   help="module for Grad-CAM (default: the last convolution whose map is at least 8x8)")
    _add_checkpoint_model_options(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="classify image files or folders of images")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--top-k", type=int, default=None, help="classes shown per image (default: 3, or fewer classes)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of one line per image")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    _add_checkpoint_model_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a checkpoint to ONNX (fp32 or int8) or TorchScript")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--format", choices=("onnx", "onnx-int8", "torchscript"), default="onnx")
    p.add_argument("--int8", action="store_true", help="same as --format onnx-int8")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", default=None,
                   help="CIFAR-10 folder for int8 calibration (default: the run's own, else $CIFAR10_ROOT)")
    p.add_argument("--calibration", type=positive_int, default=512, help="int8 calibration images (default: 512)")
    _add_checkpoint_model_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="runs side by side: one table and overlaid curves")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=Path("runs/compare"),
                   help="folder for curves.png and compare.html (default: runs/compare)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="hyperparameter search over config values (Optuna), from a TOML file")
    p.add_argument("file", type=Path, metavar="SWEEP.toml")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/sweep-<file name>)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by workers, e.g. postgresql://user@host/db "
                        "(default: SQLite in the sweep folder)")
    p.add_argument("--trials", type=int, default=None, help="finished trials to reach (default: the file's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config value for every trial, over the file's")
    p.add_argument("--data", default=None, help="CIFAR-10 folder (default: $CIFAR10_ROOT or ./data)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("serve", help="a web page and a JSON API for trained networks")
    p.add_argument("--checkpoint", required=True, action="append", type=Path,
                   help="a checkpoint to serve; repeat it to offer several (the page switches between them)")
    p.add_argument("--model", action="append", default=[], metavar="SPEC",
                   help="the network file of a checkpoint of your own network (repeatable; matched by content)")
    p.add_argument("--allow-changed-source", action="store_true",
                   help="serve although a network's source file changed since training")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--engine", choices=("pytorch", "onnxruntime"), default="pytorch")
    p.add_argument("--int8", action="store_true", help="with --engine onnxruntime: the int8 model of `export --int8`")
    p.add_argument("--data", default=None, help="CIFAR-10 folder for the gallery and int8 calibration "
                                                "(default: the run's own, else $CIFAR10_ROOT)")
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="largest request body (default: 8 MB)")
    p.add_argument("--max-batch", type=positive_int, default=256, help="images per micro-batch (default: 256)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.set_defaults(func=cmd_serve)
    return parser


def out_of_memory_line(args: argparse.Namespace, error: Exception) -> str:
    """What ran out and what to change: the batch (train, lr-find and eval have --batch-size)."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
    batch = getattr(args, "batch_size", None)
    now = f" (now {batch})" if batch else ""
    hint = f"lower --batch-size{now}" if hasattr(args, "batch_size") else "use fewer or smaller inputs"
    what = ". ".join(detail.split(". ")[:2]).rstrip(".")  # torch's "CUDA out of memory. Tried to allocate 2 GiB"
    return f"out of memory on the device ({what}); {hint}"


def main(argv: list[str] | None = None) -> int:
    import torch

    from .training.train import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetError, CheckpointError, ModelError, RulesError) as e:
        print(f"tinycifar {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingError as e:  # the run started but cannot go on (non-finite loss, disk full)
        print(f"tinycifar {args.command}: error: {e}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    except torch.OutOfMemoryError as e:  # checkpoints already written are whole (atomic writes)
        print(f"tinycifar {args.command}: error: {out_of_memory_line(args, e)}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    except KeyboardInterrupt:
        print(f"tinycifar {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`tinycifar eval | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 141


if __name__ == "__main__":
    sys.exit(main())
