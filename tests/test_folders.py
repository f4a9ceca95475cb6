"""Training on your own images in class folders: layout, decoding, cache, class names everywhere."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from cli_helpers import one_line, run_main
from PIL import Image

from tinycifar.checkpoint import load_checkpoint
from tinycifar.data import folders
from tinycifar.data.cifar10 import DatasetError
from tinycifar.data.folders import load_image_folders
from tinycifar.data.images import load_image

CLASSES = ["cat", "dog", "owl"]


def make_folders(root, classes=CLASSES, train=12, test=4, seed=0):
    """One colour per class, images of assorted sizes and modes, as PNG and JPEG."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = 20 + 9 * (i % 4), 28 + 5 * (i % 3)
                pixels = (rng.uniform(0, 50, (h, w, 3)) + 90 * c).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(pixels)
                if i % 3 == 1:
                    img = img.convert("RGBA")
                if i % 3 == 2:
                    img.save(folder / f"{i}.jpg", quality=95)
                else:
                    img.save(folder / f"{i}.png")
    return root


TRAIN = ["train", "--dataset", "folder", "--epochs", "2", "--batch-size", "8", "--quiet", "--set", "low_res=0",
         "--set", "whiten_stem=false"]


def test_splits_classes_and_the_predict_preprocessing(tmp_path):
    root = make_folders(tmp_path / "pets")
    train, test = load_image_folders(root)
    assert train.classes == test.classes == tuple(CLASSES)
    assert train.images.shape == (36, 3, 32, 32) and train.images.dtype == torch.uint8 and len(test) == 12
    assert torch.bincount(train.labels).tolist() == [12, 12, 12]
    first = sorted((root / "train" / "cat").iterdir())[0]
    assert torch.equal(train.images[0], (load_image(first) * 255).round().to(torch.uint8))  # as predict sees it
    bigger, _ = load_image_folders(root, image_size=24)
    assert bigger.images.shape[-2:] == (24, 24)


def test_cache_is_used_and_rebuilt_when_files_change(tmp_path, monkeypatch):
    root = make_folders(tmp_path / "pets")
    first, _ = load_image_folders(root)
    assert (root / ".tinycifar-cache-32.pt").is_file()

    def no_decoding(*args):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(folders, "decode_image", no_decoding)
    again, _ = load_image_folders(root)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    monkeypatch.undo()
    Image.new("RGB", (40, 40), (250, 0, 0)).save(root / "train" / "owl" / "new.png")
    grown, _ = load_image_folders(root)
    assert len(grown) == len(first) + 1


def test_unreadable_files_are_listed_and_skipped_or_refused(tmp_path, capsys):
    root = make_folders(tmp_path / "pets")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    train, _ = load_image_folders(root)
    err = capsys.readouterr().err
    assert len(train) == 36 and "skipped 2 unreadable file(s)" in err and "notes.txt" in err and "broken.png" in err
    rc, _, err = run_main(capsys, [*TRAIN, "--data", root, "--strict", "--out", tmp_path / "run"])
    one_line(rc, err, "--strict")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage, fragment", [
    (lambda r: [p.unlink() for p in (r / "train" / "owl").iterdir()], "owl hold no readable images"),
    (lambda r: (r / "test" / "bat").mkdir(), "bat not in"),
    (lambda r: [p.rename(r / "spare" / p.name) for p in (r / "train").iterdir() if p.name != "cat"],
     "a classifier needs at least 2"),
    (lambda r: (r / "test").rename(r / "elsewhere"), "no test/ (or val/) folder"),
])
def test_layout_errors_are_one_line_and_leave_no_run_folder(tmp_path, capsys, damage, fragment):
    root = make_folders(tmp_path / "pets")
    (root / "spare").mkdir()
    damage(root)
    with pytest.raises(DatasetError, match=re.escape(fragment)):
        load_image_folders(root)
    rc, _, err = run_main(capsys, [*TRAIN, "--data", root, "--out", tmp_path / "run"])
    one_line(rc, err, fragment)
    assert not (tmp_path / "run").exists()


def test_val_folder_is_accepted(tmp_path):
    root = make_folders(tmp_path / "pets")
    (root / "test").rename(root / "val")
    assert len(load_image_folders(root)[1]) == 12


def test_a_folder_dataset_trains_end_to_end_with_its_class_names_everywhere(tmp_path, capsys):
    root = make_folders(tmp_path / "pets")
    run = tmp_path / "run"
    rc, _, err = run_main(capsys, [*TRAIN, "--data", root, "--out", run, "--model", "fastnet"])
    assert rc == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["model_kwargs"]["num_classes"] == 3 and config["dataset"] == "folder"
    state = load_checkpoint(run / "best.pt")
    assert state["classes"] == CLASSES

    rc, out, err = run_main(capsys, ["eval", "--checkpoint", run / "best.pt", "--json"])
    assert rc == 0, err
    report = json.loads(out)
    assert set(report["per_class"]) == set(CLASSES)
    assert report["ece"] >= abs(report["overconfidence"]) - 1e-9  # the mean gap can't exceed the binned one

    image = next((root / "test" / "owl").iterdir())
    rc, out, err = run_main(capsys, ["predict", "--checkpoint", run / "best.pt", "--json", image])
    assert rc == 0, err
    top = json.loads(out)[0]["top_k"]
    assert len(top) == 3 and {t["class"] for t in top} == set(CLASSES)

    rc, out, err = run_main(capsys, ["report", run])
    assert rc == 0, err
    assert (run / "confusion_matrix.png").is_file()


def test_exports_carry_the_class_names(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    root = make_folders(tmp_path / "pets", train=6, test=2)
    run = tmp_path / "run"
    assert run_main(capsys, [*TRAIN, "--epochs", "1", "--data", root, "--out", run, "--model", "fastnet"])[0] == 0
    rc, _, err = run_main(capsys, ["export", "--checkpoint", run / "best.pt", "--out", tmp_path / "m.onnx"])
    assert rc == 0, err
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["classes"]) == CLASSES and meta["image_size"] == "32"
    rc, _, err = run_main(capsys, ["export", "--checkpoint", run / "best.pt", "--format", "torchscript",
                                   "--out", tmp_path / "m.pt"])
    extra = {"classes": ""}
    torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    assert rc == 0 and json.loads(extra["classes"]) == CLASSES
