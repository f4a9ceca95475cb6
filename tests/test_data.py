"""The data layer: safe unpickling, validation, layouts, archive extraction, download, synthetic data."""

from __future__ import annotations

import builtins
import codecs
import hashlib
import io
import os
import pathlib
import pickle
import shlex
import socket
import tarfile
import time

import numpy as np
import pytest
import torch

from tinycifar.data import DatasetError, load_cifar10, load_split
from tinycifar.data import cifar10 as data

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------- safe unpickling


def _evil_batch(kind: str, target: pathlib.Path, protocol: int) -> bytes:
    """A batch-shaped pickle whose loading would create ``target`` if it ran the embedded call."""

    class Evil:
        def __reduce__(self):
            code = f"open({str(target)!r}, 'w').close()"
            if kind == "exec":
                return builtins.exec, (code,)
            if kind == "eval":
                return builtins.eval, (code,)
            if kind == "os.system":
                return os.system, (f"touch {shlex.quote(str(target))}",)
            if kind == "Path.touch":
                return pathlib.Path.touch, (pathlib.Path(target),)
            raise AssertionError(kind)

    raw = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"filenames": Evil()}
    return pickle.dumps(raw, protocol=protocol)


# (callable, pickle protocol); protocol 2 is the originals', and cannot name a method like Path.touch
EVIL_CASES = [("exec", 2), ("eval", 2), ("os.system", 2), ("exec", 4), ("eval", 4), ("os.system", 4), ("Path.touch", 4),
              ("exec", 5), ("os.system", 5), ("Path.touch", 5)]


@pytest.mark.parametrize("kind, protocol", EVIL_CASES)
def test_crafted_batch_is_refused_and_runs_nothing(tmp_path, kind, protocol):
    # The payload is live: the standard unpickler does create the file.
    control = tmp_path / "control"
    pickle.loads(_evil_batch(kind, control, protocol))
    assert control.exists()

    target = tmp_path / "pwned"
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(_evil_batch(kind, target, protocol))
    with pytest.raises(DatasetError) as err:
        data.safe_load_batch(batch)
    msg = str(err.value)
    assert str(batch) in msg
    assert "refused global" in msg
    assert not target.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_batches_resaved_by_python3_load(tmp_path, protocol):
    """Re-saving the official dicts from Python 3 is ordinary: protocol 2 writes bytes through
    _codecs.encode, protocol 5 writes arrays through numpy's _frombuffer; both still build only
    arrays and containers."""
    rng = np.random.default_rng(protocol)
    raw = {b"batch_label": b"training batch 1 of 5", b"labels": rng.integers(0, 10, 7).tolist(),
           b"data": rng.integers(0, 256, (7, 3072), dtype=np.uint8), b"filenames": [b"x_%d.png" % i for i in range(7)]}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(raw, protocol=protocol))
    loaded = data.safe_load_batch(path)
    assert np.array_equal(loaded["data"], raw[b"data"]) and loaded["labels"] == raw[b"labels"]
    assert loaded["batch_label"] == raw[b"batch_label"] and loaded["filenames"] == raw[b"filenames"]


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload, fragment", [
    (_Reduce(codecs.encode, ("abc", "rot13")), "_codecs.encode is admitted only"),
    (_Reduce(codecs.encode, (b"abc", "base64")), "_codecs.encode is admitted only"),
])
def test_admitted_helpers_refuse_anything_else(tmp_path, payload, fragment):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": payload, b"labels": [0]}, protocol=4))
    with pytest.raises(DatasetError, match=fragment):
        data.safe_load_batch(path)


def test_out_of_band_protocol5_buffers_are_refused(tmp_path):
    array = np.zeros((2, 3072), np.uint8)
    buffers = []
    blob = pickle.dumps({b"data": array, b"labels": [0, 1]}, protocol=5, buffer_callback=buffers.append)
    assert buffers  # the array's bytes are not in the file
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob)
    with pytest.raises(DatasetError, match=str(path)):
        data.safe_load_batch(path)


