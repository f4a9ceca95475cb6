"""Property tests: whatever bytes or values a data or checkpoint file holds, the readers either
return well-formed data or raise their own error (DatasetError, CheckpointError), nothing else."""

from __future__ import annotations

import contextlib
import io
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinycifar.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinycifar.data.cifar10 import RECORD_BYTES, DatasetError, parse_py_batch, read_bin_batch, safe_load_batch

BUDGET = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def write(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


def check_parsed(images: np.ndarray, labels: np.ndarray) -> None:
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (3, 32, 32)
    assert labels.dtype == np.int64 and labels.shape == (len(images),)
    assert len(labels) == 0 or (labels.min() >= 0 and labels.max() <= 9)


def valid_batch_bytes(n: int = 4, protocol: int = 4) -> bytes:
    rng = np.random.default_rng(0)
    raw = {b"batch_label": b"fuzz", b"labels": list(range(n)),
           b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
    return pickle.dumps(raw, protocol=protocol)


# ---------------------------------------------------------------------------- python-version batches


@BUDGET
@given(content=st.binary(max_size=4096))
def test_safe_load_batch_on_random_bytes(scratch, content):
    path = write(scratch, "random_batch", content)
    try:
        raw = safe_load_batch(path)
    except DatasetError:
        return
    assert isinstance(raw, dict)
    with contextlib.suppress(DatasetError):
        check_parsed(*parse_py_batch(raw, path))


@BUDGET
@given(data=st.data())
def test_safe_load_batch_on_mutated_real_batches(scratch, data):
    """A valid batch with bytes flipped, inserted or cut: the usual shape of a damaged download."""
    content = bytearray(valid_batch_bytes(protocol=data.draw(st.sampled_from([3, 4]))))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(content) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if action == "flip":
            content[pos] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del content[pos: pos + data.draw(st.integers(1, 64))]
        elif action == "insert":
            content[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del content[pos:]
        if not content:
            break
    path = write(scratch, "mutated_batch", bytes(content))
    with contextlib.suppress(DatasetError):
        check_parsed(*parse_py_batch(safe_load_batch(path), path))


plain_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4) | st.binary(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@BUDGET
@given(obj=plain_values, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_safe_load_batch_on_any_pickled_plain_object(scratch, obj, protocol):
    path = write(scratch, "plain_batch", pickle.dumps(obj, protocol=protocol))
    with contextlib.suppress(DatasetError):
        check_parsed(*parse_py_batch(safe_load_batch(path), path))


@SMALL
@given(global_name=st.sampled_from(["os.system", "builtins.eval", "subprocess.Popen", "numpy.load",
                                    "numpy.frombuffer", "torch.load", "builtins.getattr"]))
def test_safe_load_batch_refuses_every_other_global(scratch, global_name):
    module, name = global_name.rsplit(".", 1)
    payload = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + b"X\x04\x00\x00\x00true\x85R."
    path = write(scratch, "global_batch", payload)
    with pytest.raises(DatasetError, match="refused global|not a safe"):
        safe_load_batch(path)


arrays = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.int8, np.int64, np.uint64, np.float32, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)
    | st.sampled_from([(0, 3072), (1, 3072), (2, 3072), (3, 3071), (2, 3073)]),
)
label_values = (
    st.lists(st.integers(-2**70, 2**70), max_size=4)
    | st.lists(st.integers(0, 9), min_size=0, max_size=4)
    | st.lists(st.floats(), max_size=3)
    | st.lists(st.lists(st.integers(0, 9), max_size=2), max_size=3)
    | arrays
    | plain_values
)


@BUDGET
@given(data=arrays | plain_values, labels=label_values, drop=st.sampled_from([None, "data", "labels"]),
       extra=st.dictionaries(st.text(max_size=3), plain_values, max_size=2))
def test_parse_py_batch_on_random_dicts(data, labels, drop, extra):
    raw = {**extra, "data": data, "labels": labels}
    if drop:
        del raw[drop]
    try:
        images, parsed = parse_py_batch(raw, Path("fuzz_batch"))
    except DatasetError as e:
        assert "fuzz_batch" in str(e)
        return
    check_parsed(images, parsed)
    assert len(parsed) == len(data)


@BUDGET
@given(n=st.integers(1, 4), labels=st.lists(st.integers(-3, 12), min_size=4, max_size=4),
       as_array=st.sampled_from([None, np.int64, np.uint8, np.int32]))
def test_parse_py_batch_accepts_exactly_the_valid_labels(n, labels, as_array):
    labels = labels[:n]
    data = np.zeros((n, 3072), dtype=np.uint8)
    raw = {"data": data, "labels": labels if as_array is None else np.array(labels).astype(as_array)}
    valid = all(0 <= v <= 9 for v in labels) and (as_array is not np.uint8 or all(v >= 0 for v in labels))
    if valid:
        images, parsed = parse_py_batch(raw, Path("b"))
        check_parsed(images, parsed)
        assert parsed.tolist() == labels
    else:
        with pytest.raises(DatasetError, match="out of range"):
            parse_py_batch(raw, Path("b"))


# ---------------------------------------------------------------------------- binary-version batches


@BUDGET
@given(content=st.binary(max_size=3 * RECORD_BYTES + 10))
def test_read_bin_batch_on_random_bytes(scratch, content):
    path = write(scratch, "random.bin", content)
    try:
        images, labels = read_bin_batch(path)
    except DatasetError as e:
        assert str(path) in str(e)
        return
    assert len(content) % RECORD_BYTES == 0
    check_parsed(images, labels)
    assert len(labels) == len(content) // RECORD_BYTES


@BUDGET
@given(records=st.lists(st.tuples(st.integers(0, 255), st.binary(min_size=3072, max_size=3072)), max_size=3))
def test_read_bin_batch_on_whole_records(scratch, records):
    path = write(scratch, "records.bin", b"".join(bytes([label]) + body for label, body in records))
    if all(label <= 9 for label, _ in records):
        images, labels = read_bin_batch(path)
        check_parsed(images, labels)
        assert labels.tolist() == [label for label, _ in records]
        assert [images[i].tobytes() for i in range(len(records))] == [body for _, body in records]
    else:
        with pytest.raises(DatasetError, match="out of range"):
            read_bin_batch(path)


# ---------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def small_checkpoint() -> bytes:
    buf = io.BytesIO()
    torch.save({"format_version": 1, "model": "era9", "model_state": {"w": torch.arange(6.0)}, "epoch": 1}, buf)
    return buf.getvalue()


@SMALL
@given(content=st.binary(max_size=2048))
def test_load_checkpoint_on_random_bytes(scratch, content):
    path = write(scratch, "random.pt", content)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@SMALL
@given(data=st.data())
def test_load_checkpoint_on_mutated_checkpoints(scratch, small_checkpoint, data):
    content = bytearray(small_checkpoint)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(content) - 1))
        if data.draw(st.booleans()):
            content[pos] ^= data.draw(st.integers(1, 255))
        else:
            del content[pos:]
            break
    path = write(scratch, "mutated.pt", bytes(content))
    try:
        state = load_checkpoint(path)
    except CheckpointError:
        return
    assert isinstance(state, dict) and "model_state" in state


def test_fuzz_helpers_accept_a_valid_batch_and_checkpoint(scratch, small_checkpoint):
    path = write(scratch, "valid_batch", valid_batch_bytes())
    check_parsed(*parse_py_batch(safe_load_batch(path), path))
    save_checkpoint(scratch / "ok.pt", {"model": "era9", "model_state": {}})
    assert load_checkpoint(scratch / "ok.pt")["model"] == "era9"
    assert load_checkpoint(write(scratch, "small.pt", small_checkpoint))["epoch"] == 1
