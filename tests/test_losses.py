"""The training loss: plain cross-entropy, or cross-entropy plus AugMix's Jensen-Shannon term."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinycifar.config import resolve_config
from tinycifar.training.losses import AugMixConsistency, build_criterion


def test_the_recipe_picks_its_loss():
    assert isinstance(build_criterion(resolve_config("fast")), nn.CrossEntropyLoss)
    assert isinstance(build_criterion(resolve_config("fast", overrides={"aug": {"augmix": "mix"}})),
                      nn.CrossEntropyLoss)  # one view: nothing to be consistent with
    jsd = build_criterion(resolve_config("fast", overrides={"aug": {"augmix": "jsd", "jsd_weight": 5.0}}))
    assert isinstance(jsd, AugMixConsistency) and jsd.weight == 5.0
    assert jsd.cross_entropy.label_smoothing == 0.1  # the preset's


def test_identical_views_add_nothing_to_the_cross_entropy():
    logits = torch.randn(4, 10)
    labels = torch.tensor([0, 3, 5, 9])
    loss = AugMixConsistency(nn.CrossEntropyLoss(), 12.0)(logits.repeat(3, 1), labels)
    assert torch.allclose(loss, F.cross_entropy(logits, labels), atol=1e-5)


def test_the_divergence_is_the_jensen_shannon_of_the_three_predictions():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (2,))
    loss = AugMixConsistency(nn.CrossEntropyLoss(), 1.0)(logits, labels)
    p = logits.softmax(1).view(3, 2, 10)
    m = p.mean(0)
    js = sum((q * (q / m).log()).sum(1).mean() for q in p) / 3
    assert torch.allclose(loss, F.cross_entropy(logits[:2], labels) + js, atol=1e-5)
    assert js > 0 and js <= math.log(3)


def test_the_views_pull_toward_each_other():
    """A step on the consistency term alone brings the views' predictions closer."""
    logits = torch.randn(6, 10, requires_grad=True)
    labels = torch.zeros(2, dtype=torch.long)
    criterion = AugMixConsistency(lambda z, y: z.sum() * 0, 1.0)
    before = criterion(logits, labels)
    before.backward()
    after = criterion(logits.detach() - 10 * logits.grad, labels)
    assert after < before


def test_a_batch_without_its_views_is_refused():
    with pytest.raises(ValueError, match="expected 3 views of 4 images, got 4 rows"):
        AugMixConsistency(nn.CrossEntropyLoss(), 12.0)(torch.randn(4, 10), torch.zeros(4, dtype=torch.long))