def test_crafted_batch_is_refused_by_load_split(py_tree, tmp_path):
    target = tmp_path / "pwned"
    victim = py_tree.py_dir / "data_batch_4"
    victim.write_bytes(_evil_batch("exec", target, 2))
    with pytest.raises(DatasetError, match="data_batch_4"):
        load_split(py_tree.root, train=True, verify_md5=False)
    assert not target.exists()


class _ArrayPickle:
    """Pickles as an ndarray with the given state, the way numpy does, so the state can lie."""

    def __init__(self, shape, dtype, raw):
        self.state = (1, shape, dtype, False, raw)

    def __reduce__(self):
        return np.ndarray.__reduce__(np.zeros(0, np.uint8))[:2] + (self.state,)


@pytest.mark.parametrize("shape, dtype, raw, expected", [
    ((4, 3072), np.dtype("u1"), b"\0" * 10, "needs 12288 bytes, found 10"),  # state shorter than its shape
    ((-1, 3072), np.dtype("u1"), b"", "malformed array shape"),
    ((2,), np.dtype("O"), [1, 2], "dtype 'O8' is not one"),  # object arrays rebuild arbitrary objects
    ((2,), np.dtype("u1"), "ab", "malformed array state"),
], ids=["short-data", "negative-shape", "object-dtype", "str-data"])
def test_lying_array_state_is_refused_before_numpy_sees_it(tmp_path, shape, dtype, raw, expected):
    """numpy's own __setstate__ trusts its input (a fuzzed batch crashed the interpreter in it)."""
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _ArrayPickle(shape, dtype, raw), b"labels": [0]}, protocol=4))
    with pytest.raises(DatasetError, match=expected):
        data.safe_load_batch(batch)


def test_normal_numpy_batch_loads(tmp_path):
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 9, 8, 7])
    path = tmp_path / "batch"
    data.save_py_batch(path, images, labels)
    raw = data.safe_load_batch(path)
    assert set(raw) == {"batch_label", "labels", "data", "filenames"}  # bytes keys decoded
    x, y = data.parse_py_batch(raw, path)
    assert x.dtype == np.uint8 and x.shape == (7, 3, 32, 32)
    assert y.dtype == np.int64
    assert torch.equal(torch.from_numpy(x), images)
    assert y.tolist() == labels.tolist()


def test_numpy_scalars_and_arrays_as_labels_load(tmp_path):
    """Labels stored as numpy scalars or an int array (other writers do this) are accepted."""
    path = tmp_path / "batch"
    scalars = [np.int64(i % 10) for i in range(4)]
    for labels in (scalars, np.arange(4, dtype=np.int32)):
        path.write_bytes(pickle.dumps({b"data": np.ones((4, 3072), np.uint8), b"labels": labels}, protocol=4))
        _, y = data.parse_py_batch(data.safe_load_batch(path), path)
        assert y.tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------- loading and validation


def _write_raw(path: pathlib.Path, raw) -> None:
    path.write_bytes(pickle.dumps(raw, protocol=4))


def test_py_tree_loads_in_file_order(py_tree):
    train = load_split(py_tree.root, train=True, verify_md5=False)
    test = load_split(py_tree.root, train=False, verify_md5=False)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.images.shape == (5 * 20, 3, 32, 32)
    assert torch.equal(train.images, py_tree.train_images)
    assert torch.equal(train.labels, py_tree.train_labels)
    assert torch.equal(test.images, py_tree.test_images)
    assert torch.equal(test.labels, py_tree.test_labels)
    assert train.images.is_contiguous()
    assert len(train) == 5 * len(test)


def test_load_cifar10_returns_both_splits(py_tree):
    train, test = load_cifar10(py_tree.root, verify_md5=False)
    assert torch.equal(train.labels, py_tree.train_labels)
    assert torch.equal(test.labels, py_tree.test_labels)


