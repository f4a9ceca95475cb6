"""The device loader: the whole split lives on the training device as uint8.

No worker processes, no per-image Python: each epoch is one permutation, each batch
one gather, one normalization and one batched augmentation. The permutation and the
augmentation draw from generators seeded by (seed, epoch), so epoch k is the same
whether a run got there directly or by ``--resume``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .augment import AugmentConfig, augment
from .augmix import augmix_views
from .cifar10 import Split
from .mixing import mix_batch


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (unbiased, as ``Tensor.std``) of uint8 images, on the 0..1 scale.

    From each channel's histogram of its 256 values, in float64: exact, where summing a float32 copy of
    CIFAR-10's 150 million values was off in the sixth digit, and 0.2 s of a 2-core CPU's start-up
    instead of 0.8 s."""
    if images.dtype != torch.uint8:
        raise TypeError(f"channel_stats: expected uint8 images, got {images.dtype}")
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for channel in images.unbind(1):
        counts = torch.bincount(channel.flatten(), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        variance = (counts * (values - mean) ** 2).sum() / (n - 1)
        means.append(mean.item() / 255)
        stds.append(variance.sqrt().item() / 255)
    return means, stds


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """The batch at ``size`` x ``size`` (progressive resizing's lower resolutions): bilinear with
    antialiasing, so a downscaled image averages its pixels instead of skipping some."""
    if size == images.shape[-1]:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def epoch_generator(seed: int, epoch: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """Independent, reproducible random stream for one epoch (and one purpose)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch * 101 + stream)


class DeviceLoader:
    """Yields (images, labels) batches, normalized and optionally augmented, on ``device``.

    With ``aug.augmix == "jsd"`` a batch holds three views of each labelled image (the image, then
    two AugMix views), so ``len(images) == 3 * len(labels)``. With ``aug.mix`` on (mixup, CutMix) the
    labels are class probabilities (N, classes) instead of class indices.

    With ``world_size > 1`` each rank gets a disjoint, equally sized slice of every epoch's
    permutation (the remainder is dropped so ranks take the same number of steps).

    ``subset`` (image indices, or None for all) restricts an epoch to those images, in a random
    order; ``last_indices`` are the images of the batch yielded last, so a step can record their losses.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean: list[float],
        std: list[float],
        device: str | torch.device = "cpu",
        train: bool = True,
        aug: AugmentConfig | None = None,
        seed: int = 0,
        channels_last: bool = False,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.device = torch.device(device)
        self.images, self.labels = self.place(split)
        self.num_classes = len(split.classes)
        self.batch_size, self.train, self.aug, self.seed = batch_size, train, aug, seed
        self.channels_last, self.drop_last = channels_last, drop_last
        self.rank, self.world_size = rank, world_size
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.epoch = 0
        self.resolution: int | None = None  # train at a lower resolution (progressive resizing)
        self.subset: torch.Tensor | None = None  # the images this epoch trains on (None: all)
        self.last_indices: torch.Tensor | None = None
        self.flip_bits = None
        if aug is not None and aug.alternate_flip:
            gen = torch.Generator().manual_seed(seed)
            self.flip_bits = torch.randint(0, 2, (len(self.labels),), generator=gen).bool().to(self.device)

    def place(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels batches are gathered from: on the device, where every step reads them."""
        return split.images.to(self.device), split.labels.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's sample order for the current epoch, on the device (where the gathers run)."""
        return self.order().to(self.device)

    def order(self) -> torch.Tensor:
        """This rank's sample order for the current epoch, on the CPU (where it is drawn)."""
        if self.train:
            n = len(self.labels) if self.subset is None else len(self.subset)
            order = torch.randperm(n, generator=epoch_generator(self.seed, self.epoch, torch.device("cpu")))
            if self.subset is not None:
                order = self.subset.cpu()[order]
        else:
            n = len(self.labels)
            order = torch.arange(n)
        if self.world_size > 1:
            if self.train:
                order = order[: n - n % self.world_size]
            order = order[self.rank :: self.world_size]
        return order

    def __len__(self) -> int:
        """Batches in the current epoch: over the whole split, or over ``subset`` when one is set."""
        return self.batches_over(self.subset)

    def batches_over(self, subset: torch.Tensor | None = None) -> int:
        """This rank's batches in an epoch over ``subset`` (None: the whole split), counted as ``order``
        slices it, without drawing the permutation."""
        n = len(self.labels) if subset is None else len(subset)
        world = self.world_size
        if world > 1:  # training drops the remainder so ranks take equal slices; testing deals every image
            n = (n - n % world) // world if self.train else len(range(self.rank, n, world))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def alternating_flips(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Each image's flip in this epoch: a fixed random bit per image, inverted every epoch.

        Every image is seen both ways in any two consecutive epochs, instead of by chance
        (airbench's alternating flips).
        """
        if self.flip_bits is None:
            return None
        return self.flip_bits[idx] ^ bool(self.epoch % 2)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The steps after augmentation: the epoch's resolution and the memory format."""
        if self.resolution:
            x = resized(x, self.resolution)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices()
        gen = epoch_generator(self.seed, self.epoch, self.device, stream=1 + self.rank)  # own draws per rank
        mixing_rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            idx = self.last_indices = order[start : start + self.batch_size]
            x, labels = self.normalize(self.images[idx]), self.labels[idx]
            if self.train and self.aug is not None:
                x = augment(x, self.aug, gen, self.alternating_flips(idx))
                x = augmix_views(x, self.aug.augmix, self.mean, self.std, gen, self.aug.augmix_severity,
                                 self.aug.augmix_width, self.aug.augmix_depth)
                if self.aug.mix != "off":
                    x, labels = mix_batch(x, labels, self.num_classes, self.aug.mix, self.aug.mix_alpha,
                                          self.aug.mix_p, gen, mixing_rng)
            yield self.finish(x), labels
