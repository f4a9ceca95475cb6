"""``tinycifar serve``: a web page and a JSON API for trained networks.

The page (``static/``: plain HTML, CSS and JavaScript, nothing loaded from elsewhere) lets a
person drop, pick or paste images, browse the CIFAR-10 test set and its most confident
mistakes, and see the top-5 classes with a Grad-CAM overlay; a model card shows the network,
its size, receptive field, test accuracy per class and training curves.

The API, described at ``/openapi.json``:

- ``POST /api/predict?model=&top_k=5&gradcam=0``: multipart upload, field ``file`` (repeatable);
  ``{"model", "results": [{"filename", "top": [{"label", "index", "prob"}], "input_png",
  "gradcam_png"?}], "errors": [{"filename", "error"}]}``. Images go through the same
  preprocessing as ``tinycifar predict`` (``predict.load_image``). A file that is no usable image
  is listed in ``errors`` and the others are still answered; when none is usable: 400. A request
  larger than ``max_upload_mb``: 413. Uploads stay in memory (Starlette spools a part over 1 MB
  to an anonymous temporary file, gone when the request ends); nothing else touches the disk.
- ``POST /api/predict-test?index=``: the same for one CIFAR-10 test image (``true_label`` added).
- ``GET /api/models``, ``GET /api/model?model=`` (the model card), ``GET /api/gallery``,
  ``GET /healthz``.

Every answer, refusals included, is described in ``/openapi.json`` by the models of ``schemas.py``;
``tests/test_server_fuzz.py`` holds the server to that description with generated requests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Query, UploadFile  # the serve extra
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

from .. import __version__
from ..checkpoint import CheckpointError, load_checkpoint, recorded_source
from ..config import ConfigError
from ..data import CLASSES, Split, classes_of, image_size_of
from ..data.images import ImageLoadError, load_image
from ..models.registry import ModelError, parse_spec, resolve, sha256_of
from ..models.summary import model_summary
from ..reports.report import find_gradcam_layer, grad_cam, read_history, upsample_cam
from .engines import MicroBatcher, OnnxEngine, TorchEngine
from .inference import NormalizedNet, inference_model, run_split, to_unit_float
from .schemas import Gallery, Health, ModelCard, ModelEntry, Predictions, refusals

STATIC = Path(__file__).with_name("static")
MAX_TOP_K = 100  # asked for more than a model's classes, a request gets them all


@dataclass
class ServedModel:
    name: str
    checkpoint: Path
    model: NormalizedNet  # PyTorch, for Grad-CAM whatever the engine
    batcher: MicroBatcher
    cam_layer: str
    card: dict[str, Any]
    test: Split | None = None
    test_probs: torch.Tensor | None = None  # softmax of every test image, for the gallery
    mistakes: list[int] = field(default_factory=list)  # test indices, most confident first
    classes: tuple[str, ...] = CLASSES
    image_size: int = 32


# ---------------------------------------------------------------------------- loading


def spec_for(state: dict[str, Any], specs: list[str]) -> str | None:
    """Which of the named network files belongs to this checkpoint: the one whose sha256 matches.

    None for a registered network; the only spec when one was named (a mismatch is then refused
    by ``model_from_checkpoint`` with its own message). Files are hashed, not imported.
    """
    recorded = recorded_source(state)
    if not recorded.is_user_code or not specs:
        return None
    for spec in specs:
        kind, target, _ = parse_spec(spec)
        is_file = kind == "file" and Path(target).is_file()
        if (sha256_of(target) if is_file else resolve(spec)[1].sha256) == recorded.sha256:
            return spec
    return specs[0] if len(specs) == 1 else None


def _png(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def image_png(image: torch.Tensor) -> str:
    """A (3, H, W) 0..1 image as base64 PNG."""
    return _png((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def cam_png(cam: torch.Tensor) -> str:
    """A (H, W) 0..1 Grad-CAM map as a base64 PNG in the report's colours (jet)."""
    import matplotlib

    rgba = matplotlib.colormaps["jet"](cam.numpy())
    return _png((rgba[..., :3] * 255).round().astype(np.uint8))


def evaluate_test_set(batcher: MicroBatcher, test: Split, batch: int = 500) -> torch.Tensor:
    """Softmax probabilities of the whole test set, through the serving engine."""
    return torch.cat([batcher.engine.logits(to_unit_float(test.images[i : i + batch])).softmax(1)
                      for i in range(0, len(test), batch)])


