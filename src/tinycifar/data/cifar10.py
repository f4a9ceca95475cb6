"""CIFAR-10 on disk: find it, check it, read it safely, download it atomically.

The python-version batches are pickles. They are read with ``SafeUnpickler``, which
admits only the numpy globals the official files use, so a crafted batch cannot run
code. Everything that can be wrong with a file (missing, truncated, bad md5, wrong
shape, dtype, count or label) raises ``DatasetError`` naming that file.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import math
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import atomic_write_bytes, current_umask

# The training split's per-channel mean on the 0..1 scale (what loader.channel_stats computes from it)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
PY_DIR = "cifar-10-batches-py"
BIN_DIR = "cifar-10-batches-bin"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
# The sums torchvision checks; the binary version has no published per-file sums.
PY_MD5 = {
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
IMAGES_PER_BATCH = 10_000
RECORD_BYTES = 1 + 3 * 32 * 32  # binary version: label byte then the image


class DatasetError(Exception):
    """The dataset on disk is missing, damaged or not CIFAR-10; the message names the file."""


@dataclass
class Split:
    """One split held in memory: uint8 images (N, 3, H, W), int64 labels (N,) and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] = CLASSES

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------- safe unpickling

# Only these dtypes, in any byte order, can be rebuilt: enough for images and labels.
_SAFE_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1"}


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("latin1")
    if isinstance(value, str):
        return value
    raise pickle.UnpicklingError(f"expected a string, found {type(value).__name__}")


class _DtypeStub:
    """Stands in for ``numpy.dtype`` while unpickling; becomes a real dtype only once checked.

    numpy's own ``dtype.__setstate__`` and ``ndarray.__setstate__`` trust their input, and a
    damaged file can crash the interpreter inside them; these stubs validate first.
    """

    def __init__(self, descr: object = None, align: object = False, copy: object = True):
        kind = _text(descr)
        if kind not in _SAFE_DTYPES:
            raise pickle.UnpicklingError(f"dtype {kind!r} is not one a CIFAR-10 batch uses")
        self.kind, self.order = kind, "|"

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) < 2:
            raise pickle.UnpicklingError("malformed dtype state")
        order = _text(state[1])
        if order not in ("|", "<", ">", "="):
            raise pickle.UnpicklingError(f"malformed dtype byte order {order!r}")
        self.order = order

    def dtype(self) -> np.dtype:
        return np.dtype((">" if self.order == ">" else "<") + self.kind)


def _array_from_bytes(dtype: _DtypeStub, raw: bytes, shape: tuple[int, ...], order: str = "C") -> np.ndarray:
    """The one place the file's bytes become an array: only once their count fits the shape."""
    dt = dtype.dtype()
    count = math.prod(shape)
    if count * dt.itemsize != len(raw):
        raise pickle.UnpicklingError(f"array of shape {shape} needs {count * dt.itemsize} bytes, found {len(raw)}")
    return np.frombuffer(raw, dtype=dt).reshape(shape, order=order).copy()


class _ArrayStub:
    """Stands in for ``numpy.ndarray`` while unpickling; ``__setstate__`` checks and builds it."""

    def __init__(self, cls: object = None, shape: object = None, typecode: object = None):
        self.value: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("malformed array state")
        _, shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and all(type(d) is int and 0 <= d < 2**31 for d in shape)):
            raise pickle.UnpicklingError(f"malformed array shape {shape!r}")
        if not isinstance(dtype, _DtypeStub) or not isinstance(raw, bytes) or not isinstance(fortran, int):
            raise pickle.UnpicklingError("malformed array state")
        self.value = _array_from_bytes(dtype, raw, shape, order="F" if fortran else "C")


def _scalar(dtype: object, raw: object = b"") -> np.generic:
    if not isinstance(dtype, _DtypeStub) or not isinstance(raw, bytes):
        raise pickle.UnpicklingError("malformed numpy scalar")
    return _array_from_bytes(dtype, raw, ())[()]


