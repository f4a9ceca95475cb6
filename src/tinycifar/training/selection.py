"""Online batch selection per epoch (Loshchilov & Hutter, 2015): train the last epochs on the hardest images.

Late in a short run most training images are already classified well, and their gradients are
small; the images with the highest loss carry most of what is left to learn. ``keep_hardest``
keeps that share of the training set for the last ``keep_hardest_epochs`` epochs, ranked by each
image's loss when it was last seen: the losses come from the forward passes training does anyway,
so the selection costs nothing but a top-k per epoch, and the epochs cost their share of the steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import TrainConfig, in_final_epochs


def selects_hardest(cfg: TrainConfig, epoch: int) -> bool:
    """Whether epoch (0-based) trains on the hardest images only; never the first, which has no losses yet."""
    return cfg.keep_hardest < 1 and in_final_epochs(cfg, epoch, cfg.keep_hardest_epochs)


class ImageLosses:
    """Each training image's loss (cross-entropy against its label) when it was last seen."""

    def __init__(self, num_images: int, device: torch.device):
        self.num_images, self.device = num_images, device
        self.latest: torch.Tensor | None = None  # until an epoch has recorded them (or a checkpoint restored them)
        self.epoch_losses = self.seen = torch.zeros(0)

    def start_epoch(self) -> None:
        self.epoch_losses = torch.zeros(self.num_images, device=self.device)
        self.seen = torch.zeros(self.num_images, device=self.device)

    def record(self, indices: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """The step's losses by image, from its logits (the labelled images' rows; no host sync)."""
        losses = F.cross_entropy(logits[: len(labels)].detach().float(), labels, reduction="none")
        self.epoch_losses[indices] = losses
        self.seen.index_fill_(0, indices, 1.0)  # a Python scalar: no tensor made on the host

    def finish_epoch(self, world_size: int) -> None:
        """Merge the epoch's losses into the latest; under DDP each image's comes from the rank that saw it."""
        if world_size > 1:
            dist.all_reduce(self.epoch_losses)
            dist.all_reduce(self.seen)
        older = self.latest if self.latest is not None else torch.zeros_like(self.epoch_losses)
        self.latest = torch.where(self.seen > 0, self.epoch_losses, older)

    def hardest(self, share: float, at_least: int) -> torch.Tensor | None:
        """The indices of the ``share`` of images with the highest latest loss (never fewer than
        ``at_least``, a step's worth), or None (all images) while no loss is known."""
        if self.latest is None:
            return None
        count = min(self.num_images, max(int(share * self.num_images), at_least))
        return self.latest.topk(count).indices
