"""``tinycifar export``: ONNX and TorchScript agree with PyTorch; int8 runs, cannot saturate 16-bit
pairs on CPUs without VNNI and is refused when it loses accuracy; normalization is built in."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from PIL import Image
from tiny_run import train_learned_run

from tinycifar.cli import main
from tinycifar.data import synthetic_cifar10
from tinycifar.data.images import load_image
from tinycifar.models import MODEL_REGISTRY, create_model
from tinycifar.serving import export
from tinycifar.serving.inference import NormalizedNet, load_inference_model, run_split, to_unit_float


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A network that learned its synthetic task, so int8's accuracy check has something to lose."""
    return train_learned_run(tmp_path_factory.mktemp("run") / "run") / "best.pt"


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
    assert "aten::batch_norm" not in str(loaded.inlined_graph)  # folded, as predict runs it


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


@pytest.fixture(scope="module", params=sorted(MODEL_REGISTRY))
def int8_network(request, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """Each registered network (random weights) and its int8 export, calibrated on random images."""
    torch.manual_seed(0)
    model = NormalizedNet(create_model(request.param), [0.5] * 3, [0.25] * 3).eval()
    tmp = tmp_path_factory.mktemp(request.param)
    export.export_onnx(model, tmp / "fp32.onnx")
    calibration = np.random.default_rng(0).random((32, 3, 32, 32), dtype=np.float32)
    export.quantize_int8(tmp / "fp32.onnx", tmp / "int8.onnx", calibration)
    return model, tmp / "int8.onnx"


def test_int8_leaves_no_convolution_in_float(int8_network, tmp_path):
    """Every convolution becomes an integer QLinearConv once ONNX Runtime has fused the QDQ graph.

    A Dequantize -> Conv -> Quantize left in float runs slower than the whole fp32 model: with int8
    activations on x86 that happened to fastnet's strided, dilated and depthwise convolutions.
    """
    model, int8 = int8_network
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "Conv" not in ops and ops.count("QLinearConv") == sum(
        isinstance(m, torch.nn.Conv2d) for m in model.modules())


def dequantized_inputs(graph: onnx.GraphProto) -> dict[str, tuple[int, np.ndarray | None]]:
    """Each DequantizeLinear output: the integer type it dequantizes (from its zero point) and,
    when that input is a stored initializer (a weight), its integer values."""
    stored = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return {n.output[0]: (stored[n.input[2]].dtype, stored.get(n.input[0]))
            for n in graph.node if n.op_type == "DequantizeLinear"}


def test_int8_products_cannot_saturate_without_vnni(int8_network):
    """Without VNNI, x86's u8 x s8 kernels (VPMADDUBSW) add pairs of products in saturating 16-bit
    registers: read from the file itself, every convolution's and matrix product's largest
    activation times its largest weight, twice, must stay within 32,767 (issue 28: 8-bit
    weights reach 2 x 255 x 127 = 64,770 and lost 28 points on a Zen 3)."""
    model, int8 = int8_network
    graph = onnx.load(str(int8)).graph
    dequantized = dequantized_inputs(graph)
    products = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(products) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    for node in products:
        activation_type, _ = dequantized[node.input[0]]
        weight_type, weights = dequantized[node.input[1]]
        assert weight_type == np.int8 and activation_type in (np.uint8, np.int8), node.name
        largest_activation = int(np.iinfo(activation_type).max if activation_type == np.uint8 else 128)
        assert 2 * largest_activation * int(np.abs(weights.astype(np.int32)).max()) <= 32_767, node.name


def test_export_refuses_an_int8_model_that_lost_accuracy(checkpoint, broken_int8, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an older export")
    assert main(["export", "--checkpoint", str(checkpoint), "--int8", "--calibration", "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "held-out test images" in err and "refused" in err
    assert float(re.search(r"([\d.]+) points lower", err)[1]) > export.MAX_INT8_DROP
    assert out.read_bytes() == b"an older export"  # nothing already written is lost
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # and no partial file is left


def test_a_good_int8_export_passes_its_accuracy_check(checkpoint, tmp_path):
    out = export.export_checkpoint(checkpoint, tmp_path / "int8.onnx", "onnx-int8", calibration_count=64)
    model, state = load_inference_model(checkpoint)
    held_out = export.held_out_split(state["config"])
    export.export_onnx(model, tmp_path / "fp32.onnx")
    fp32, int8 = export.onnx_accuracy(tmp_path / "fp32.onnx", held_out), export.onnx_accuracy(out, held_out)
    assert fp32 >= 90 and fp32 - int8 <= export.MAX_INT8_DROP  # a learned network: the check had something to lose


def test_held_out_images_are_the_test_split(py_tree):
    config = {"dataset": "cifar10", "data": str(py_tree.root), "allow_modified": True}
    assert torch.equal(export.held_out_split(config).images, py_tree.test_images)
    sample = export.held_out_split(config, count=7)
    assert len(sample) == 7
    for image, label in zip(sample.images, sample.labels, strict=True):
        match = (py_tree.test_images == image).flatten(1).all(1)
        assert match.any() and py_tree.test_labels[match][0] == label
