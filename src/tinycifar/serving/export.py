"""Export a checkpoint for deployment: ONNX (fp32 or int8) or TorchScript.

Every exported model includes normalization: its input is float RGB in 0..1, NCHW, any
batch size (input name ``image``, output ``logits``), exactly what ``tinycifar predict``
feeds its PyTorch model. A user decodes an image, divides by 255 and runs it.

int8 is onnxruntime's static post-training quantization in QDQ form, per-channel 7-bit
weights, calibrated on a fixed random sample of the run's training images (min/max of
each activation). The calibration images are the training split the checkpoint was
trained on (synthetic runs regenerate theirs). Before anything is written, the int8 model
classifies held-out test images beside the fp32 one, and an int8 model more than
``MAX_INT8_DROP`` points less accurate is refused (``Int8AccuracyError``).

Weights are 7-bit (-64..64, onnxruntime's ``reduce_range``) because an exported file travels.
Without VNNI (AVX2, and AVX-512 before VNNI) the u8 x s8 kernels add pairs of products in
16-bit registers that saturate: 2 x 255 x 127 = 64,770 is past 32,767, and on a Zen 3 a
model exported with 8-bit weights lost 28 points (issue 28). 7-bit weights keep every pair
at 2 x 255 x 64 = 32,640, ONNX Runtime's documented remedy, so no CPU's kernels can saturate;
the accuracy check then measures the file on the CPU at hand (``serve --int8`` on the serving one).

Activations are uint8 on x86-64 and int8 elsewhere. x86's integer dot products (AVX-512
VNNI's VPDPBUSD, AVX2's VPMADDUBSW) multiply unsigned by signed bytes, and ONNX Runtime's fast
QLinearConv kernels are u8s8: with int8 activations it left half of fastnet's convolutions
(the strided, dilated and depthwise ones) as fp32 convolutions between Dequantize and Quantize
nodes, and the int8 model ran at half the speed of fp32 (benchmarks/README.md). ARM's dot
products are s8s8, where int8 activations are the fast ones.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..data import Split, classes_of, image_size_of
from .inference import NormalizedNet, folded, load_inference_model, run_split, to_unit_float

FORMATS = ("onnx", "onnx-int8", "torchscript")
OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "logits"
MAX_INT8_DROP = 1.0  # points of test accuracy an int8 model may lose against fp32
HELD_OUT_COUNT = 10_000  # test images the int8 check classifies (all of CIFAR-10's test split)


class Int8AccuracyError(ConfigError):
    """The int8 model lost more than ``MAX_INT8_DROP`` points against fp32; nothing was written."""


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warn about optional packages; keep the CLI readable."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: NormalizedNet, out: str | Path, size: int = 32) -> str:
    """fp32 ONNX with a dynamic batch axis; returns which exporter produced it.

    The torch.export-based (dynamo) exporter comes first; the TorchScript-based one is the
    fallback for a torch where the first fails.
    """
    example = torch.rand(2, 3, size, size)
    with _quiet():
        try:
            torch.onnx.export(model, (example,), str(out), dynamo=True, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
                              external_data=False, verbose=False)
            return "dynamo"
        except Exception:  # noqa: BLE001 - any failure of the new exporter means: try the old one
            torch.onnx.export(model, (example,), str(out), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            return "torchscript-based"


def export_torchscript(model: NormalizedNet, out: str | Path, metadata: dict[str, str] | None = None,
                       size: int = 32) -> None:
    """Traced (the networks have no data-dependent control flow); load with ``torch.jit.load``.
    ``metadata`` is stored as extra files (``_extra_files`` of ``torch.jit.load``)."""
    with _quiet():
        traced = torch.jit.trace(model, torch.rand(2, 3, size, size))
    traced.save(str(out), _extra_files=metadata or {})


def model_metadata(state: dict) -> dict[str, str]:
    """What a deployed model needs beside its weights: the class names and the input side."""
    return {"classes": json.dumps(list(classes_of(state))), "image_size": str(image_size_of(state)),
            "input": "float RGB in 0..1, NCHW", "network": str(state.get("model"))}


def add_onnx_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def calibration_images(config: dict, count: int = 512, data: str | Path | None = None,
                       seed: int = 0) -> np.ndarray:
    """A fixed random sample of the run's training images, float32 0..1 NCHW."""
    split = run_split(config, train=True, data=data)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(split), generator=g)[:count]
    return to_unit_float(split.images[idx]).numpy()