def test_missing_file(py_tree):
    (py_tree.py_dir / "data_batch_2").unlink()
    with pytest.raises(DatasetError, match=r"data_batch_2: file is missing"):
        load_split(py_tree.root, train=True, verify_md5=False)
    # the test split does not need that file
    load_split(py_tree.root, train=False, verify_md5=False)


def test_missing_file_direct():
    with pytest.raises(DatasetError, match="nowhere/batch: file is missing"):
        data.safe_load_batch(pathlib.Path("nowhere/batch"))


@pytest.mark.parametrize("keep", [0, 1, 2, 40, 0.5, -1])
def test_truncated_pickle(py_tree, keep):
    path = py_tree.py_dir / "data_batch_3"
    raw = path.read_bytes()
    cut = int(len(raw) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(raw) + keep)
    path.write_bytes(raw[:cut])
    with pytest.raises(DatasetError) as err:
        load_split(py_tree.root, train=True, verify_md5=False)
    msg = str(err.value)
    assert str(path) in msg
    assert "truncated" in msg


def test_garbage_file(py_tree):
    path = py_tree.py_dir / "test_batch"
    path.write_bytes(b"this is not a pickle at all" * 10)
    with pytest.raises(DatasetError, match="test_batch"):
        load_split(py_tree.root, train=False, verify_md5=False)


@pytest.mark.parametrize("obj, kind", [([1, 2, 3], "list"), ("text", "str"), (np.zeros(3, np.uint8), "ndarray")])
def test_not_a_dict(py_tree, obj, kind):
    path = py_tree.py_dir / "data_batch_1"
    _write_raw(path, obj)
    with pytest.raises(DatasetError, match=rf"data_batch_1: expected a dict, found {kind}"):
        load_split(py_tree.root, train=True, verify_md5=False)


def test_missing_keys(py_tree):
    path = py_tree.py_dir / "data_batch_5"
    _write_raw(path, {b"data": np.zeros((20, 3072), np.uint8)})
    with pytest.raises(DatasetError, match=r"data_batch_5: missing 'data' or 'labels'"):
        load_split(py_tree.root, train=True, verify_md5=False)


@pytest.mark.parametrize("shape", [(20, 3071), (20, 3, 1024), (20 * 3072,), (20, 3073)])
def test_wrong_shape(py_tree, shape):
    path = py_tree.py_dir / "data_batch_2"
    _write_raw(path, {b"data": np.zeros(shape, np.uint8), b"labels": [0] * 20})
    with pytest.raises(DatasetError) as err:
        load_split(py_tree.root, train=True, verify_md5=False)
    msg = str(err.value)
    assert str(path) in msg and "shape" in msg and str(shape) in msg


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.int8, np.uint16])
def test_wrong_dtype(py_tree, dtype):
    path = py_tree.py_dir / "data_batch_2"
    _write_raw(path, {b"data": np.zeros((20, 3072), dtype), b"labels": [0] * 20})
    with pytest.raises(DatasetError) as err:
        load_split(py_tree.root, train=True, verify_md5=False)
    msg = str(err.value)
    assert str(path) in msg and "uint8" in msg and np.dtype(dtype).name in msg


def test_data_not_an_array(py_tree):
    path = py_tree.py_dir / "test_batch"
    _write_raw(path, {b"data": [[0] * 3072] * 20, b"labels": [0] * 20})
    with pytest.raises(DatasetError, match=r"test_batch: 'data' must be a uint8 array, found list"):
        load_split(py_tree.root, train=False, verify_md5=False)


@pytest.mark.parametrize("bad", [10, -1, 255, 1000])
def test_label_out_of_range(py_tree, bad):
    path = py_tree.py_dir / "data_batch_4"
    labels = [i % 10 for i in range(20)]
    labels[13] = bad
    _write_raw(path, {b"data": np.zeros((20, 3072), np.uint8), b"labels": labels})
    with pytest.raises(DatasetError, match=rf"data_batch_4: label {bad} out of range 0\.\.9"):
        load_split(py_tree.root, train=True, verify_md5=False)


