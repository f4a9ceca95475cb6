"""`train --tensorboard`: the event files, read back with TensorBoard's own reader."""

from __future__ import annotations

import builtins
import json

import pytest
from cli_helpers import one_line, run_main
from tiny_run import train_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train_tiny_run(tmp_path_factory.mktemp("tb") / "run", epochs=2, tensorboard=True)
    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                             "tensors": 0})
    accumulator.Reload()
    return run, accumulator


def test_per_step_and_per_epoch_scalars(events):
    run, acc = events
    config = json.loads((run / "config.json").read_text())
    history = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    header, rows = history[0], history[1:]
    # each epoch's steps from its place in the schedule; an epoch on the hardest images (the fp32 recipe) takes fewer
    per_epoch, batch = config["resolved"]["steps_per_epoch"], config["batch_size"]
    images = [int(r[header.index("train_images")]) for r in rows]
    steps = [e * per_epoch + i for e, n in enumerate(images) for i in range(n // batch)]
    assert len(steps) < 2 * per_epoch
    assert [e.step for e in acc.Scalars("step/loss")] == steps
    assert len(acc.Scalars("step/lr")) == len(steps)
    for tag, column in (("test/accuracy", "test_acc"), ("train/loss", "train_loss")):
        logged = [(e.step, e.value) for e in acc.Scalars(tag)]
        expected = [(int(r[0]), float(r[header.index(column)])) for r in rows]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-5)


def test_images_and_config_text(events):
    run, acc = events
    tags = acc.Tags()
    assert {"augmented samples", "confusion matrix"} <= set(tags["images"])
    assert [e.step for e in acc.Images("confusion matrix")] == [1, 2]
    assert acc.Images("augmented samples")[0].width > 400
    (text,) = acc.Tensors("config/text_summary")
    assert '"tensorboard": true' in text.tensor_proto.string_val[0].decode()


def test_without_the_extra_one_line_and_no_run_folder(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    rc, _, err = run_main(capsys, ["train", "--tensorboard", "--dataset", "synthetic", "--out", tmp_path / "run"])
    one_line(rc, err, "pip install 'tinycifar[tensorboard]'")
    assert not (tmp_path / "run").exists()