def _latin1_bytes(text: object, encoding: object = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 writes bytes at protocol 2 (``encode(str, 'latin1')``), and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is admitted only to turn a str into latin-1 bytes")
    return text.encode("latin1")


def _frombuffer(buf: object, dtype: object, shape: object, order: object = "C") -> np.ndarray:
    """numpy's protocol-5 array constructor, with the checks of ``_ArrayStub`` (in-band buffers only)."""
    if not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, _DtypeStub) or order not in ("C", "F"):
        raise pickle.UnpicklingError("malformed protocol-5 array")
    if not (isinstance(shape, tuple) and all(type(d) is int and 0 <= d < 2**31 for d in shape)):
        raise pickle.UnpicklingError(f"malformed array shape {shape!r}")
    return _array_from_bytes(dtype, bytes(buf), shape, order=order)


_NUMPY_STAND_INS = {"_reconstruct": _ArrayStub, "ndarray": _ArrayStub, "dtype": _DtypeStub, "scalar": _scalar}
_NUMPY_MODULES = {"numpy", "numpy.core.multiarray", "numpy._core.multiarray"}
# what re-saving the batches from Python 3 adds: protocol 2 writes bytes through _codecs.encode,
# protocol 5 writes arrays through numpy's _frombuffer
_OTHER_STAND_INS = {("_codecs", "encode"): _latin1_bytes, ("numpy.core.numeric", "_frombuffer"): _frombuffer,
                    ("numpy._core.numeric", "_frombuffer"): _frombuffer}


class SafeUnpickler(pickle.Unpickler):
    """Admits dicts, lists, bytes, str, numbers and numpy arrays and scalars of plain dtypes.

    numpy's globals (and ``_codecs.encode`` for protocol-2 bytes) are replaced by validating
    stand-ins, so neither foreign code nor numpy's unchecked reconstruction runs on the file's bytes.
    """

    def find_class(self, module: str, name: str):
        if module in _NUMPY_MODULES and name in _NUMPY_STAND_INS:
            return _NUMPY_STAND_INS[name]
        if (module, name) in _OTHER_STAND_INS:
            return _OTHER_STAND_INS[module, name]
        raise pickle.UnpicklingError(f"refused global {module}.{name}: not part of a CIFAR-10 batch")


def _materialize(obj: object) -> object:
    """Swap the array stand-ins left in the unpickled structure for the arrays they built."""
    if isinstance(obj, _ArrayStub):
        if obj.value is None:
            raise pickle.UnpicklingError("array without state")
        return obj.value
    if isinstance(obj, _DtypeStub):
        return obj.dtype()
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    return obj


def safe_load_batch(path: Path) -> dict:
    """Unpickle one python-version batch without running foreign code."""
    try:
        with open(path, "rb") as f:
            obj = _materialize(SafeUnpickler(f, encoding="bytes").load())
    except FileNotFoundError:
        raise DatasetError(f"{path}: file is missing") from None
    except pickle.UnpicklingError as e:
        raise DatasetError(f"{path}: not a safe CIFAR-10 batch ({e})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # damaged bytes fail in many ways: EOFError, KeyError, MemoryError (a huge frame size)...
        raise DatasetError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


# ---------------------------------------------------------------------------- validation


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_md5(path: Path, expected: str) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise DatasetError(
            f"{path}: md5 {actual} does not match the official {expected} "
            "(damaged or modified copy; pass --allow-modified to use it anyway)"
        )


def verified_cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinycifar" / "verified-md5.json"


def check_md5_once(path: Path, expected: str) -> None:
    """``check_md5``, skipped when this very file (path, size, modification time) already passed.

    Hashing the 180 MB of batches costs seconds on every run; the record of files that passed
    lives in the user's cache folder (``$XDG_CACHE_HOME/tinycifar``), never in the data folder, and
    any change to a file's size or time hashes it again. A cache that cannot be read or written
    only means hashing every time.
    """
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns, expected]
    cache_path = verified_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if cache.get(key) == stamp:
        return
    check_md5(path, expected)
    cache[key] = stamp
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_path, lambda f: f.write(json.dumps(cache).encode()))
    except OSError:
        pass


