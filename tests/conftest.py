"""Shared fixtures: fake CIFAR-10 trees on disk, tar archives and a local HTTP server.

The fake trees are format-correct (the official python-version pickles, or the binary
records) but hold only a few images per batch: ``IMAGES_PER_BATCH`` is monkeypatched
to match, so the loader's count checks stay active.
"""

from __future__ import annotations

import http.server
import io
import os
import pickle
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tinycifar.data import cifar10 as data

SMALL_BATCH = 20  # images per fake batch file


@dataclass
class FakeTree:
    """What a fake tree holds, to compare what the loader reads against."""

    root: Path
    train_images: torch.Tensor  # (5 * n, 3, 32, 32) uint8, in file order
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    @property
    def py_dir(self) -> Path:
        return self.root / data.PY_DIR

    @property
    def bin_dir(self) -> Path:
        return self.root / data.BIN_DIR


def _fake_images(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    return images, labels


def _fake_content(n: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {name: _fake_images(n, g) for name in (*data.TRAIN_BATCHES, data.TEST_BATCH)}


def _tree(root: Path, content: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> FakeTree:
    train = [content[name] for name in data.TRAIN_BATCHES]
    test_images, test_labels = content[data.TEST_BATCH]
    return FakeTree(root, torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_images, test_labels)


def write_py_tree(root: Path, n: int = SMALL_BATCH, seed: int = 0) -> FakeTree:
    """A cifar-10-batches-py folder in ``root``, written with ``save_py_batch``."""
    folder = root / data.PY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    content = _fake_content(n, seed)
    for name, (images, labels) in content.items():
        data.save_py_batch(folder / name, images, labels)
    meta = {b"label_names": [c.encode() for c in data.CLASSES], b"num_cases_per_batch": n, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
    return _tree(root, content)


def bin_records(images: torch.Tensor, labels: torch.Tensor) -> bytes:
    """The binary version's records: one label byte, then 1024 red, 1024 green, 1024 blue bytes."""
    flat = images.reshape(len(labels), -1).numpy()
    return np.concatenate([labels.numpy().astype(np.uint8)[:, None], flat], axis=1).tobytes()


def write_bin_tree(root: Path, n: int = SMALL_BATCH, seed: int = 0) -> FakeTree:
    """A cifar-10-batches-bin folder in ``root`` (data_batch_*.bin, test_batch.bin)."""
    folder = root / data.BIN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    content = _fake_content(n, seed)
    for name, (images, labels) in content.items():
        (folder / f"{name}.bin").write_bytes(bin_records(images, labels))
    (folder / "batches.meta.txt").write_text("\n".join(data.CLASSES) + "\n")
    return _tree(root, content)


@pytest.fixture
def one_thread():
    """Run torch on one thread: these tensors are tiny, and on a small shared machine two
    OpenMP threads fighting a busy neighbour make them many times slower, not faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_batches(monkeypatch) -> int:
    """Make the loader expect SMALL_BATCH images per batch file instead of 10,000."""
    monkeypatch.setattr(data, "IMAGES_PER_BATCH", SMALL_BATCH)
    return SMALL_BATCH


@pytest.fixture
def py_tree(tmp_path, small_batches) -> FakeTree:
    """A small python-version tree in ``tmp_path / 'root'``."""
    return write_py_tree(tmp_path / "root", small_batches)


@pytest.fixture
def bin_tree(tmp_path, small_batches) -> FakeTree:
    """A small binary-version tree in ``tmp_path / 'root'``."""
    return write_bin_tree(tmp_path / "root", small_batches)


# ---------------------------------------------------------------------------- archives


def make_tar_gz(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], tree: Path | None = None) -> bytes:
    """Write a .tar.gz at ``path`` and return its bytes.

    ``tree``: a folder added whole under its own name; ``members``: extra (name, bytes)
    files or ready TarInfo entries (links, odd names) added verbatim after it.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if tree is not None:
            tar.add(tree, arcname=tree.name)
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                name, payload = m
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def good_archive(tmp_path, small_batches) -> tuple[Path, FakeTree]:
    """A cifar-10-python.tar.gz (fake, small) built outside any dataset root."""
    src = tmp_path / "archive-src"
    tree = write_py_tree(src, small_batches, seed=3)
    path = tmp_path / "archives" / data.ARCHIVE_NAME
    path.parent.mkdir()
    make_tar_gz(path, [], tree=src / data.PY_DIR)
    return path, tree


def leftovers(root: Path) -> list[str]:
    """Temporary names the download and extraction must never leave behind."""
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".download-", ".extract-")))


# ---------------------------------------------------------------------------- local HTTP server


@dataclass
class LocalServer:
    """Serves ``routes`` (path -> bytes) on 127.0.0.1; see the handler for the special paths."""

    url: str
    routes: dict[str, bytes] = field(default_factory=dict)
    short: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # path -> (body, claimed length)
    stall: dict[str, bytes] = field(default_factory=dict)  # path -> first bytes, then silence
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def http_server():
    """A threaded http.server on an ephemeral port, shut down after the test."""
    state: dict = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):  # keep the test output clean
            pass

        def do_GET(self):
            srv: LocalServer = state["server"]
            srv.requests.append(self.path)
            if self.path in srv.routes:
                body = srv.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path in srv.short:
                body, claimed = srv.short[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(claimed))
                self.end_headers()
                self.wfile.write(body)  # then the connection closes: fewer bytes than promised
            elif self.path in srv.stall:
                body = srv.stall[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) * 10))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                srv.release.wait(10)  # silence until the test is over
            else:
                self.send_error(404, "no such file")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    state["server"] = local = LocalServer(url=f"http://{host}:{port}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield local
    finally:
        local.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def fake():
    """The helpers above, for tests that build their own trees and archives."""
    return SimpleNamespace(
        write_py_tree=write_py_tree,
        write_bin_tree=write_bin_tree,
        bin_records=bin_records,
        make_tar_gz=make_tar_gz,
        leftovers=leftovers,
        SMALL_BATCH=SMALL_BATCH,
    )


# ---------------------------------------------------------------------------- real data


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """$CIFAR10_ROOT when it holds the python version; otherwise the test is skipped."""
    root = os.environ.get("CIFAR10_ROOT")
    if not root or not (Path(root) / data.PY_DIR).is_dir():
        pytest.skip("set CIFAR10_ROOT to a folder holding cifar-10-batches-py to run the real-data tests")
    return Path(root)


@pytest.fixture(autouse=True, scope="session")
def private_cache_folder(tmp_path_factory):
    """The md5 record (data/cifar10.check_md5_once) goes to a folder of the test session's own."""
    import os

    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture
def broken_int8(monkeypatch):
    """A broken int8 quantization: calibrated on images 20x too dark, so real activations clip
    and a network that learned loses most of its accuracy (100% -> 28% measured)."""
    from tinycifar.serving import export

    real = export.quantize_int8
    monkeypatch.setattr(export, "quantize_int8",
                        lambda fp32, out, images, **kwargs: real(fp32, out, images * 0.05, **kwargs))
