"""``tinycifar predict``: every Pillow mode becomes a 32x32 RGB input; bad files are named and skipped."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from host_reads import OperatorNames
from PIL import Image
from tiny_run import train_tiny_run

from tinycifar.cli import main
from tinycifar.data import CLASSES
from tinycifar.data.images import MAX_PIXELS, ImageLoadError, load_image
from tinycifar.serving import predict
from tinycifar.serving.inference import NormalizedNet, folded, load_inference_model
from tinycifar.serving.predict import classify, expand_inputs, predict_files


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("run") / "run") / "best.pt"


def noise(size=(40, 30), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    return rgb.convert(mode)


def sixteen_bit(value: int, mode: str) -> Image.Image:
    img = Image.fromarray(np.full((20, 20), value, dtype=np.uint16 if mode == "I;16" else np.int32))
    assert img.mode == mode
    return img


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG: it compresses ~1000:1 but decodes to one byte per pixel."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# ---------------------------------------------------------------------------- modes and geometry

GOOD = {
    "rgb.png": lambda: encoded(noise(), "PNG"),
    "photo.jpg": lambda: encoded(noise((300, 200)), "JPEG", quality=90),
    "cmyk.jpg": lambda: encoded(noise(mode="CMYK"), "JPEG"),
    "picture.webp": lambda: encoded(noise(), "WEBP"),
    "gray.png": lambda: encoded(noise(mode="L"), "PNG"),
    "palette.png": lambda: encoded(noise(mode="P"), "PNG"),
    "palette.gif": lambda: encoded(noise(mode="P"), "GIF"),
    "alpha.png": lambda: encoded(noise(mode="RGBA"), "PNG"),
    "gray-alpha.png": lambda: encoded(noise(mode="LA"), "PNG"),
    "bilevel.png": lambda: encoded(noise(mode="1"), "PNG"),
    "deep.png": lambda: encoded(sixteen_bit(40000, "I;16"), "PNG"),
    "int32.tiff": lambda: encoded(sixteen_bit(40000, "I"), "TIFF"),
    "float.tiff": lambda: encoded(Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)), "TIFF"),
    "tiny.bmp": lambda: encoded(noise((1, 1)), "BMP"),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_every_mode_loads_as_32x32_rgb(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(GOOD[name]())
    x = load_image(path)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(path)  # black under full transparency
    assert torch.equal(load_image(path), torch.ones(3, 32, 32))


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_uses_the_full_range(tmp_path, mode):
    for value, expected in ((65535, 1.0), (0, 0.0), (32896, 128 / 255)):
        path = tmp_path / f"v{value}.{'png' if mode == 'I;16' else 'tiff'}"
        sixteen_bit(value, mode).save(path)
        with Image.open(path) as img:
            assert img.mode == mode
        assert torch.allclose(load_image(path), torch.full((3, 32, 32), expected), atol=1e-6)


def test_centre_square_is_kept(tmp_path):
    """A wide image keeps its middle square: the blue side bands are cropped away, not squashed in."""
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))
    path = tmp_path / "wide.png"
    img.save(path)
    x = load_image(path)
    assert torch.allclose(x[0], torch.ones(32, 32)) and x[2].max() == 0


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 64, 16))  # top half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180: the viewer shows blue at the bottom
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    x = load_image(path)
    assert x[2, :8].mean() < 0.2 and x[2, -8:].mean() > 0.8


# ---------------------------------------------------------------------------- bad files


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD = {
    "text.png": (lambda: b"this is not an image\n", "not an image"),
    "empty.jpg": (lambda: b"", "not an image"),
    "cut.png": (lambda: truncated(encoded(noise((64, 64)), "PNG")), "cannot decode"),
    "cut.jpg": (lambda: truncated(encoded(noise((64, 64)), "JPEG")), "cannot decode"),
    "huge.png": (lambda: bilevel_png(8000, 8000), "decompression bomb"),  # 64 MP: over our limit
    "enormous.png": (lambda: bilevel_png(20000, 20000), "decompression bomb"),  # 400 MP: over Pillow's too
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_is_refused_with_a_reason(tmp_path, name):
    make, reason = BAD[name]
    path = tmp_path / name
    path.write_bytes(make())
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match=reason):
        load_image(path)
    assert time.perf_counter() - start < 2.0


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    """A 64-megapixel 1-bit PNG of 8 KB would take 64 MB to decode and 192 MB as RGB; the
    header check refuses it first, so a fresh process's peak memory barely moves."""
    assert MAX_PIXELS < 8000 * 8000
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bilevel_png(8000, 8000))
    assert bomb.stat().st_size < 20_000
    script = (
        "import resource, sys\n"
        "from tinycifar.data.images import ImageLoadError, load_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    load_image(sys.argv[1])\nexcept ImageLoadError:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 20_000  # KiB


def test_folders_are_walked_sorted_and_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/z.png", "a.jpg", "c.PNG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    listed = list(expand_inputs([tmp_path, tmp_path / "empty"]))
    assert [p.relative_to(tmp_path).as_posix() for p, _ in listed] == ["a.jpg", "b/z.png", "c.PNG", "empty"]
    assert [err for _, err in listed] == [None, None, None, "folder holds no image files"]


# ---------------------------------------------------------------------------- the command


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    (folder / "cat.png").write_bytes(encoded(noise(seed=1), "PNG"))
    (folder / "more" / "dog.jpg").write_bytes(encoded(noise((50, 80), seed=2), "JPEG"))
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "bomb.png").write_bytes(bilevel_png(20000, 20000))
    (folder / "readme.txt").write_text("skipped: not an image extension")
    return folder


