"""Inference speed on the CPU, and what int8 quantization costs in accuracy.

Images per second at each batch size for four engines running the same checkpoint:
PyTorch eager fp32, PyTorch eager under bf16 autocast (both with the batch norms folded, as
``predict`` and ``serve`` run them since Speed XV; earlier results ran them unfolded, at about 0.93x
the images/s at batch 256), ONNX Runtime fp32 and ONNX Runtime int8 (static QDQ,
per-channel 7-bit weights; see tinycifar.serving.export). bf16 is skipped
on a CPU without AVX512-BF16 or AMX, where autocast only emulates it (82 images/s on a Zen 3
against 2,175 in fp32): a figure about the emulation, not the network. Inputs are float RGB 0..1 with the
normalization inside every model, as ``tinycifar predict`` and the exported files use them.
Each cell is the median of ``--repeats`` timed windows of at least ``--seconds``, so a
neighbour's burst of CPU use counts less; the load average at the start is recorded too.

With ``--accuracy`` the three fp32/int8 engines (and bf16) also classify the whole test set
and the report gives the int8 drop against fp32 and how often the two disagree.

    python benchmarks/inference.py --checkpoint runs/seed-ref/best.pt --accuracy
    python benchmarks/inference.py --models all        # every registered network, speed only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, machine_info, markdown_table  # noqa: E402

from tinycifar.models import MODEL_REGISTRY, create_model  # noqa: E402
from tinycifar.serving.export import activation_type, calibration_images, export_onnx, quantize_int8  # noqa: E402
from tinycifar.serving.inference import (  # noqa: E402
    NormalizedNet,
    folded,
    load_inference_model,
    run_split,
    to_unit_float,
)
from tinycifar.training.train import cpu_supports_bf16  # noqa: E402

Runner = Callable[[np.ndarray], np.ndarray]  # float32 NCHW 0..1 -> logits


def torch_runner(model: torch.nn.Module, bf16: bool) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return model(torch.from_numpy(x)).float().numpy()

    return run


def ort_runner(path: Path, threads: int) -> Runner:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def images_per_second(run: Runner, batch: int, seconds: float, repeats: int) -> float:
    """Median of ``repeats`` windows, each at least ``seconds`` long and at least 3 calls."""
    x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
    for _ in range(3):  # warm-up: allocations, kernel selection, lazy initialisation
        run(x)
    rates = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - start < seconds:
            run(x)
            calls += 1
        rates.append(calls * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def predictions(run: Runner, images: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Predicted class of every image (uint8 NCHW)."""
    preds = [run(to_unit_float(images[i : i + batch]).numpy()).argmax(1) for i in range(0, len(images), batch)]
    return np.concatenate(preds)


def pytorch_runners(model: torch.nn.Module) -> dict[str, Runner]:
    """PyTorch fp32, and bf16 autocast only where the CPU computes bf16 natively (see the docstring),
    each batch norm folded into its convolution as ``predict`` and ``serve`` run the network."""
    model = folded(model)
    runners = {"pytorch-fp32": torch_runner(model, bf16=False)}
    if cpu_supports_bf16():
        runners["pytorch-bf16"] = torch_runner(model, bf16=True)
    return runners


def engines(model: torch.nn.Module, calibration: np.ndarray, tmp: Path, threads: int,
            activations: str = "auto") -> dict[str, Runner]:
    """The engines on one network: PyTorch fp32 (and bf16), and its ONNX export in fp32 and int8."""
    fp32_path, int8_path = tmp / f"{id(model)}-fp32.onnx", tmp / f"{id(model)}-int8.onnx"
    export_onnx(model, fp32_path)
    quantize_int8(fp32_path, int8_path, calibration, activations=activations)
    return pytorch_runners(model) | {"ort-fp32": ort_runner(fp32_path, threads),
                                     "ort-int8": ort_runner(int8_path, threads)}


def speed_rows(label: str, runners: dict[str, Runner], args) -> list[dict]:
    rows = []
    for name, run in runners.items():
        row = {"network": label, "engine": name}
        for b in args.batch_sizes:
            row[f"batch {b} (images/s)"] = round(images_per_second(run, b, args.seconds, args.repeats), 1)
            print(f"{label} {name} batch {b}: {row[f'batch {b} (images/s)']:,.1f} images/s", flush=True)
        rows.append(row)
    fp32, int8 = (next(row for row in rows if row["engine"] == name) for name in ("ort-fp32", "ort-int8"))
    for b in args.batch_sizes:  # the question the int8 engine must answer: is it ever a slowdown?
        key = f"batch {b} (images/s)"
        int8[f"int8 / ort-fp32 at batch {b}"] = round(int8[key] / fp32[key], 2)
    return rows