def activation_type(activations: str = "auto"):
    """uint8 activations on x86-64 (u8s8 kernels), int8 on ARM (s8s8): see the module docstring."""
    from onnxruntime.quantization import QuantType

    if activations == "auto":
        x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
        activations = "uint8" if x86 else "int8"
    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activations]


def quantize_int8(fp32_path: str | Path, out: str | Path, images: np.ndarray, batch: int = 64,
                  activations: str = "auto") -> None:
    """Static QDQ quantization, 7-bit per-channel weights (see the module docstring), min/max
    calibration on ``images``; ``activations``: auto (by processor), uint8 or int8."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: images[i : i + batch]} for i in range(0, len(images), batch)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=activation_type(activations), weight_type=QuantType.QInt8,
                        reduce_range=True)


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str = "onnx", data: str | Path | None = None,
                      calibration_count: int = 512, model: str | torch.nn.Module | None = None,
                      allow_changed_source: bool = False) -> Path:
    """Write ``checkpoint`` to ``out`` in format ``fmt`` (one of FORMATS); returns ``out``.

    ``model`` names the network's code for a checkpoint of the user's own network. The file is
    written beside ``out`` and renamed over it at the end, so a refused int8 model or a failure
    leaves no partial file, and an older ``out`` intact.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    model, state = load_inference_model(checkpoint, model, allow_changed_source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")
    try:
        if fmt == "torchscript":
            size = image_size_of(state)  # traced folded, as predict runs it (the ONNX exporter folds its own)
            export_torchscript(folded(model, size), partial, model_metadata(state), size)
        else:
            write_onnx(model, state["config"], partial, int8=fmt == "onnx-int8", data=data,
                       calibration_count=calibration_count)
            add_onnx_metadata(partial, model_metadata(state))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def write_onnx(model: NormalizedNet, config: dict, out: str | Path, int8: bool = False,
               data: str | Path | None = None, calibration_count: int = 512) -> None:
    """The ONNX model at ``out``: fp32, or int8 calibrated on the run's training images (``config``).

    An int8 model reaches ``out`` only after ``check_int8_accuracy`` has passed it on the run's
    held-out test images; ``serve --int8`` builds its model here too, so it refuses the same way.
    """
    size = int(config.get("image_size", 32))
    if not int8:
        export_onnx(model, out, size)
        return
    images = calibration_images(config, calibration_count, data)
    held_out = held_out_split(config, data)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, quantized = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(model, fp32, size)
        quantize_int8(fp32, quantized, images)
        check_int8_accuracy(fp32, quantized, held_out)
        shutil.move(quantized, out)


def held_out_split(config: dict, data: str | Path | None = None, count: int = HELD_OUT_COUNT,
                   seed: int = 0) -> Split:
    """Up to ``count`` images of the run's test split (a fixed random sample when it is larger):
    images calibration never saw, so the int8 check measures what a user would get."""
    split = run_split(config, train=False, data=data)
    if len(split) <= count:
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:count]
    return Split(split.images[idx], split.labels[idx], split.classes)


def onnx_accuracy(path: str | Path, split: Split, batch: int = 500) -> float:
    """Top-1 accuracy (%) of the ONNX model at ``path`` on ``split``, in ONNX Runtime on this CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(split), batch):
        images = to_unit_float(split.images[i : i + batch]).numpy()
        predicted = session.run(None, {INPUT_NAME: images})[0].argmax(1)
        correct += int((predicted == split.labels[i : i + batch].numpy()).sum())
    return 100 * correct / max(len(split), 1)


def check_int8_accuracy(fp32_path: str | Path, int8_path: str | Path, held_out: Split) -> None:
    """Refuse (``Int8AccuracyError``, one line naming the gap) an int8 model more than
    ``MAX_INT8_DROP`` points less accurate than the fp32 model on ``held_out``.

    Quantization can go wrong silently (saturating kernels, a bad calibration): the file still
    runs and answers, only worse, so it is measured before anyone is handed it.
    """
    fp32, int8 = onnx_accuracy(fp32_path, held_out), onnx_accuracy(int8_path, held_out)
    if fp32 - int8 > MAX_INT8_DROP:
        raise Int8AccuracyError(
            f"--int8: the int8 model scores {int8:.2f}% against fp32's {fp32:.2f}% on {len(held_out):,} held-out "
            f"test images, {fp32 - int8:.2f} points lower (at most {MAX_INT8_DROP:g} allowed); refused")
