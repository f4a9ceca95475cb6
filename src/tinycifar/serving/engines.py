"""What runs the network for ``tinycifar serve``: PyTorch or ONNX Runtime, behind a micro-batcher.

Both engines take float RGB 0..1 batches (N, 3, 32, 32), the inference contract of
``NormalizedNet``, and return logits. The PyTorch engine computes in fp32 with its batch norms
folded, exactly like ``tinycifar predict``, so the same file gives the same answer through both.
The ONNX Runtime engine runs the model ``tinycifar export`` writes (fp32, or int8 with its
calibration, refused at start-up like ``export --int8`` refuses it when it loses more than a point
against fp32).

``MicroBatcher`` merges the images of requests that arrive together into one engine call:
requests queue up while the engine is busy, and the next call takes all of them (up to
``max_batch`` images), which is where a loaded server gets its throughput.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .export import write_onnx
from .inference import NormalizedNet, folded


class TorchEngine:
    """The network in eager fp32 with each batch norm folded into its convolution (as ``predict``
    and a test pass run it): fewer passes over the maps for the same logits up to float rounding.
    Grad-CAM hooks the server's own unfolded copy, whose layers are the checkpoint's."""

    name = "pytorch"

    def __init__(self, model: NormalizedNet, image_size: int):
        self.model = folded(model, image_size)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).float()


class OnnxEngine:
    """The exported ONNX model (int8: static QDQ quantization) in an ONNX Runtime session."""

    def __init__(self, model: NormalizedNet, config: dict, int8: bool = False, data: str | Path | None = None,
                 threads: int = 0):
        import onnxruntime as ort

        self.name = "onnxruntime-int8" if int8 else "onnxruntime"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            write_onnx(model, config, path, int8=int8, data=data)
            options = ort.SessionOptions()
            # idle pool threads sleep instead of spinning: in a server they would take the cores the
            # request handling needs (measured in benchmarks/README.md)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if threads:
                options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: images.numpy().astype(np.float32, copy=False)})[0]
        return torch.from_numpy(out)


@dataclass
class _Pending:
    images: torch.Tensor
    future: asyncio.Future


class MicroBatcher:
    """Collects concurrent requests and runs them through the engine as one batch.

    All model work (these batches and Grad-CAM) goes through one worker thread (``run``), so the
    event loop stays free to accept requests and the model is never used by two threads at once.
    """

    def __init__(self, engine, max_batch: int = 256):
        self.engine = engine
        self.max_batch = max_batch
        self.queue: asyncio.Queue[_Pending] | None = None
        self.worker: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the queue and worker belong to one event loop
        self.carry: _Pending | None = None  # taken from the queue but too big for the last batch
        self.lock = threading.Lock()
        self.calls = 0  # engine calls so far, and the images they held: what the tests look at
        self.images = 0

    def run_sync(self, fn, *args):
        with self.lock:
            return fn(*args)

    async def run(self, fn, *args):
        """``fn(*args)`` on the worker thread, one model task at a time."""
        return await asyncio.to_thread(self.run_sync, fn, *args)

    async def logits(self, images: torch.Tensor) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        if self.loop is not loop or self.worker is None or self.worker.done():  # first use, or a new server
            self.queue, self.carry, self.loop = asyncio.Queue(), None, loop
            self.worker = loop.create_task(self._work())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(images, future))
        return await future

    async def _work(self) -> None:
        while True:
            first, self.carry = self.carry or await self.queue.get(), None
            batch, count = [first], len(first.images)
            while not self.queue.empty():
                pending = self.queue.get_nowait()
                if count + len(pending.images) > self.max_batch:
                    self.carry = pending
                    break
                batch.append(pending)
                count += len(pending.images)
            try:
                logits = await self.run(self.engine.logits, torch.cat([p.images for p in batch]))
                self.calls += 1
                self.images += count
                start = 0
                for p in batch:
                    if not p.future.done():
                        p.future.set_result(logits[start : start + len(p.images)])
                    start += len(p.images)
            except Exception as e:  # noqa: BLE001 - hand the failure to every waiting request
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)

    async def close(self) -> None:
        if self.worker is not None and self.loop is asyncio.get_running_loop():
            self.worker.cancel()
            self.worker = None