@pytest.mark.parametrize("labels", [[[0, 1]] * 20, [0.5] * 20, ["a"] * 20])
def test_labels_not_integers(py_tree, labels):
    path = py_tree.py_dir / "data_batch_4"
    _write_raw(path, {b"data": np.zeros((20, 3072), np.uint8), b"labels": labels})
    with pytest.raises(DatasetError, match=r"data_batch_4: 'labels'"):
        load_split(py_tree.root, train=True, verify_md5=False)


def test_labels_and_images_disagree(py_tree):
    path = py_tree.py_dir / "data_batch_1"
    _write_raw(path, {b"data": np.zeros((20, 3072), np.uint8), b"labels": [0] * 19})
    with pytest.raises(DatasetError, match=r"data_batch_1: 20 images but 19 labels"):
        load_split(py_tree.root, train=True, verify_md5=False)


@pytest.mark.parametrize("n", [19, 21])
def test_wrong_count(py_tree, n):
    path = py_tree.py_dir / "test_batch"
    _write_raw(path, {b"data": np.zeros((n, 3072), np.uint8), b"labels": [0] * n})
    with pytest.raises(DatasetError, match=rf"test_batch: holds {n} images, expected 20"):
        load_split(py_tree.root, train=False, verify_md5=False)


def test_official_count_is_enforced(tmp_path, fake):
    """Without the monkeypatched count, a small tree is refused: the real files must hold 10,000."""
    tree = fake.write_py_tree(tmp_path / "root", 20)
    with pytest.raises(DatasetError, match=r"data_batch_1: holds 20 images, expected 10000"):
        load_split(tree.root, train=True, verify_md5=False)


def test_md5_checked_and_allow_modified(py_tree, monkeypatch):
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in py_tree.py_dir.iterdir()}
    monkeypatch.setattr(data, "PY_MD5", sums)
    load_split(py_tree.root, train=True)  # matching sums pass

    path = py_tree.py_dir / "data_batch_3"
    images = py_tree.train_images[40:60].clone()
    images[5, 1, 7, 9] ^= 1  # one bit of one pixel
    data.save_py_batch(path, images, py_tree.train_labels[40:60])
    with pytest.raises(DatasetError) as err:
        load_split(py_tree.root, train=True)
    msg = str(err.value)
    assert str(path) in msg and "md5" in msg and sums["data_batch_3"] in msg and "--allow-modified" in msg

    train = load_split(py_tree.root, train=True, verify_md5=False)
    assert train.images[45, 1, 7, 9] == images[5, 1, 7, 9] != py_tree.train_images[45, 1, 7, 9]


def test_fake_files_fail_the_official_md5(py_tree):
    with pytest.raises(DatasetError, match=r"data_batch_1: md5 [0-9a-f]{32} does not match"):
        load_split(py_tree.root, train=True)


# ---------------------------------------------------------------------------- binary layout


def test_bin_tree_loads(bin_tree):
    train = load_split(bin_tree.root, train=True)  # no published sums: verify_md5 is moot
    test = load_split(bin_tree.root, train=False)
    assert torch.equal(train.images, bin_tree.train_images)
    assert torch.equal(train.labels, bin_tree.train_labels)
    assert torch.equal(test.images, bin_tree.test_images)
    assert torch.equal(test.labels, bin_tree.test_labels)
    assert train.labels.dtype == torch.int64 and train.images.dtype == torch.uint8


