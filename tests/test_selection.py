"""Online batch selection: which epochs select, each image's latest loss, the hardest share."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinycifar.config import resolve_config
from tinycifar.training.selection import ImageLosses, selects_hardest


@pytest.mark.parametrize(("epochs", "last", "selecting"), [(6, 3, [3, 4, 5]), (6, 1, [5]), (3, 9, [1, 2])])
def test_the_last_epochs_select_but_never_the_first(epochs, last, selecting):
    cfg = resolve_config("fast", overrides={"epochs": epochs, "keep_hardest": 0.7, "keep_hardest_epochs": last})
    assert [e for e in range(epochs) if selects_hardest(cfg, e)] == selecting
    cfg.keep_hardest = 1.0
    assert not any(selects_hardest(cfg, e) for e in range(epochs))


def logits_for(losses: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class logits whose cross-entropy against label 0 is each of ``losses``."""
    p = torch.exp(-torch.tensor(losses))  # the label's probability
    return torch.stack([p.log(), (1 - p).log()], 1), torch.zeros(len(losses), dtype=torch.long)


def test_each_image_keeps_its_newest_loss_and_the_hardest_share_is_chosen():
    losses = ImageLosses(6, torch.device("cpu"))
    assert losses.hardest(0.5, 1) is None  # nothing recorded yet: every image
    losses.start_epoch()
    logits, labels = logits_for([0.1, 2.0, 0.5, 1.0, 3.0, 0.2])
    losses.record(torch.arange(6), logits, labels)
    losses.finish_epoch(world_size=1)
    assert losses.latest.tolist() == pytest.approx([0.1, 2.0, 0.5, 1.0, 3.0, 0.2], abs=1e-5)
    assert sorted(losses.hardest(0.5, 1).tolist()) == [1, 3, 4]
    assert sorted(losses.hardest(0.2, 2).tolist()) == [1, 4]  # never fewer than a step's worth

    losses.start_epoch()  # an epoch over images 4 and 1 only: the others keep their older losses
    logits, labels = logits_for([0.05, 0.3])
    losses.record(torch.tensor([4, 1]), logits, labels)
    losses.finish_epoch(world_size=1)
    assert losses.latest.tolist() == pytest.approx([0.1, 0.3, 0.5, 1.0, 0.05, 0.2], abs=1e-5)
    assert sorted(losses.hardest(0.5, 1).tolist()) == [1, 2, 3]


def test_a_step_records_its_labelled_images_against_the_plain_label():
    """AugMix's extra views follow the labelled rows; mixed labels are class probabilities."""
    losses = ImageLosses(4, torch.device("cpu"))
    losses.start_epoch()
    logits = torch.randn(6, 10)  # two labelled images, then their four AugMix views
    losses.record(torch.tensor([2, 0]), logits, torch.tensor([7, 3]))
    assert losses.epoch_losses[[2, 0]].tolist() == pytest.approx(
        F.cross_entropy(logits[:2], torch.tensor([7, 3]), reduction="none").tolist())
    soft = torch.full((2, 10), 0.1)
    losses.record(torch.tensor([1, 3]), logits[:2], soft)
    assert losses.epoch_losses[[1, 3]].tolist() == pytest.approx(
        F.cross_entropy(logits[:2], soft, reduction="none").tolist())
