"""CIFAR-10-C-style corruptions and `tinycifar eval --corruptions`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import one_line, run_main
from tiny_run import train_tiny_run

pytest.importorskip("scipy")

from tinycifar.data import corruptions, synthetic_cifar10  # noqa: E402
from tinycifar.data.corruptions import (  # noqa: E402
    CORRUPTIONS,
    FAMILIES,
    cached_corruption,
    corrupt_image,
    parse_corruptions,
    parse_severities,
)
from tinycifar.evaluate import eval_batch_size  # noqa: E402

# corruptions whose CIFAR-10-C parameters grow in strength with the severity in a way the mean
# pixel change shows; glass blur, elastic transform and frost trade one parameter against another
MONOTONE = [n for n in CORRUPTIONS if n not in ("glass_blur", "elastic_transform", "frost")]
RANDOM = ["gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform"]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    train, _ = synthetic_cifar10(8, 10, noise=20.0)
    return train.images.permute(0, 2, 3, 1).numpy()


def change(images: np.ndarray, name: str, severity: int, seed: int = 0) -> float:
    return float(np.mean([np.abs(corrupt_image(img, name, severity, seed, i).astype(float) - img).mean()
                          for i, img in enumerate(images)]))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_changes_the_image_and_keeps_its_form(images, name):
    for severity in (1, 5):
        out = corrupt_image(images[0], name, severity, 0, 0)
        assert out.shape == images[0].shape and out.dtype == np.uint8
    assert change(images, name, 1) > 0.3 and change(images, name, 5) > 0.3


@pytest.mark.parametrize("name", MONOTONE)
def test_severities_are_ordered(images, name):
    changes = [change(images, name, s) for s in range(1, 6)]
    assert changes == sorted(changes) and changes[-1] > changes[0], changes


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_results_are_deterministic_for_a_seed(images, name):
    first = corrupt_image(images[1], name, 3, seed=7, index=1)
    assert np.array_equal(first, corrupt_image(images[1], name, 3, seed=7, index=1))
    other = corrupt_image(images[1], name, 3, seed=8, index=1)
    assert np.array_equal(first, other) == (name not in RANDOM)


def test_glass_blur_moves_each_pixel_at_most_one_step_up_or_left_as_cifar10c_did():
    # severity 1 blurs with sigma 0.05, a one-tap kernel: only the jitter changes pixels
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = corrupt_image(image, "glass_blur", 1, seed=0, index=0).astype(int)
    sources = np.stack([np.roll(image, (dr, dc), axis=(0, 1)) for dr in (0, 1) for dc in (0, 1)]).astype(int)
    near = (np.abs(sources - out).max(axis=-1) <= 1).any(axis=0)  # the uint8 round trip may lose one
    assert near[2:, 2:].all()
    assert (np.abs(out[:2] - image[:2]) <= 1).all() and (np.abs(out[:, :2] - image[:, :2]) <= 1).all()
    assert (np.abs(out - image) > 1).any(axis=-1).mean() > 0.3  # yet most pixels moved


def test_names_families_and_severities():
    assert len(CORRUPTIONS) == 15 and sorted(sum(FAMILIES.values(), ())) == sorted(CORRUPTIONS)
    assert parse_corruptions("all") == list(CORRUPTIONS)
    assert parse_corruptions("noise,contrast") == ["gaussian_noise", "shot_noise", "impulse_noise", "contrast"]
    assert parse_severities("1-5") == [1, 2, 3, 4, 5] and parse_severities("1,3-4") == [1, 3, 4]
    for bad in ("0-2", "6", "x", ""):
        with pytest.raises(ValueError, match="--severities"):
            parse_severities(bad)
    with pytest.raises(ValueError, match="unknown 'rain'"):
        parse_corruptions("rain")


def test_a_corrupted_set_is_cached(monkeypatch):
    images = synthetic_cifar10(10, 12)[1].images
    first = cached_corruption(images, "contrast", 2, seed=1)

    def no_work(*args, **kwargs):
        raise AssertionError("corrupted again although cached")

    monkeypatch.setattr(corruptions, "corrupt_split", no_work)
    assert torch.equal(cached_corruption(images, "contrast", 2, seed=1), first)


def test_eval_corruptions_command_and_report(tmp_path, capsys):
    run = train_tiny_run(tmp_path / "run")
    rc, out, err = run_main(capsys, ["eval", "--checkpoint", run / "best.pt", "--corruptions", "contrast,pixelate",
                                     "--severities", "1,5", "--json"])
    assert rc == 0, err
    result = json.loads(out)
    assert set(result["accuracy"]) == {"contrast", "pixelate"} and result["severities"] == [1, 5]
    values = [a for by in result["accuracy"].values() for a in by.values()]
    assert result["mean_corruption_accuracy"] == pytest.approx(sum(values) / len(values), abs=0.01)
    assert (run / "corruptions.json").is_file() and (run / "corruptions.png").is_file()
    rc, _, err = run_main(capsys, ["report", run])
    assert rc == 0, err
    assert "Accuracy under common corruptions" in (run / "report.html").read_text()
    rc, _, err = run_main(capsys, ["eval", "--checkpoint", run / "best.pt", "--corruptions", "rain"])
    one_line(rc, err, "--corruptions", "rain")
    rc, _, err = run_main(capsys, ["eval", "--checkpoint", run / "best.pt", "--corruptions", "all",
                                   "--severities", "7"])
    one_line(rc, err, "--severities")


def test_corruption_passes_take_the_devices_evaluation_batch_unless_told(monkeypatch):
    from tinycifar.models import create_model
    from tinycifar.reports import robustness

    seen, real = [], robustness.DeviceLoader

    def spy(split, batch_size, *args, **kwargs):
        seen.append(batch_size)
        return real(split, batch_size, *args, **kwargs)

    monkeypatch.setattr(robustness, "DeviceLoader", spy)
    _, test = synthetic_cifar10(16, 300, seed=0)
    model, cpu = create_model("fastnet").eval(), torch.device("cpu")
    for batch_size in (None, 64):  # the clean set, then the one corruption
        robustness.evaluate_corruptions(model, test, [0.5] * 3, [0.25] * 3, ["contrast"], [1], cpu,
                                        batch_size=batch_size)
    assert seen == [eval_batch_size(cpu)] * 2 + [64] * 2 and eval_batch_size(cpu) == 250