def test_cli_predicts_good_files_and_names_bad_ones(checkpoint, mixed_folder, capsys):
    code = main(["predict", "--checkpoint", str(checkpoint), "--top-k", "2", str(mixed_folder),
                 str(mixed_folder / "missing.png")])
    out, err = capsys.readouterr()
    assert code == 1
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(mixed_folder / "cat.png"),
                                                      str(mixed_folder / "more" / "dog.jpg")]
    assert all(len(line.split(":")[1].split(",")) == 2 for line in lines)
    errors = err.strip().splitlines()
    assert len(errors) == 3
    for name, line in zip(("bomb.png", "broken.png", "missing.png"), errors, strict=True):
        assert name in line and line.startswith("tinycifar predict: ")


def test_predictions_are_the_networks_own_with_its_norms_folded(checkpoint, tmp_path, monkeypatch):
    image = tmp_path / "one.png"
    image.write_bytes(encoded(noise(), "PNG"))
    ops = OperatorNames()

    def watched(*args):  # only the classifying: loading a network runs it once, unfolded, to check it
        with ops:
            return classify(*args)

    monkeypatch.setattr(predict, "classify", watched)
    (got,) = predict_files(checkpoint, [image], top_k=10)
    assert ops.names and not any("batch_norm" in name for name in ops.names)
    model, _ = load_inference_model(checkpoint)
    with torch.no_grad():
        probs = model(load_image(image, 32)[None]).softmax(1)[0]
    assert dict(got.top) == pytest.approx(dict(zip(CLASSES, probs.tolist(), strict=True)), abs=1e-6)
    assert [p for _, p in got.top] == sorted((p for _, p in got.top), reverse=True)


def test_a_network_the_fold_would_change_is_predicted_unfolded():
    """predict and serve's engine fold through serving.inference.folded, whose probe keeps the norms here."""
    from test_layers import PreNormSkip

    net = NormalizedNet(PreNormSkip(), [0.5] * 3, [0.25] * 3).eval()
    net.model.block[1].running_mean.uniform_(-0.5, 0.5)
    with pytest.warns(UserWarning, match="runs unfolded"):
        served = folded(net, 8)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(served(x), net(x), atol=1e-6)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in served.modules())


def test_cli_json_output_parses(checkpoint, mixed_folder, capsys):
    code = main(["predict", "--checkpoint", str(checkpoint), "--json", "--top-k", "10", str(mixed_folder)])
    out, _ = capsys.readouterr()
    assert code == 1
    rows = json.loads(out)
    assert [Path(r["file"]).name for r in rows] == ["cat.png", "dog.jpg"]
    for r in rows:
        probs = [t["probability"] for t in r["top_k"]]
        assert sorted(t["class"] for t in r["top_k"]) == sorted(CLASSES)
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-4)


def test_cli_all_good_exits_zero(checkpoint, tmp_path, capsys):
    image = tmp_path / "one.webp"
    image.write_bytes(encoded(noise(), "WEBP"))
    assert main(["predict", "--checkpoint", str(checkpoint), str(image)]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")


@pytest.mark.parametrize("k", ["0", "11"])
def test_cli_refuses_top_k_out_of_range(checkpoint, tmp_path, k, capsys):
    assert main(["predict", "--checkpoint", str(checkpoint), "--top-k", k, str(tmp_path)]) == 2
    assert "--top-k" in capsys.readouterr().err


def test_cli_bad_checkpoint_is_exit_2(tmp_path, capsys):
    image = tmp_path / "one.png"
    image.write_bytes(encoded(noise(), "PNG"))
    assert main(["predict", "--checkpoint", str(tmp_path / "nope.pt"), str(image)]) == 2
    assert "nope.pt" in capsys.readouterr().err