def load_served_model(checkpoint: str | Path, specs: list[str], engine: str = "pytorch", int8: bool = False,
                      data: str | Path | None = None, allow_changed_source: bool = False, name: str | None = None,
                      max_batch: int = 256, threads: int = 0) -> ServedModel:
    """A checkpoint ready to serve: its engine, Grad-CAM layer, model card, and (when the test set
    can be read) its predictions on every test image for the gallery and the mistakes view."""
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    model = inference_model(state, checkpoint, spec_for(state, specs), allow_changed_source)
    config = dict(state.get("config", {}))
    if engine == "onnxruntime":
        runner = OnnxEngine(model, config, int8=int8, data=data, threads=threads)
    elif engine == "pytorch":
        runner = TorchEngine(model, image_size_of(state))
    else:
        raise ConfigError(f"--engine {engine}: expected pytorch or onnxruntime")
    batcher = MicroBatcher(runner, max_batch)
    name = name or (checkpoint.parent.name if checkpoint.parent.name else checkpoint.stem)
    summary = model_summary(model.model, name=str(state["model"]))
    layer, shape = find_gradcam_layer(model.model)
    card: dict[str, Any] = {
        "name": name, "network": str(state["model"]), "params": summary["params"], "macs": summary["macs"],
        "receptive_field": summary["receptive_field"], "checkpoint": str(checkpoint),
        "epoch": state.get("epoch"), "preset": config.get("preset"), "dataset": config.get("dataset", "cifar10"),
        "engine": runner.name, "gradcam_layer": f"{layer} ({shape[0]}x{shape[1]}x{shape[2]})",
        "classes": list(classes_of(state)), "test_accuracy": None, "per_class_accuracy": None,
        "history": [{k: h.get(k) for k in ("epoch", "train_loss", "test_loss", "train_acc", "test_acc")}
                    for h in read_history(checkpoint.parent, state)],
    }
    served = ServedModel(name, checkpoint, model, batcher, layer, card, classes=classes_of(state),
                         image_size=image_size_of(state))
    try:
        served.test = run_split(config, train=False, data=data)
    except Exception as e:  # noqa: BLE001 - no test set: the page works without its gallery
        card["test_set"] = f"not found ({e})"
        return served
    probs = evaluate_test_set(batcher, served.test)
    preds, labels = probs.argmax(1), served.test.labels
    right = preds == labels
    card["test_accuracy"] = round(100 * right.float().mean().item(), 2)
    card["per_class_accuracy"] = {c: round(100 * right[labels == i].float().mean().item(), 2)
                                  for i, c in enumerate(served.classes) if (labels == i).any()}
    card["test_set"] = f"{len(labels):,} images"
    wrong = (~right).nonzero().flatten()
    served.mistakes = wrong[probs[wrong, preds[wrong]].argsort(descending=True)].tolist()
    served.test_probs = probs
    return served


# ---------------------------------------------------------------------------- predictions


def top_k(probs: torch.Tensor, k: int, classes: tuple[str, ...]) -> list[dict[str, Any]]:
    values, indices = probs.topk(min(k, len(classes)))
    return [{"label": classes[i], "index": i, "prob": round(float(v), 6)}
            for v, i in zip(values.tolist(), indices.tolist(), strict=True)]


