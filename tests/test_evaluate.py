"""Evaluation: one pass over the TTA views gives both the TTA and the plain result; calibration."""

from __future__ import annotations

import pytest
import torch
from host_reads import OperatorNames

from tinycifar.data import synthetic_cifar10
from tinycifar.data.loader import DeviceLoader, channel_stats
from tinycifar.evaluate import (
    calibration_bins,
    eval_batch_size,
    evaluate,
    evaluate_views,
    expected_calibration_error,
    mean_overconfidence,
    tta_views,
)
from tinycifar.models import create_model


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    _, test = synthetic_cifar10(40, 120)
    mean, std = channel_stats(test.images)
    return create_model("fastnet").eval(), DeviceLoader(test, 50, mean, std, train=False)


@pytest.mark.parametrize("tta", ["flip", "flip+translate"])
def test_views_give_the_tta_and_the_plain_result_at_once(setting, tta):
    model, loader = setting
    with_tta, plain = evaluate_views(model, loader, "fp32", tta)
    alone = evaluate(model, loader, "fp32")
    assert plain.correct == alone.correct and plain.loss == pytest.approx(alone.loss, rel=1e-6)
    assert torch.equal(plain.confusion, alone.confusion)
    assert with_tta.correct == evaluate(model, loader, "fp32", tta=tta).correct
    assert with_tta.total == plain.total == 120


def test_evaluation_scores_the_folded_network_as_the_model_and_leaves_the_model_as_it_was(setting):
    """evaluate_views runs a copy with its batch norms folded: the logits of the model itself, up to
    float rounding, and the model keeps its mode, its statistics and its norms."""
    _, loader = setting
    torch.manual_seed(1)
    model = create_model("fastnet")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with OperatorNames() as ops:
        result = evaluate(model, loader, "fp32")
    assert len(loader) >= 3 and ops.count("batch_norm") == norms  # each norm once, on the fold's probe only
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        logits = torch.cat([model.eval()(x) for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    assert result.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert abs(result.correct - int((logits.argmax(1) == labels).sum())) <= 1  # a tie may round either way


def test_a_network_the_fold_would_change_is_scored_unfolded(setting):
    """A forward that adds a convolution's output before its norm: the fold's probe sees the difference
    and the pass runs the network as it is."""
    from test_layers import PreNormSkip

    _, loader = setting
    torch.manual_seed(2)
    net = torch.nn.Sequential(PreNormSkip(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    net[0].block[1].running_mean.uniform_(-0.5, 0.5)
    with pytest.warns(UserWarning, match="runs unfolded"):
        result = evaluate(net, loader, "fp32")
    with torch.no_grad():
        logits = torch.cat([net.eval()(x) for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    assert result.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


def test_test_passes_take_cache_sized_batches_on_a_cpu_and_large_ones_on_a_gpu():
    assert eval_batch_size(torch.device("cpu")) == 250
    assert eval_batch_size(torch.device("cuda", 0)) == 1000


def test_the_result_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    _, test = synthetic_cifar10(40, 120)
    mean, std = channel_stats(test.images)
    model = create_model("fastnet").eval()
    results = [evaluate(model, DeviceLoader(test, batch, mean, std, train=False), tta="flip") for batch in (120, 50)]
    assert results[0].correct == results[1].correct and torch.equal(results[0].confusion, results[1].confusion)
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-5)


def test_view_counts():
    x = torch.rand(2, 3, 8, 8)
    assert [len(tta_views(x, m)) for m in ("none", "flip", "flip+translate")] == [1, 2, 6]
    with pytest.raises(ValueError, match="test-time augmentation"):
        tta_views(x, "rotate")


def test_ece_of_a_hand_made_example():
    """Four predictions at confidence 0.9 (three right) and two at 0.3 (both wrong): bins [0.867, 0.933)
    and [0.267, 0.333); gaps |0.9 - 0.75| and |0.3 - 0|, weighted 4/6 and 2/6."""
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.3, 0.2]] * 2)  # the bins only look at the top probability
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    bins = calibration_bins(probs, labels)
    assert bins[0].sum() == 6 and bins[0, 13] == 4 and bins[0, 4] == 2
    assert expected_calibration_error(bins) == pytest.approx(100 * (4 / 6 * 0.15 + 2 / 6 * 0.3))
    assert mean_overconfidence(bins) == pytest.approx(100 * ((3.6 + 0.6) / 6 - 3 / 6))


def test_calibrated_predictions_have_a_small_ece_and_confident_mistakes_a_large_one():
    g = torch.Generator().manual_seed(0)
    confidence = torch.rand(20000, generator=g) * 0.9 + 0.1
    right = torch.rand(20000, generator=g) < confidence  # right exactly as often as it says
    probs = torch.stack([confidence, 1 - confidence], 1)
    labels = torch.where(right, 0, 1)
    assert expected_calibration_error(calibration_bins(probs, labels)) < 1.5
    always_sure = torch.tensor([[0.99, 0.01]]).repeat(1000, 1)
    half_right = torch.arange(1000) % 2
    assert expected_calibration_error(calibration_bins(always_sure, half_right)) == pytest.approx(49, abs=1e-6)


def test_evaluation_reports_the_ece_of_its_own_probabilities(setting):
    model, loader = setting
    with_tta, plain = evaluate_views(model, loader, "fp32", "flip")
    with torch.no_grad():
        x = torch.cat([b for b, _ in loader])
        y = torch.cat([t for _, t in loader])
        logits = model(x)
        tta_logits = (logits + model(x.flip(-1))) / 2
    assert plain.ece == pytest.approx(expected_calibration_error(calibration_bins(logits.softmax(1), y)), abs=1e-4)
    assert with_tta.ece == pytest.approx(expected_calibration_error(calibration_bins(tta_logits.softmax(1), y)),
                                         abs=1e-4)
    probs = logits.softmax(1)
    mean_gap = 100 * (probs.max(1).values.mean() - (probs.argmax(1) == y).float().mean())
    assert plain.overconfidence == pytest.approx(float(mean_gap), abs=1e-3)