def accuracy_rows(runners: dict[str, Runner], images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    preds = {name: predictions(run, images) for name, run in runners.items()}
    truth, reference = labels.numpy(), preds["pytorch-fp32"]
    base = 100 * float((reference == truth).mean())
    rows = []
    for name, p in preds.items():
        acc, differ = 100 * float((p == truth).mean()), 100 * float((p != reference).mean())
        rows.append({"engine": name, "test accuracy (%)": round(acc, 2),
                     "change vs pytorch-fp32 (points)": round(acc - base, 2),
                     "predictions differing from pytorch-fp32 (%)": round(differ, 2)})
        print(f"{name}: {acc:.2f}% on {len(truth):,} test images", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a trained checkpoint: speed, and accuracy with --accuracy")
    source.add_argument("--models", nargs="+", metavar="NAME",
                        help="registered networks with random weights, speed only ('all' for every one)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 256])
    ap.add_argument("--seconds", type=float, default=3.0, help="length of one timed window")
    ap.add_argument("--repeats", type=int, default=3, help="timed windows per cell; the median counts")
    ap.add_argument("--threads", type=int, default=0, help="threads for PyTorch and ONNX Runtime (0: torch's default)")
    ap.add_argument("--accuracy", action="store_true", help="also measure test accuracy, fp32 against int8")
    ap.add_argument("--limit", type=int, default=0, help="test images for --accuracy (0: all)")
    ap.add_argument("--data", default=None, help="CIFAR-10 folder (default: the run's own, else $CIFAR10_ROOT)")
    ap.add_argument("--calibration", type=int, default=512, help="int8 calibration images")
    ap.add_argument("--int8-activations", choices=("auto", "uint8", "int8"), default="auto",
                    help="int8 model's activation type (auto: uint8 on x86-64, as `tinycifar export --int8`)")
    ap.add_argument("--model", default=None, help="the network's code, for a checkpoint of your own network")
    ap.add_argument("--out", default="benchmarks/inference", help="writes OUT.md and OUT.json")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    speed, acc_rows, what = [], [], ""
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            model, state = load_inference_model(args.checkpoint, args.model)
            what = f"Checkpoint: `{args.checkpoint}` ({state['model']}, epoch {state.get('epoch')})"
            runners = engines(model, calibration_images(state["config"], args.calibration, args.data), Path(tmp),
                              threads, args.int8_activations)
            speed = speed_rows(str(state["model"]), runners, args)
            if args.accuracy:
                test = run_split(state["config"], train=False, data=args.data)
                count = args.limit or len(test)
                acc_rows = accuracy_rows(runners, test.images[:count], test.labels[:count])
        else:
            names = sorted(MODEL_REGISTRY) if args.models == ["all"] else args.models
            what = ("Networks with random weights (speed does not depend on them), int8 calibrated on "
                    f"{args.calibration} random images")
            calibration = np.random.default_rng(0).random((args.calibration, 3, 32, 32), dtype=np.float32)
            for name in names:
                torch.manual_seed(0)
                model = NormalizedNet(create_model(name), [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]).eval()
                speed += speed_rows(name, engines(model, calibration, Path(tmp), threads, args.int8_activations), args)

    info = machine_info() | {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "threads": threads,
                             "pytorch-bf16": "measured" if cpu_supports_bf16() else
                             "skipped: no AVX512-BF16 or AMX, autocast would only emulate bf16",
                             "int8 activations": str(activation_type(args.int8_activations)).rsplit(".", 1)[-1],
                             "load_average_1min_at_start": round(load_before, 2),
                             "load_average_1min_at_end": round(os.getloadavg()[0], 2)}
    report = {"command": command_line(), "machine": info, "checkpoint": str(args.checkpoint or ""),
              "speed": speed, "accuracy": acc_rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    speed_cols = list(dict.fromkeys(k for row in speed for k in row))
    md = ["# Inference benchmark", "", f"Command: `{report['command']}`", "", what, "",
          "Machine:", "", *(f"- {k}: {v}" for k, v in info.items()), "",
          "## Images per second", "", markdown_table(speed, speed_cols), "",
          f"Median of {args.repeats} windows of at least {args.seconds:g} s, random 0..1 inputs. "
          "The load average shows whether other work shared the CPU."]
    if acc_rows:
        md += ["", f"## Test accuracy ({count:,} images)", "",
               markdown_table(acc_rows, list(acc_rows[0])), "",
               f"int8: ONNX Runtime static QDQ quantization, per-channel 7-bit weights, calibrated on "
               f"{args.calibration} training images."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