def cams(served: ServedModel, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    layer = served.model.model.get_submodule(served.cam_layer)
    return upsample_cam(grad_cam(served.model, layer, images, targets))


async def predict_images(served: ServedModel, names: list[str], images: torch.Tensor, k: int,
                         gradcam: bool) -> list[dict[str, Any]]:
    probs = (await served.batcher.logits(images)).softmax(1)
    results = [{"filename": n, "top": top_k(p, k, served.classes), "input_png": image_png(x)}
               for n, p, x in zip(names, probs, images, strict=True)]
    if gradcam:
        maps = await served.batcher.run(cams, served, images, probs.argmax(1))
        for r, m in zip(results, maps, strict=True):
            r["gradcam_png"] = cam_png(m)
    return results


def decode(data: bytes, size: int = 32) -> torch.Tensor:
    """One upload as the network's input; ImageLoadError names what is wrong."""
    if not data:
        raise ImageLoadError("empty file")
    return load_image(io.BytesIO(data), size)


# ---------------------------------------------------------------------------- the app


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, by header or as it streams in.

    A body that grows past the limit gets the 413 at once; the application then sees the client
    gone (``http.disconnect``) and whatever it answers is dropped.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen, started, rejected = 0, False, False

        async def counted():
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit and not started:
                    rejected = True
                    await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if not rejected:
                started = started or message["type"] == "http.response.start"
                await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not rejected:  # a real failure, not the body we cut off
                raise

    async def _reject(self, send) -> None:
        mb = self.limit / 1e6
        body = f'{{"detail": "upload larger than the {mb:g} MB limit (--max-upload-mb)"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(models: list[ServedModel], max_upload_mb: float = 8.0):
    """The FastAPI application serving ``models`` (the first is the default)."""
    by_name = {m.name: m for m in models}

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        for m in models:
            await m.batcher.close()

    app = FastAPI(title="tinycifar", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Classify 32x32 images with networks trained by tinycifar; Grad-CAM on request.")
    app.add_middleware(BodyLimit, limit=int(max_upload_mb * 1e6))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # The served names as an enum in /openapi.json: a client (and the fuzz test) learns them from
    # the description; a name outside it is still answered with a 404 listing them.
    served_model = Query(None, description="a served model (default: the first)",
                         json_schema_extra={"enum": list(by_name)})

    def pick(name: str | None) -> ServedModel:
        if name is None:
            return models[0]
        if name not in by_name:
            raise HTTPException(404, f"unknown model {name!r}; serving: {', '.join(by_name)}")
        return by_name[name]

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", summary="Liveness: the served models", responses={200: {"model": Health}})
    def healthz():
        return {"status": "ok", "models": list(by_name)}

    @app.get("/api/models", summary="The served models, the default first",
             responses={200: {"model": list[ModelEntry]}})
    def list_models():
        return [{"name": m.name, "network": m.card["network"], "test_accuracy": m.card["test_accuracy"]}
                for m in models]

    @app.get("/api/model", summary="The model card: network, size, receptive field, accuracy, curves",
             responses={200: {"model": ModelCard}, **refusals(404)})
    def model_card(model: str | None = served_model):
        return pick(model).card

    @app.get("/api/gallery", summary="CIFAR-10 test images (view=test) or the most confident mistakes",
             responses={200: {"model": Gallery}, **refusals(404)})
    def gallery(model: str | None = served_model, view: str = Query("test", pattern="^(test|mistakes)$"),
                offset: int = Query(0, ge=0), limit: int = Query(48, ge=1, le=200)):
        m = pick(model)
        if m.test is None:
            raise HTTPException(404, "no test set on this server (pass --data)")
        indices = m.mistakes if view == "mistakes" else range(len(m.test))
        chosen = list(indices[offset : offset + limit])
        probs, test = m.test_probs, m.test
        names = m.classes
        items = [{"index": i, "label": names[int(test.labels[i])], "png": image_png(to_unit_float(test.images[i])),
                  "predicted": names[int(probs[i].argmax())], "prob": round(float(probs[i].max()), 4)}
                 for i in chosen]
        return {"model": m.name, "view": view, "total": len(indices), "offset": offset, "items": items}

    @app.post("/api/predict", summary="Classify uploaded images (multipart field 'file', repeatable)",
              responses={200: {"model": Predictions}, **refusals(400, 404, 413)})
    async def predict(file: list[UploadFile] = File(..., min_length=1, description="one or more image files"),
                      model: str | None = served_model, top_k: int = Query(5, ge=1, le=MAX_TOP_K),
                      gradcam: bool = False):
        m = pick(model)
        names, images, errors = [], [], []
        for upload in file:
            name = upload.filename or "upload"
            data = await upload.read()
            try:
                images.append(await asyncio.to_thread(decode, data, m.image_size))
                names.append(name)
            except ImageLoadError as e:
                errors.append({"filename": name, "error": f"{name}: {e}"})
        if not images:
            detail = "; ".join(e["error"] for e in errors) or "no file uploaded (multipart field 'file')"
            return JSONResponse({"detail": detail, "errors": errors}, status_code=400)
        results = await predict_images(m, names, torch.stack(images), top_k, gradcam)
        return {"model": m.name, "results": results, "errors": errors}

    @app.post("/api/predict-test", summary="Classify one CIFAR-10 test image by its index",
              responses={200: {"model": Predictions}, **refusals(404)})
    async def predict_test(index: int = Query(..., ge=0), model: str | None = served_model,
                           top_k: int = Query(5, ge=1, le=MAX_TOP_K), gradcam: bool = False):
        m = pick(model)
        if m.test is None or index >= len(m.test):
            raise HTTPException(404, f"no test image {index}")
        image = to_unit_float(m.test.images[index : index + 1])
        results = await predict_images(m, [f"test image #{index}"], image, top_k, gradcam)
        results[0]["true_label"] = m.classes[int(m.test.labels[index])]
        return {"model": m.name, "results": results, "errors": []}

    return app


def serve(checkpoints: list[str], specs: list[str], host: str = "127.0.0.1", port: int = 8000,
          engine: str = "pytorch", int8: bool = False, data: str | None = None, allow_changed_source: bool = False,
          max_upload_mb: float = 8.0, max_batch: int = 256, threads: int = 0) -> None:
    """Load every checkpoint, then serve until interrupted."""
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    names: set[str] = set()
    models = []
    for path in checkpoints:
        try:
            m = load_served_model(path, specs, engine, int8, data, allow_changed_source, max_batch=max_batch,
                                  threads=threads)
        except ModelError as e:
            raise CheckpointError(f"{path}: {e}") from None
        while m.name in names:  # two runs with the same folder name
            m.name = m.card["name"] = f"{m.name}-{len(names) + 1}"
        names.add(m.name)
        models.append(m)
        print(f"serving {m.name}: {m.card['network']}, {m.card['params']:,} parameters, {m.card['engine']}, "
              f"test accuracy {m.card['test_accuracy'] if m.card['test_accuracy'] is not None else 'unknown'}",
              flush=True)
    print(f"open http://{host}:{port}/", flush=True)
    uvicorn.run(create_app(models, max_upload_mb), host=host, port=port, log_level="warning")