def test_bin_record_layout(tmp_path, small_batches):
    """Label byte, then the red, green and blue planes, each row-major, as the official docs say."""
    folder = tmp_path / data.BIN_DIR
    folder.mkdir()
    n = small_batches
    records = np.zeros((n, data.RECORD_BYTES), np.uint8)
    records[:, 0] = np.arange(n) % 10
    records[:, 1:1025] = 10 + np.arange(n)[:, None]  # red plane
    records[:, 1025:2049] = 100 + np.arange(n)[:, None]  # green plane
    records[:, 2049:] = np.arange(1024) % 251  # blue plane: row-major ramp
    (folder / "test_batch.bin").write_bytes(records.tobytes())
    test = load_split(tmp_path, train=False)
    assert test.labels.tolist() == [i % 10 for i in range(n)]
    assert test.images[:, 0].flatten(1).eq(10 + torch.arange(n)[:, None]).all()
    assert test.images[:, 1].flatten(1).eq(100 + torch.arange(n)[:, None]).all()
    assert test.images[3, 2, 5, 7] == (5 * 32 + 7) % 251


def test_bin_truncated(bin_tree):
    path = bin_tree.bin_dir / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError) as err:
        load_split(bin_tree.root, train=True)
    msg = str(err.value)
    assert str(path) in msg and "truncated" in msg


def test_bin_wrong_count(bin_tree):
    path = bin_tree.bin_dir / "test_batch.bin"
    path.write_bytes(path.read_bytes()[: -data.RECORD_BYTES])
    with pytest.raises(DatasetError, match=r"test_batch.bin: holds 19 images, expected 20"):
        load_split(bin_tree.root, train=False)


def test_bin_label_out_of_range(bin_tree, fake):
    path = bin_tree.bin_dir / "data_batch_5.bin"
    labels = bin_tree.train_labels[80:].clone()
    labels[2] = 10
    path.write_bytes(fake.bin_records(bin_tree.train_images[80:], labels))
    with pytest.raises(DatasetError, match=r"data_batch_5.bin: label 10 out of range"):
        load_split(bin_tree.root, train=True)


def test_bin_missing_file(bin_tree):
    (bin_tree.bin_dir / "data_batch_1.bin").unlink()
    with pytest.raises(DatasetError, match=r"data_batch_1.bin: file is missing"):
        load_split(bin_tree.root, train=True)


# ---------------------------------------------------------------------------- layout detection and archives


def test_find_layout(tmp_path, fake, small_batches, good_archive):
    py_root, bin_root, arc_root, empty = (tmp_path / n for n in ("py", "bin", "arc", "empty"))
    fake.write_py_tree(py_root, small_batches)
    fake.write_bin_tree(bin_root, small_batches)
    arc_root.mkdir()
    (arc_root / data.ARCHIVE_NAME).write_bytes(good_archive[0].read_bytes())
    empty.mkdir()
    assert data.find_layout(py_root) == "py"
    assert data.find_layout(bin_root) == "bin"
    assert data.find_layout(arc_root) == "archive"
    with pytest.raises(DatasetError) as err:
        data.find_layout(empty)
    msg = str(err.value)
    assert str(empty) in msg and "tinycifar download" in msg and data.PY_DIR in msg


def test_no_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="tinycifar download"):
        load_cifar10(tmp_path / "does-not-exist")


def test_archive_in_root_is_extracted(tmp_path, good_archive, fake):
    archive, tree = good_archive
    root = tmp_path / "root"
    root.mkdir()
    (root / data.ARCHIVE_NAME).write_bytes(archive.read_bytes())
    train = load_split(root, train=True, verify_md5=False)
    assert torch.equal(train.images, tree.train_images)
    assert (root / data.PY_DIR).is_dir()
    assert (root / data.ARCHIVE_NAME).is_file()
    assert fake.leftovers(root) == []
    assert data.find_layout(root) == "py"  # the next load reads the folder
    test = load_split(root, train=False, verify_md5=False)
    assert torch.equal(test.labels, tree.test_labels)


def test_archive_in_root_md5_checked(tmp_path, good_archive, fake):
    archive, _ = good_archive
    root = tmp_path / "root"
    root.mkdir()
    (root / data.ARCHIVE_NAME).write_bytes(archive.read_bytes())
    with pytest.raises(DatasetError, match=rf"{data.ARCHIVE_NAME}: md5 [0-9a-f]+ does not match the expected"):
        load_split(root, train=True)
    assert sorted(p.name for p in root.iterdir()) == [data.ARCHIVE_NAME]


