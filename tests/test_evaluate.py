"""Evaluation: one pass over the TTA views gives both the TTA and the plain result."""

from __future__ import annotations

import pytest
import torch

from tinycifar.data import synthetic_cifar10
from tinycifar.data.loader import DeviceLoader, channel_stats
from tinycifar.evaluate import evaluate, evaluate_views, tta_views
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


def test_view_counts():
    x = torch.rand(2, 3, 8, 8)
    assert [len(tta_views(x, m)) for m in ("none", "flip", "flip+translate")] == [1, 2, 6]
    with pytest.raises(ValueError, match="test-time augmentation"):
        tta_views(x, "rotate")