def parse_py_batch(raw: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Check one unpickled batch and return images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    if "data" not in raw or "labels" not in raw:
        raise DatasetError(f"{path}: missing 'data' or 'labels' (keys: {sorted(map(str, raw))})")
    data, labels = raw["data"], raw["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be a uint8 array, found {kind}")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: 'data' must have shape (N, 3072), found {data.shape}")
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError) as e:
        raise DatasetError(f"{path}: 'labels' is not a list of integers ({e})") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: 'labels' must be a flat list of integers, found {labels.dtype} {labels.shape}")
    if len(labels) != len(data):
        raise DatasetError(f"{path}: {len(data)} images but {len(labels)} labels")
    check_labels(labels, path)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def check_labels(labels: np.ndarray, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        bad = labels[(labels < 0) | (labels > 9)][0]
        raise DatasetError(f"{path}: label {int(bad)} out of range 0..9")


def check_count(n: int, expected: int, path: Path) -> None:
    if n != expected:
        raise DatasetError(f"{path}: holds {n} images, expected {expected}")


def read_bin_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file is missing") from None
    if raw.size % RECORD_BYTES:
        raise DatasetError(
            f"{path}: {raw.size} bytes is not a whole number of {RECORD_BYTES}-byte records (truncated?)"
        )
    records = raw.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    check_labels(labels, path)
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


# ---------------------------------------------------------------------------- loading


def find_layout(root: Path) -> str:
    """Which version lives in ``root``: 'py', 'bin' or 'archive'."""
    if (root / PY_DIR).is_dir():
        return "py"
    if (root / BIN_DIR).is_dir():
        return "bin"
    if (root / ARCHIVE_NAME).is_file():
        return "archive"
    raise DatasetError(
        f"{root}: no CIFAR-10 found (expected {PY_DIR}/, {BIN_DIR}/ or {ARCHIVE_NAME}); "
        "run `tinycifar download --data DIR` to fetch it (training downloads it unless --no-download)"
    )


def _load_files(paths: list[Path], reader, expected: int, verify_md5: bool) -> Split:
    images, labels = [], []
    for path in paths:
        if not path.is_file():
            raise DatasetError(f"{path}: file is missing")
        if verify_md5 and path.name in PY_MD5:
            check_md5_once(path, PY_MD5[path.name])
        x, y = reader(path)
        check_count(len(y), IMAGES_PER_BATCH, path)
        images.append(x)
        labels.append(y)
    x, y = np.concatenate(images), np.concatenate(labels)
    check_count(len(y), expected, paths[0].parent)
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))


def load_split(root: str | Path, train: bool, verify_md5: bool = True) -> Split:
    """Read the training (50,000) or test (10,000) split from any supported layout."""
    root = Path(root)
    layout = find_layout(root)
    if layout == "archive":
        extract_archive(root / ARCHIVE_NAME, root, md5=ARCHIVE_MD5 if verify_md5 else None)
        layout = "py"
    names = list(TRAIN_BATCHES) if train else [TEST_BATCH]
    expected = IMAGES_PER_BATCH * len(names)
    if layout == "py":
        reader = lambda p: parse_py_batch(safe_load_batch(p), p)  # noqa: E731
        return _load_files([root / PY_DIR / n for n in names], reader, expected, verify_md5)
    return _load_files([root / BIN_DIR / f"{n}.bin" for n in names], read_bin_batch, expected, False)


def load_cifar10(root: str | Path, verify_md5: bool = True, download: bool = False, url: str = URL,
                 archive_md5: str | None = ARCHIVE_MD5) -> tuple[Split, Split]:
    """Train and test splits; with ``download`` fetch the archive when nothing is found."""
    root = Path(root)
    if download and not any((root / p).exists() for p in (PY_DIR, BIN_DIR, ARCHIVE_NAME)):
        download_cifar10(root, url=url, md5=archive_md5)
    return load_split(root, True, verify_md5), load_split(root, False, verify_md5)