def test_archive_without_dataset_folder(tmp_path, fake):
    root = tmp_path / "root"
    root.mkdir()
    archive = root / data.ARCHIVE_NAME
    fake.make_tar_gz(archive, [("readme.txt", b"hello")])
    with pytest.raises(DatasetError, match=f"does not contain {data.PY_DIR}"):
        data.extract_archive(archive, root, md5=None)
    assert sorted(p.name for p in root.iterdir()) == [data.ARCHIVE_NAME]


def test_unreadable_archive(tmp_path, fake):
    root = tmp_path / "root"
    root.mkdir()
    archive = root / data.ARCHIVE_NAME
    archive.write_bytes(b"\x1f\x8b" + os.urandom(1000))
    with pytest.raises(DatasetError, match="not a readable tar.gz"):
        data.extract_archive(archive, root, md5=None)
    assert fake.leftovers(root) == [] and not (root / data.PY_DIR).exists()


# ---------------------------------------------------------------------------- download


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_download_good_archive(tmp_path, http_server, good_archive):
    archive, tree = good_archive
    body = archive.read_bytes()
    http_server.routes["/cifar.tar.gz"] = body
    root = tmp_path / "new" / "root"  # created on demand
    out = data.download_cifar10(root, url=http_server.url + "/cifar.tar.gz", md5=_md5(body), progress=False)
    assert out == root / data.PY_DIR
    assert sorted(p.name for p in root.iterdir()) == [data.PY_DIR]  # no temp files, no archive
    train = load_split(root, train=True, verify_md5=False)
    assert torch.equal(train.images, tree.train_images)
    assert http_server.requests == ["/cifar.tar.gz"]


def test_load_cifar10_downloads_when_nothing_found(tmp_path, http_server, good_archive):
    archive, tree = good_archive
    body = archive.read_bytes()
    http_server.routes["/c.tar.gz"] = body
    root = tmp_path / "root"
    train, test = load_cifar10(
        root, verify_md5=False, download=True, url=http_server.url + "/c.tar.gz", archive_md5=_md5(body)
    )
    assert torch.equal(test.images, tree.test_images)
    # a second call finds the data and does not download again
    load_cifar10(root, verify_md5=False, download=True, url=http_server.url + "/c.tar.gz", archive_md5=_md5(body))
    assert http_server.requests == ["/c.tar.gz"]


