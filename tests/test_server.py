"""`tinycifar serve`'s JSON API through the framework's test client: answers, bad input, batching."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time

import httpx2 as httpx
import pytest
import torch
from host_reads import OperatorNames
from PIL import Image
from serve_helpers import png_bytes, served_checkpoint
from test_predict import bilevel_png

from tinycifar.serving.predict import predict_files
from tinycifar.serving.server import STATIC, create_app, load_served_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return served_checkpoint(root / "fast-a"), served_checkpoint(root / "slim-b", model="slimres50k", seed=1)


@pytest.fixture(scope="module")
def served(checkpoints):
    return [load_served_model(c, []) for c in checkpoints]


@pytest.fixture(scope="module")
def client(served):
    from fastapi.testclient import TestClient

    with TestClient(create_app(served)) as c:
        yield c


def upload(*files: tuple[str, bytes]) -> list:
    return [("file", (name, data, "application/octet-stream")) for name, data in files]


def test_health_models_and_the_model_card(client, checkpoints):
    assert client.get("/healthz").json() == {"status": "ok", "models": ["fast-a", "slim-b"]}
    models = client.get("/api/models").json()
    assert [m["name"] for m in models] == ["fast-a", "slim-b"] and models[1]["network"] == "slimres50k"
    card = client.get("/api/model", params={"model": "slim-b"}).json()
    assert card["params"] == 51_258 and card["receptive_field"] == 61 and card["macs"] > 10_000_000
    assert 0 <= card["test_accuracy"] <= 100 and len(card["per_class_accuracy"]) == 10
    assert [h["epoch"] for h in card["history"]] == [1, 2] and card["engine"] == "pytorch"
    assert card["gradcam_layer"].startswith("features") and card["checkpoint"] == str(checkpoints[1])
    assert client.get("/api/model").json()["name"] == "fast-a"  # the first is the default


def test_predict_gives_what_tinycifar_predict_gives(client, checkpoints, tmp_path):
    data = png_bytes(3, (64, 50))
    (tmp_path / "a.png").write_bytes(data)
    body = client.post("/api/predict", files=upload(("a.png", data)), params={"top_k": 10}).json()
    (expected,) = predict_files(checkpoints[0], [tmp_path / "a.png"], top_k=10)
    got = body["results"][0]
    assert body["model"] == "fast-a" and got["filename"] == "a.png" and body["errors"] == []
    assert [t["label"] for t in got["top"]] == [c for c, _ in expected.top]
    assert [t["prob"] for t in got["top"]] == pytest.approx([p for _, p in expected.top], abs=1e-6)
    assert sum(t["prob"] for t in got["top"]) == pytest.approx(1, abs=1e-4)
    shown = Image.open(io.BytesIO(base64.b64decode(got["input_png"])))
    assert shown.size == (32, 32) and "gradcam_png" not in got


def test_several_files_top_k_and_gradcam(client):
    files = upload(*((f"img{i}.png", png_bytes(i)) for i in range(3)))
    body = client.post("/api/predict", files=files, params={"top_k": 2, "gradcam": 1, "model": "slim-b"}).json()
    assert [r["filename"] for r in body["results"]] == ["img0.png", "img1.png", "img2.png"]
    for r in body["results"]:
        assert len(r["top"]) == 2 and r["top"][0]["prob"] >= r["top"][1]["prob"]
        cam = Image.open(io.BytesIO(base64.b64decode(r["gradcam_png"])))
        assert cam.size == (32, 32) and cam.mode == "RGB"


def test_bad_files_are_named_and_the_good_ones_still_answered(client):
    files = upload(("good.png", png_bytes(1)), ("notes.txt", b"not an image"), ("empty.png", b""),
                   ("cut.png", png_bytes(2)[:60]), ("bomb.png", bilevel_png(8000, 8000)))
    response = client.post("/api/predict", files=files)
    body = response.json()
    assert response.status_code == 200 and [r["filename"] for r in body["results"]] == ["good.png"]
    errors = {e["filename"]: e["error"] for e in body["errors"]}
    assert set(errors) == {"notes.txt", "empty.png", "cut.png", "bomb.png"}
    assert errors["bomb.png"].startswith("bomb.png: ") and "decompression bomb" in errors["bomb.png"]
    assert "empty file" in errors["empty.png"] and "not an image" in errors["notes.txt"]


def test_a_request_with_no_usable_image_is_400_naming_the_file(client):
    response = client.post("/api/predict", files=upload(("notes.txt", b"hello")))
    assert response.status_code == 400 and "notes.txt" in response.json()["detail"]
    response = client.post("/api/predict", data={"other": "x"}, files=[("nofile", ("x", b"1"))])
    assert response.status_code == 422  # the multipart field 'file' is required


def test_over_the_size_limit_is_413_by_header_and_while_streaming(served):
    from fastapi.testclient import TestClient

    with TestClient(create_app(served, max_upload_mb=0.05)) as small:
        response = small.post("/api/predict", files=upload(("big.png", png_bytes(0, (400, 400)))))
        assert response.status_code == 413 and "0.05 MB" in response.json()["detail"]

        request = httpx.Request("POST", "http://x/", files=upload(("big.png", png_bytes(0, (400, 400)))))
        body, content_type = request.read(), request.headers["content-type"]

        def chunks():  # no Content-Length: the body is counted as it arrives
            for i in range(0, len(body), 8192):
                yield body[i : i + 8192]

        response = small.post("/api/predict", content=chunks(), headers={"content-type": content_type})
        assert response.status_code == 413
        assert small.get("/healthz").status_code == 200  # and the server goes on


def test_uploads_leave_nothing_on_disk(client, tmp_path, monkeypatch):
    import tempfile

    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    big = png_bytes(9, (900, 900))  # over the 1 MB that stays in memory
    assert len(big) > 1_000_000
    response = client.post("/api/predict", files=upload(("big.png", big), ("bad.png", b"x" * 1_200_000)))
    assert response.status_code == 200 and len(response.json()["results"]) == 1
    assert list(spool.iterdir()) == []


def test_unknown_routes_methods_models_and_options(client):
    assert client.get("/nope").status_code == 404
    assert client.get("/api/predict").status_code == 405
    response = client.get("/api/model", params={"model": "zzz"})
    assert response.status_code == 404 and "fast-a, slim-b" in response.json()["detail"]
    assert client.post("/api/predict", files=upload(("a.png", png_bytes())), params={"top_k": 101}).status_code == 422
    every = client.post("/api/predict", files=upload(("a.png", png_bytes())), params={"top_k": 11})
    assert len(every.json()["results"][0]["top"]) == 10  # more than the classes: all of them
    assert client.get("/api/gallery", params={"view": "all"}).status_code == 422


def test_gallery_mistakes_and_test_images(client, served):
    body = client.get("/api/gallery", params={"limit": 5, "offset": 2}).json()
    assert body["total"] == 100 and [i["index"] for i in body["items"]] == [2, 3, 4, 5, 6]
    mistakes = client.get("/api/gallery", params={"view": "mistakes", "limit": 200}).json()
    probs = [i["prob"] for i in mistakes["items"]]
    assert all(i["label"] != i["predicted"] for i in mistakes["items"]) and probs == sorted(probs, reverse=True)
    accuracy = served[0].card["test_accuracy"]
    assert mistakes["total"] == round(100 - accuracy)
    result = client.post("/api/predict-test", params={"index": 6, "gradcam": 1}).json()["results"][0]
    assert result["true_label"] == body["items"][4]["label"] and "gradcam_png" in result
    assert client.post("/api/predict-test", params={"index": 100}).status_code == 404


def test_every_answer_matches_its_described_schema(client):
    """The bodies /openapi.json promises (serving/schemas.py, no undescribed key allowed) are what
    the handlers return; the fuzz test checks the same against a real server with generated input."""
    from pydantic import TypeAdapter

    from tinycifar.serving import schemas

    def answer(response, status: int):
        assert response.status_code == status, response.text
        return response.json()

    schemas.Health.model_validate(answer(client.get("/healthz"), 200))
    TypeAdapter(list[schemas.ModelEntry]).validate_python(answer(client.get("/api/models"), 200))
    schemas.ModelCard.model_validate(answer(client.get("/api/model", params={"model": "slim-b"}), 200))
    schemas.Gallery.model_validate(answer(client.get("/api/gallery", params={"view": "mistakes"}), 200))
    files = upload(("a.png", png_bytes(1)), ("notes.txt", b"text"))
    predicted = answer(client.post("/api/predict", files=files, params={"gradcam": 1}), 200)
    assert schemas.Predictions.model_validate(predicted).results[0].gradcam_png
    tested = answer(client.post("/api/predict-test", params={"index": 3}), 200)
    assert schemas.Predictions.model_validate(tested).results[0].true_label
    schemas.UnusableUploads.model_validate(answer(client.post("/api/predict", files=upload(("x.txt", b"x"))), 400))
    schemas.Error.model_validate(answer(client.get("/api/gallery", params={"model": "zzz"}), 404))


def test_openapi_describes_the_api_and_the_page_loads_nothing_from_elsewhere(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/model", "/api/models", "/healthz", "/api/gallery"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN
    page = client.get("/").text
    assert "/static/app.js" in page and "/static/style.css" in page
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        urls = set(re.findall(r"https?://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}  # a namespace name
        assert not urls, f"{name} refers to {urls}"
        assert client.get(f"/static/{name}").status_code == 200


def test_concurrent_requests_are_micro_batched(served):
    model = served[0]
    engine = model.batcher.engine
    real = engine.logits

    def slow(images):  # a busy engine: requests pile up meanwhile and go in together
        time.sleep(0.2)
        return real(images)

    async def burst():
        transport = httpx.ASGITransport(app=create_app([model]))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*(c.post("/api/predict", files=upload((f"{i}.png", png_bytes(i))))
                                          for i in range(8)))

    engine.logits = slow
    calls, images = model.batcher.calls, model.batcher.images
    try:
        responses = asyncio.run(burst())
    finally:
        engine.logits = real
    assert all(r.status_code == 200 for r in responses)
    assert model.batcher.images - images == 8
    assert model.batcher.calls - calls <= 3  # 8 single-image requests, merged


def test_the_pytorch_engine_runs_folded_norms_and_grad_cam_keeps_the_checkpoints_layers(served):
    served_model = served[0]
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with OperatorNames() as ops:
        folded = served_model.batcher.run_sync(served_model.batcher.engine.logits, images)
    assert ops.names and not any("batch_norm" in name for name in ops.names)
    with torch.no_grad():
        assert torch.allclose(folded, served_model.model(images), atol=1e-5)
    assert served_model.model.model.get_submodule(served_model.cam_layer)  # Grad-CAM's: the checkpoint's layers,
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in served_model.model.modules())  # norms and all
    assert not served_model.model.training


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_onnxruntime_engine_agrees_with_pytorch(checkpoints, int8):
    onnx = load_served_model(checkpoints[0], [], engine="onnxruntime", int8=int8)
    torch_model = load_served_model(checkpoints[0], [])
    images = torch.rand(16, 3, 32, 32)
    a, b = onnx.batcher.engine.logits(images), torch_model.batcher.engine.logits(images)
    agree = (a.argmax(1) == b.argmax(1)).float().mean().item()
    assert onnx.card["engine"] == ("onnxruntime-int8" if int8 else "onnxruntime")
    if int8:
        assert agree >= 0.75
    else:
        assert agree == 1.0 and torch.allclose(a, b, atol=1e-4)
    assert json.dumps(onnx.card)  # the card is plain JSON


def test_serve_int8_refuses_a_model_that_lost_accuracy(tmp_path, broken_int8, monkeypatch, capsys):
    """`serve --int8` builds its int8 model at start-up and measures it like `export --int8` does."""
    import uvicorn
    from tiny_run import train_learned_run

    from tinycifar.cli import main

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("a refused int8 model was served"))
    checkpoint = train_learned_run(tmp_path / "run") / "best.pt"
    assert main(["serve", "--checkpoint", str(checkpoint), "--engine", "onnxruntime", "--int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "points lower" in err and "refused" in err


def test_a_user_network_is_matched_to_its_file_by_content(tmp_path):
    from tiny_run import train_tiny_run

    from tinycifar.checkpoint import CheckpointError

    source = ("from torch import nn\n"
              "def Net():\n"
              "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
              "                         nn.Flatten(), nn.Linear(8, 10))\n")
    real, decoy = tmp_path / "real.py", tmp_path / "decoy.py"
    real.write_text(source)
    decoy.write_text(source + "# the same network, other bytes\n")
    run = train_tiny_run(tmp_path / "run", model=f"{real}:Net", whiten_stem=False, low_res=0)
    served = load_served_model(run / "best.pt", [f"{decoy}:Net", f"{real}:Net"])
    assert served.card["network"] == f"{real}:Net" and served.card["params"] == 3 * 8 * 9 + 8 + 8 * 10 + 10
    with pytest.raises(CheckpointError, match="differs from the one it was trained with"):
        load_served_model(run / "best.pt", [f"{decoy}:Net"])
    with pytest.raises(CheckpointError, match="pass --model"):
        load_served_model(run / "best.pt", [])