# ---------------------------------------------------------------------------- download


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Refuse members that could land outside the destination (.., absolute, links, devices)."""
    members = tar.getmembers()
    for m in members:
        parts = Path(m.name).parts
        if m.name.startswith(("/", "\\")) or Path(m.name).is_absolute() or ".." in parts:
            raise DatasetError(f"{archive}: member {m.name!r} would be written outside the dataset folder")
        if not (m.isfile() or m.isdir()):
            raise DatasetError(f"{archive}: member {m.name!r} is a link or special file; refused")
    return members


def extract_archive(archive: Path, root: Path, md5: str | None = ARCHIVE_MD5) -> None:
    """Check and unpack the archive into a temporary folder, then move it into place atomically."""
    if md5 is not None:
        actual = md5sum(archive)
        if actual != md5:
            raise DatasetError(f"{archive}: md5 {actual} does not match the expected {md5}")
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = _safe_members(tar, archive)
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            if isinstance(e, DatasetError):
                raise
            raise DatasetError(f"{archive}: not a readable tar.gz archive ({e})") from None
        extracted = Path(tmp) / PY_DIR
        if not extracted.is_dir():
            raise DatasetError(f"{archive}: does not contain {PY_DIR}/")
        target = root / PY_DIR
        if not target.exists():
            os.chmod(extracted, 0o777 & ~current_umask())  # TemporaryDirectory made it 0700
            os.replace(extracted, target)


def download_cifar10(root: str | Path, url: str = URL, md5: str | None = ARCHIVE_MD5,
                     progress: bool = True, timeout: float = 60.0) -> Path:
    """Stream the archive to a temporary file, check it, extract it; nothing half-done is left."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".download-", suffix=".tar.gz")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except OSError as e:
                if isinstance(e, urllib.error.HTTPError):
                    e.close()  # it holds the open connection
                raise DatasetError(f"{url}: download failed ({e})") from None
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {ARCHIVE_NAME}",
                          disable=not progress) as bar:
                    try:
                        while block := response.read(1 << 20):
                            out.write(block)
                            bar.update(len(block))
                    except (OSError, http.client.HTTPException) as e:  # stalled, reset or cut short
                        raise DatasetError(f"{url}: download failed after {out.tell()} bytes ({e!r})") from None
            if total is not None and out.tell() != total:
                raise DatasetError(f"{url}: download ended after {out.tell()} of {total} bytes")
        extract_archive(tmp, root, md5=md5)
    finally:
        tmp.unlink(missing_ok=True)
    return root / PY_DIR


# ---------------------------------------------------------------------------- synthetic data


def synthetic_cifar10(n_train: int = 2000, n_test: int = 500, seed: int = 0,
                      noise: float = 40.0) -> tuple[Split, Split]:
    """A CIFAR-shaped, learnable dataset: one smooth colour pattern per class, shifted and noised.

    Deterministic by ``seed``; a small network beats chance on it within seconds.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(10, 3, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(40, 40), mode="bilinear", align_corners=False)

    def make(n: int) -> Split:
        labels = torch.arange(n) % 10
        labels = labels[torch.randperm(n, generator=g)]
        dy, dx = torch.randint(0, 9, (2, n), generator=g)
        rows = (dy[:, None] + torch.arange(32))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(32))[:, None, None, :]
        base = templates[labels[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        images = base * 255 + noise * torch.randn(n, 3, 32, 32, generator=g)
        return Split(images.clamp(0, 255).round().to(torch.uint8), labels.long())

    return make(n_train), make(n_test)


def save_py_batch(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write a python-version batch (the official format), e.g. for tests and exports."""
    raw = {b"batch_label": b"tinycifar", b"labels": labels.tolist(),
           b"data": images.reshape(len(labels), -1).numpy(), b"filenames": [b"x.png"] * len(labels)}
    buf = io.BytesIO()
    pickle.dump(raw, buf, protocol=4)
    path.write_bytes(buf.getvalue())

