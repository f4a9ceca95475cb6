"""``tinycifar export``: ONNX and TorchScript agree with PyTorch; int8 runs; normalization is built in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from tiny_run import train_tiny_run

from tinycifar.cli import main
from tinycifar.data import synthetic_cifar10
from tinycifar.data.images import load_image
from tinycifar.models import MODEL_REGISTRY, create_model
from tinycifar.serving import export
from tinycifar.serving.inference import NormalizedNet, load_inference_model, run_split, to_unit_float


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("run") / "run") / "best.pt"


@pytest.fixture(scope="module")
def reference(checkpoint) -> tuple[np.ndarray, np.ndarray]:
    """256 synthetic test images as 0..1 floats and the PyTorch logits for them."""
    _, test = synthetic_cifar10(10, 256, seed=1)
    x = to_unit_float(test.images)
    model, _ = load_inference_model(checkpoint)
    with torch.no_grad():
        return x.numpy(), model(x).numpy()


@pytest.fixture(scope="module")
def onnx_file(checkpoint, tmp_path_factory) -> Path:
    return export.export_checkpoint(checkpoint, tmp_path_factory.mktemp("onnx") / "model.onnx", "onnx")


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def agree(logits: np.ndarray, expected: np.ndarray) -> None:
    assert np.abs(logits - expected).max() <= 1e-3
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.999


def test_onnx_matches_pytorch(onnx_file, reference):
    x, expected = reference
    model = onnx.load(str(onnx_file))
    assert model.opset_import[0].version >= 17
    sess = session(onnx_file)
    assert [i.name for i in sess.get_inputs()] == ["image"] and [o.name for o in sess.get_outputs()] == ["logits"]
    agree(sess.run(None, {"image": x})[0], expected)


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_batch_axis_is_dynamic(onnx_file, reference, batch):
    x, expected = reference
    agree(session(onnx_file).run(None, {"image": x[:batch]})[0], expected[:batch])


def test_legacy_exporter_is_the_fallback(checkpoint, reference, tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo exporter unavailable")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    model, _ = load_inference_model(checkpoint)
    out = tmp_path / "legacy.onnx"
    assert export.export_onnx(model, out) == "torchscript-based"
    x, expected = reference
    agree(session(out).run(None, {"image": x})[0], expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_matches_pytorch(checkpoint, reference, tmp_path):
    out = export.export_checkpoint(checkpoint, tmp_path / "model.pt", "torchscript")
    loaded = torch.jit.load(str(out))
    x, expected = reference
    with torch.no_grad():
        agree(loaded(torch.from_numpy(x)).numpy(), expected)
        assert loaded(torch.from_numpy(x[:3])).shape == (3, 10)


def test_int8_is_quantized_and_runs(checkpoint, reference, tmp_path):
    out = export.export_checkpoint(checkpoint, tmp_path / "int8.onnx", "onnx-int8", calibration_count=64)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x, expected = reference
    logits = session(out).run(None, {"image": x})[0]
    assert logits.shape == expected.shape and np.isfinite(logits).all()


def test_exported_model_takes_what_predict_feeds(checkpoint, onnx_file, tmp_path):
    """A decoded image in 0..1 goes straight into the ONNX model: normalization is inside."""
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    x = load_image(path)[None]
    model, _ = load_inference_model(checkpoint)
    with torch.no_grad():
        agree(session(onnx_file).run(None, {"image": x.numpy()})[0], model(x).numpy())


def test_calibration_reads_the_runs_training_split(py_tree):
    config = {"dataset": "cifar10", "data": str(py_tree.root), "allow_modified": True}
    images = export.calibration_images(config, count=30)
    assert images.shape == (30, 3, 32, 32) and images.dtype == np.float32
    assert len(run_split(config, train=True)) == len(py_tree.train_labels)
    train = to_unit_float(py_tree.train_images).numpy().reshape(len(py_tree.train_labels), -1)
    assert all((train == row.reshape(1, -1)).all(1).any() for row in images)


def test_cli_export_and_flag_errors(checkpoint, tmp_path, capsys):
    out = tmp_path / "sub" / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--int8", "--calibration", "32", "--out", str(out)]) == 0
    assert "onnx-int8" in capsys.readouterr().out and out.is_file()
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--int8",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--int8" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_int8_leaves_no_convolution_in_float(name, tmp_path):
    """Every convolution becomes an integer QLinearConv once ONNX Runtime has fused the QDQ graph.

    A Dequantize -> Conv -> Quantize left in float runs slower than the whole fp32 model: with int8
    activations on x86 that happened to fastnet's strided, dilated and depthwise convolutions.
    """
    torch.manual_seed(0)
    model = NormalizedNet(create_model(name), [0.5] * 3, [0.25] * 3).eval()
    export.export_onnx(model, tmp_path / "fp32.onnx")
    calibration = np.random.default_rng(0).random((32, 3, 32, 32), dtype=np.float32)
    export.quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calibration)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "int8.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "Conv" not in ops and ops.count("QLinearConv") == sum(
        isinstance(m, torch.nn.Conv2d) for m in model.modules())
