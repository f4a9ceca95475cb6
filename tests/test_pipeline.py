"""A user's albumentations pipeline as the augmentation backend, and `tinycifar aug export`."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

A = pytest.importorskip("albumentations")

from cli_helpers import one_line, run_main  # noqa: E402

from tinycifar.data import synthetic_cifar10  # noqa: E402
from tinycifar.data.augment import AugmentConfig  # noqa: E402
from tinycifar.data.loader import channel_stats  # noqa: E402
from tinycifar.data.pipeline import PipelineLoader, load_pipeline, policy_pipeline  # noqa: E402

TRAIN = ["train", "--dataset", "synthetic", "--set", "synthetic_size=256", "--epochs", "1", "--batch-size", "64",
         "--quiet", "--set", "low_res=0", "--set", "whiten_stem=false"]


def save(transforms: list, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        A.save(A.Compose(transforms), str(path), data_format="yaml" if str(path).endswith(".yaml") else "json")
    return str(path)


@pytest.fixture(scope="module")
def split():
    return synthetic_cifar10(64, 16)[0]


def test_aug_export_writes_a_file_albumentations_loads(tmp_path, capsys):
    out = tmp_path / "seed.yaml"
    rc, stdout, _ = run_main(capsys, ["aug", "export", "--out", out])
    assert rc == 0 and "seed policy" in stdout
    pipeline = A.load(str(out), data_format="yaml")
    names = [type(t).__name__ for t in pipeline.transforms]
    assert names == ["HorizontalFlip", "ShiftScaleRotate", "CoarseDropout"]
    rc, _, _ = run_main(capsys, ["aug", "export", "--preset", "fast", "--out", tmp_path / "fast.json"])
    fast = json.loads((tmp_path / "fast.json").read_text())
    assert rc == 0 and [t["__class_fullname__"] for t in fast["transform"]["transforms"]] == [
        "HorizontalFlip", "PadIfNeeded", "RandomCrop"]


def test_aug_export_refuses_what_albumentations_cannot_say(tmp_path, capsys):
    rc, _, err = run_main(capsys, ["aug", "export", "--preset", "best", "--out", tmp_path / "x.json"])
    one_line(rc, err, "alternate_flip")
    rc, _, err = run_main(capsys, ["aug", "export", "--preset", "fast", "--set", "aug.cutout_size=8",
                                   "--out", tmp_path / "x.json"])
    one_line(rc, err, "cutout")
    rc, _, err = run_main(capsys, ["aug", "export", "--preset", "fast", "--set", "aug.augmix=mix",
                                   "--out", tmp_path / "x.json"])
    one_line(rc, err, "aug.augmix: albumentations has no AugMix")
    assert not (tmp_path / "x.json").exists()


def test_train_with_a_pipeline_file(tmp_path, capsys):
    pipeline = save([A.HorizontalFlip(p=0.5), A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(8, 8),
                                                               hole_width_range=(8, 8), p=1.0)], tmp_path / "mine.yaml")
    rc, _, err = run_main(capsys, [*TRAIN, "--aug-pipeline", pipeline, "--aug-workers", "1", "--out", tmp_path / "run"])
    assert rc == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert config["aug_pipeline"] == pipeline and summary["epochs_run"] == 1


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_text("{"), "not a loadable albumentations pipeline"),
    (lambda p: p.write_text(json.dumps({"__version__": "2.0.8", "transform": {
        "__class_fullname__": "Compose", "p": 1.0, "transforms": [{"__class_fullname__": "NoSuchFlip", "p": 0.5}]}})),
     "unknown transform 'NoSuchFlip'"),
    (lambda p: save([A.HorizontalFlip(), A.Resize(24, 24)], p), "transform Resize"),
    (lambda p: save([A.ToFloat()], p), "transform ToFloat"),
    (lambda p: None, "file not found"),
])
def test_bad_pipeline_files_are_one_line_before_any_epoch(tmp_path, capsys, make, fragment):
    path = tmp_path / "pipe.json"
    make(path)
    rc, _, err = run_main(capsys, [*TRAIN, "--aug-pipeline", path, "--out", tmp_path / "run"])
    one_line(rc, err, str(path), fragment)
    assert not (tmp_path / "run").exists()


def batches(split, pipeline, workers: int, epoch: int) -> list[torch.Tensor]:
    mean, std = channel_stats(split.images)
    loader = PipelineLoader(split, 16, mean, std, pipeline, workers=workers, seed=3)
    loader.set_epoch(epoch)
    return [x for x, _ in loader]


def test_pipeline_loader_is_reproducible_and_changes_with_the_epoch(split):
    pipeline = policy_pipeline(AugmentConfig(policy="seed"), (125.0, 123.0, 114.0))
    first, again = batches(split, pipeline, 0, 0), batches(split, pipeline, 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, batches(split, pipeline, 0, 1), strict=True))
    in_workers = batches(split, pipeline, 2, 0)
    assert all(torch.equal(a, b) for a, b in zip(in_workers, batches(split, pipeline, 2, 0), strict=True))
    assert first[0].shape == (16, 3, 32, 32) and first[0].dtype == torch.float32


def test_pipeline_loader_takes_a_subset_and_says_which_images_each_batch_holds(split):
    mean, std = channel_stats(split.images)
    labelled = type(split)(split.images, torch.arange(len(split)))  # labels are indices
    loader = PipelineLoader(labelled, 4, mean, std, A.Compose([]), workers=0, seed=1, drop_last=True)
    loader.subset = torch.tensor([3, 60, 9, 41, 22, 17, 50, 1, 33, 12])
    taken = []
    for _, y in loader:
        assert torch.equal(loader.last_indices, y)
        taken += y.tolist()
    assert len(taken) == 8 == len(set(taken)) and set(taken) <= set(loader.subset.tolist())


class DeviceCopies(TorchDispatchMode):
    """The leading sizes of the tensors copied to another device."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if isinstance(out, torch.Tensor) and source is not None and out.device != source.device:
            self.sizes.append(len(source) if source.dim() else 1)
        return out


def test_pipeline_loader_moves_only_batches_to_its_device(split):
    """The workers read the split on the CPU: neither the split nor the epoch's permutation goes to the
    device (the meta device stands in for a GPU), only each batch."""
    mean, std = channel_stats(split.images)
    pipeline = policy_pipeline(AugmentConfig(policy="seed"), (125.0, 123.0, 114.0))
    with DeviceCopies() as copies:
        loader = PipelineLoader(split, 16, mean, std, pipeline, workers=0, seed=3, device="meta")
        out = [(x.device.type, y.device.type) for x, y in loader]
    assert out == [("meta", "meta")] * 4
    assert loader.images is split.images and loader.labels is split.labels
    assert len(split) not in copies.sizes and copies.sizes.count(16) == 8  # images and labels of 4 batches


def test_pipeline_batches_are_pinned_only_for_a_gpu(split):
    mean, std = channel_stats(split.images)
    pipeline = policy_pipeline(AugmentConfig(policy="seed"), (125.0, 123.0, 114.0))
    loader = PipelineLoader(split, 16, mean, std, pipeline, workers=0, device="meta")
    assert loader.batches().pin_memory is False
    loader.device = torch.device("cuda")  # what a run on a GPU sets; no batch is read here
    assert loader.batches().pin_memory is True


def test_loaded_pipeline_is_checked_transform_by_transform(tmp_path, split):
    ok = save([A.HorizontalFlip(), A.Rotate(limit=10, p=1.0)], tmp_path / "ok.json")
    assert [type(t).__name__ for t in load_pipeline(ok, split.images[:4]).transforms] == ["HorizontalFlip", "Rotate"]
