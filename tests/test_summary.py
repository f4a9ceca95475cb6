"""Receptive-field walk against a gradient probe, and the summary/models commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from tinycifar.cli import main
from tinycifar.models import MODEL_REGISTRY, ClassifierHead, Net, count_params, create_model
from tinycifar.models.summary import (
    empirical_receptive_field,
    format_summary,
    layer_table,
    model_summary,
    receptive_field,
    receptive_field_walk,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net() -> Net:
    """conv3 (RF 3) -> conv3 stride 2 (RF 5, jump 2) -> conv3 dilation 2 (RF 13) -> conv1x1 (RF 13)."""
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(4, 8, 1),
    )
    return Net(features, ClassifierHead(8))


def pooled_net() -> Net:
    """conv5 stride 2 (RF 5, jump 2) -> avgpool 2 (RF 7, jump 4) -> conv3 dilation 3 (RF 31)."""
    features = nn.Sequential(
        nn.Conv2d(3, 4, 5, stride=2, padding=2), nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 6, 3, padding=3, dilation=3),
    )
    return Net(features, ClassifierHead(6))


def test_walk_follows_the_recurrence_on_a_hand_computed_net():
    steps = receptive_field_walk(tiny_net())
    assert [(s.kernel, s.stride, s.dilation, s.jump, s.rf) for s in steps] == [
        (3, 1, 1, 1, 3), (3, 2, 1, 2, 5), (3, 1, 2, 2, 13), (1, 1, 1, 2, 13)]
    assert receptive_field(pooled_net()) == 31


@pytest.mark.parametrize("factory", [tiny_net, pooled_net, *(lambda n=n: create_model(n) for n in MODEL_REGISTRY)],
                         ids=["tiny", "pooled", *MODEL_REGISTRY])
def test_walk_matches_the_gradient_probe_exactly(factory):
    torch.manual_seed(0)
    model = factory()
    rf = receptive_field(model)
    assert 1 < rf < 100
    # the input must hold the whole field around the central output: 112 > 100 + a stride margin
    assert empirical_receptive_field(model, size=112) == rf


def test_probe_input_must_be_big_enough_to_show_the_whole_field():
    # on an 8-pixel input the tiny net's 13-pixel field is clipped: the probe can only under-report
    assert empirical_receptive_field(tiny_net(), size=8) < receptive_field(tiny_net()) == 13


def independent_counts(model: nn.Module) -> tuple[int, int]:
    """Parameters and multiply-accumulates per 32x32 image, counted with plain forward hooks."""
    macs = []

    def hook(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            macs.append(out.shape[1] * out.shape[2] * out.shape[3] * (m.in_channels // m.groups) * kh * kw)
        elif isinstance(m, nn.Linear):
            macs.append(m.in_features * m.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return sum(p.numel() for p in model.parameters()), sum(macs)


def test_summary_json_via_the_cli_agrees_with_the_model():
    out = subprocess.run([sys.executable, "-m", "tinycifar", "summary", "--model", "era9", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert {"params", "macs", "receptive_field"} <= set(s)
    model = create_model("era9")
    params, macs = independent_counts(model)
    assert s["params"] == params == count_params(model)
    assert s["macs"] == macs
    assert s["receptive_field"] == receptive_field(model)  # the walk is checked against the probe above
    assert sum(layer["params"] for layer in s["layers"]) == params
    assert s["layers"][-1]["out_shape"] == [10]


def test_layer_table_rows_carry_the_walk_and_the_text_summary_totals():
    model = create_model("era9")
    rows = layer_table(model)
    conv_rfs = [r.rf for r in rows if r.kind == "Conv2d"]
    assert conv_rfs == [s.rf for s in receptive_field_walk(model)]
    text = format_summary(model_summary(model))
    assert f"{count_params(model):,} parameters" in text
    assert f"receptive field {receptive_field(model)}" in text


def test_summary_of_an_unknown_model_is_one_line_and_exit_2(capsys):
    assert main(["summary", "--model", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_models_lists_era9_with_its_parameter_count(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("era9"))
    assert f"{count_params(create_model('era9')):,}" in line
    assert main(["models", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(MODEL_REGISTRY)
    assert rows["era9"]["params"] == count_params(create_model("era9"))
    assert rows["era9"]["receptive_field"] == receptive_field(create_model("era9"))