def test_download_corrupted_archive(tmp_path, http_server, good_archive):
    body = bytearray(good_archive[0].read_bytes())
    good_md5 = _md5(bytes(body))
    body[len(body) // 2] ^= 0xFF
    http_server.routes["/c.tar.gz"] = bytes(body)
    root = tmp_path / "root"
    with pytest.raises(DatasetError, match=rf"md5 [0-9a-f]+ does not match the expected {good_md5}"):
        data.download_cifar10(root, url=http_server.url + "/c.tar.gz", md5=good_md5, progress=False)
    assert list(root.iterdir()) == []


def test_download_garbage_without_md5(tmp_path, http_server):
    http_server.routes["/c.tar.gz"] = os.urandom(5000)
    root = tmp_path / "root"
    with pytest.raises(DatasetError, match="not a readable tar.gz"):
        data.download_cifar10(root, url=http_server.url + "/c.tar.gz", md5=None, progress=False)
    assert list(root.iterdir()) == []


def _evil_members(kind: str, outside: pathlib.Path) -> list:
    """Tar entries that would write ``outside`` (a path next to, not inside, the dataset root)."""
    if kind == "dotdot":
        return [(f"../{outside.name}", b"evil")]
    if kind == "dotdot-nested":
        return [(f"{data.PY_DIR}/../../{outside.name}", b"evil")]
    if kind == "absolute":
        return [(str(outside), b"evil")]
    link = tarfile.TarInfo(f"{data.PY_DIR}/escape")
    if kind == "symlink-absolute":
        link.type, link.linkname = tarfile.SYMTYPE, str(outside.parent)
    elif kind == "symlink-relative":
        link.type, link.linkname = tarfile.SYMTYPE, "../.."
    elif kind == "hardlink":
        link.type, link.linkname = tarfile.LNKTYPE, str(outside)
    else:
        raise AssertionError(kind)
    return [link, (f"{data.PY_DIR}/escape/{outside.name}", b"evil")]


@pytest.mark.parametrize(
    "kind", ["dotdot", "dotdot-nested", "absolute", "symlink-absolute", "symlink-relative", "hardlink"]
)
def test_download_refuses_escaping_members(tmp_path, http_server, fake, small_batches, kind):
    src = tmp_path / "src"
    fake.write_py_tree(src, small_batches)
    outside = tmp_path / "evil"
    archive = tmp_path / "evil.tar.gz"
    body = fake.make_tar_gz(archive, _evil_members(kind, outside), tree=src / data.PY_DIR)
    with tarfile.open(archive) as tar:  # the archive really holds the hostile entry, verbatim
        names = tar.getnames()
        assert any(".." in n or n.startswith("/") or n.endswith("/escape") for n in names)
    http_server.routes["/evil.tar.gz"] = body
    root = tmp_path / "root"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(DatasetError) as err:
        data.download_cifar10(root, url=http_server.url + "/evil.tar.gz", md5=_md5(body), progress=False)
    msg = str(err.value)
    assert "member" in msg and ("outside" in msg or "link" in msg)
    assert not outside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "root"])
    assert list(root.iterdir()) == []


def test_download_404(tmp_path, http_server):
    root = tmp_path / "root"
    url = http_server.url + "/missing.tar.gz"
    with pytest.raises(DatasetError) as err:
        data.download_cifar10(root, url=url, md5=None, progress=False)
    msg = str(err.value)
    assert url in msg and "404" in msg
    assert list(root.iterdir()) == []


def test_download_connection_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "root"
    with pytest.raises(DatasetError, match="download failed"):
        data.download_cifar10(root, url=f"http://127.0.0.1:{port}/c.tar.gz", md5=None, progress=False, timeout=5)
    assert list(root.iterdir()) == []


