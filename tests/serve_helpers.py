"""Checkpoints, images and a real server process for the server's tests."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
from PIL import Image
from tiny_run import train_tiny_run


def served_checkpoint(out: Path, model: str = "fastnet", seed: int = 0) -> Path:
    """best.pt of ``model`` after two quick epochs on 400 synthetic images (a 100-image test set)."""
    return train_tiny_run(out, model=model, seed=seed, synthetic_size=400, epochs=2, batch_size=100, low_res=0,
                          precision="auto") / "best.pt"


def png_bytes(seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    """A random RGB image of ``size`` (width, height) as PNG bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(serve_argv: list[str], env: dict[str, str], cwd: Path | None = None,
                   timeout: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real ``tinycifar serve`` process (``serve_argv`` without --port) on 127.0.0.1 and a free port.

    Yields its URL and the process once ``/healthz`` answers, and stops it at the end, so that a
    test sees the server a user starts: uvicorn, real sockets, real temporary files.
    """
    port = free_port()
    proc = subprocess.Popen([*serve_argv, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
            assert proc.poll() is None, proc.stdout.read()
        else:
            pytest.fail(f"the server did not come up in {timeout:g} s")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
