"""The training loss: cross-entropy, plus AugMix's consistency term when the batch holds views."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..data.augmix import views_per_image


class AugMixConsistency(nn.Module):
    """Cross-entropy on the clean images plus ``weight`` times the Jensen-Shannon divergence
    between the predictions for the image and its AugMix views (Hendrycks et al., eq. 1).

    The logits come view-major: rows ``[0, n)`` are the n labelled images, then each view's n rows.
    The divergence asks the network to give an image and its augmented views the same
    distribution, which is what carries over to corruptions it never saw.
    """

    def __init__(self, cross_entropy: nn.Module, weight: float, views: int = 3):
        super().__init__()
        self.cross_entropy, self.weight, self.views = cross_entropy, weight, views

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = len(labels)
        if len(logits) != self.views * n:
            raise ValueError(f"expected {self.views} views of {n} images, got {len(logits)} rows of logits")
        probs = logits.float().softmax(1).view(self.views, n, -1)
        log_mixture = probs.mean(0).clamp(1e-7, 1).log()
        # KL(p_v || M) for each view; F.kl_div(input=log M, target=p_v) computes exactly that
        divergence = sum(F.kl_div(log_mixture, p, reduction="batchmean") for p in probs) / self.views
        return self.cross_entropy(logits[:n], labels) + self.weight * divergence


def build_criterion(cfg: TrainConfig) -> nn.Module:
    """The recipe's loss: label-smoothed cross-entropy, with the consistency term under AugMix's jsd mode."""
    cross_entropy = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    views = views_per_image(cfg.aug.augmix)
    return cross_entropy if views == 1 else AugMixConsistency(cross_entropy, cfg.aug.jsd_weight, views)