def test_download_server_closes_early(tmp_path, http_server, good_archive):
    body = good_archive[0].read_bytes()
    http_server.short["/short.tar.gz"] = (body[: len(body) // 2], len(body))
    root = tmp_path / "root"
    with pytest.raises(DatasetError, match=rf"download ended after {len(body) // 2} of {len(body)} bytes"):
        data.download_cifar10(root, url=http_server.url + "/short.tar.gz", md5=_md5(body), progress=False)
    assert list(root.iterdir()) == []


def test_download_server_stalls(tmp_path, http_server, good_archive):
    body = good_archive[0].read_bytes()
    http_server.stall["/slow.tar.gz"] = body[:1000]
    root = tmp_path / "root"
    t0 = time.perf_counter()
    with pytest.raises(DatasetError, match="slow.tar.gz"):
        data.download_cifar10(root, url=http_server.url + "/slow.tar.gz", md5=None, progress=False, timeout=0.5)
    assert time.perf_counter() - t0 < 5
    assert list(root.iterdir()) == []


def test_download_keeps_existing_folder(tmp_path, http_server, good_archive, fake, small_batches):
    """Extracting over an existing dataset folder leaves it as it was (no merge, no clobber)."""
    body = good_archive[0].read_bytes()
    http_server.routes["/c.tar.gz"] = body
    root = tmp_path / "root"
    existing = fake.write_py_tree(root, small_batches, seed=11)
    data.download_cifar10(root, url=http_server.url + "/c.tar.gz", md5=_md5(body), progress=False)
    assert torch.equal(load_split(root, train=True, verify_md5=False).images, existing.train_images)
    assert fake.leftovers(root) == []


# ---------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_splits(cifar10_root):
    return load_cifar10(cifar10_root)


@pytest.mark.realdata
def test_real_cifar10_shapes_and_classes(real_splits):
    train, test = real_splits
    assert train.images.shape == (50_000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (10_000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert torch.bincount(train.labels, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10


@pytest.mark.realdata
def test_real_cifar10_channel_means(real_splits):
    train, _ = real_splits
    sums = train.images.sum(dim=(0, 2, 3), dtype=torch.int64).double()
    mean = sums / (train.images.numel() / 3) / 255
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64), atol=1e-3)


@pytest.mark.realdata
def test_real_cifar10_train_split_loads_fast(cifar10_root):
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        load_split(cifar10_root, train=True)
        times.append(time.perf_counter() - t0)
    assert min(times) < 2.0, f"loading the training split took {min(times):.2f} s at best"


# ---------------------------------------------------------------------------- synthetic data


def test_synthetic_shapes_and_balance():
    train, test = data.synthetic_cifar10(n_train=300, n_test=120, seed=1)
    assert train.images.shape == (300, 3, 32, 32) and test.images.shape == (120, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.bincount(train.labels, minlength=10).tolist() == [30] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [12] * 10
    assert int(train.images.min()) < 30 and int(train.images.max()) > 225  # uses the whole range


def test_synthetic_deterministic_by_seed():
    a_train, a_test = data.synthetic_cifar10(n_train=200, n_test=50, seed=5)
    b_train, b_test = data.synthetic_cifar10(n_train=200, n_test=50, seed=5)
    c_train, _ = data.synthetic_cifar10(n_train=200, n_test=50, seed=6)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_train.labels, b_train.labels)
    assert torch.equal(a_test.images, b_test.images) and torch.equal(a_test.labels, b_test.labels)
    assert not torch.equal(a_train.images, c_train.images)
    assert not torch.equal(a_train.labels, c_train.labels)
    assert not torch.equal(a_train.images, a_test.images[:1].expand(200, -1, -1, -1))


def test_synthetic_train_and_test_differ():
    train, test = data.synthetic_cifar10(n_train=100, n_test=100, seed=0)
    assert not torch.equal(train.images, test.images)


def test_synthetic_is_learnable():
    """Logistic regression on 8x8-pooled pixels, trained for a moment, clearly beats chance (10%) on held-out data."""
    torch.manual_seed(0)
    train, test = data.synthetic_cifar10(n_train=1000, n_test=500, seed=0)

    def features(s):
        return torch.nn.functional.avg_pool2d(s.images.float() / 255 - 0.5, 8).flatten(1), s.labels

    x, y = features(train)
    xt, yt = features(test)
    model = torch.nn.Linear(x.shape[1], 10)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.5, f"test accuracy {acc:.2%}"


def test_save_py_batch_round_trip_is_official_format(tmp_path):
    """save_py_batch writes bytes keys and a (N, 3072) uint8 array, like the official pickles."""
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    path = tmp_path / "b"
    data.save_py_batch(path, images, torch.arange(5))
    raw = pickle.load(io.BytesIO(path.read_bytes()), encoding="bytes")
    assert set(raw) >= {b"data", b"labels"}
    assert raw[b"data"].shape == (5, 3072) and raw[b"data"].dtype == np.uint8
    assert raw[b"data"][2, 1024] == images[2, 1, 0, 0]  # channel-major rows


def test_md5_is_checked_once_per_unchanged_file(tmp_path, monkeypatch):
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"some bytes")
    expected = hashlib.md5(b"some bytes").hexdigest()
    data.check_md5_once(path, expected)

    def no_hashing(p, *args):
        raise AssertionError("hashed again although the file did not change")

    monkeypatch.setattr(data, "md5sum", no_hashing)
    data.check_md5_once(path, expected)
    monkeypatch.undo()
    path.write_bytes(b"other bytes")  # new size and time: hashed again, and refused
    with pytest.raises(DatasetError, match="does not match the official"):
        data.check_md5_once(path, expected)
