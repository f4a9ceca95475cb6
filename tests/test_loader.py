"""The device loader: normalization, order, reproducibility, sharding, test order, memory format."""

from __future__ import annotations

import pytest
import torch

from tinycifar.data import Split, synthetic_cifar10
from tinycifar.data.augment import AugmentConfig
from tinycifar.data.loader import DeviceLoader, channel_stats, epoch_generator

pytestmark = pytest.mark.usefixtures("one_thread")


def id_split(n: int = 103, seed: int = 0) -> Split:
    """Random images whose label is their index, so every batch says which samples it holds."""
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n))


def make(split: Split, batch_size: int = 16, **kw) -> DeviceLoader:
    mean, std = channel_stats(split.images)
    return DeviceLoader(split, batch_size, mean, std, **kw)


def run_epoch(loader: DeviceLoader, epoch: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    loader.set_epoch(epoch)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return xs, ys


def denormalize(loader: DeviceLoader, x: torch.Tensor) -> torch.Tensor:
    return (x * loader.std + loader.mean).round().to(torch.uint8)


# ---------------------------------------------------------------------------- statistics and normalization


def test_channel_stats_match_a_direct_computation():
    images = id_split(50).images
    mean, std = channel_stats(images)
    x = images.double() / 255
    for c in range(3):
        assert mean[c] == pytest.approx(x[:, c].mean().item(), rel=1e-12)
        assert std[c] == pytest.approx(x[:, c].std().item(), rel=1e-12)


def test_channel_stats_refuse_images_that_are_not_uint8():
    with pytest.raises(TypeError, match="expected uint8 images, got torch.float32"):
        channel_stats(id_split(4).images.float())


@pytest.mark.parametrize("aug", [None, AugmentConfig(policy="none")])
def test_epoch_is_normalized(aug):
    split, _ = synthetic_cifar10(n_train=600, n_test=10, seed=2)
    loader = make(split, 128, aug=aug)
    xs, _ = run_epoch(loader)
    x = torch.cat(xs).double()
    assert x.dtype == torch.float64 and xs[0].dtype == torch.float32
    assert x.mean((0, 2, 3)).abs().max() < 1e-4
    assert (x.std((0, 2, 3)) - 1).abs().max() < 1e-3


def test_labels_stay_with_their_images():
    split = id_split()
    loader = make(split, 10)
    for x, y in loader:
        assert torch.equal(denormalize(loader, x), split.images[y])


def test_batches_are_float32_on_the_device_and_labels_int64():
    loader = make(id_split(40), 16)
    for x, y in loader:
        assert x.dtype == torch.float32 and x.device == loader.device and x.shape[1:] == (3, 32, 32)
        assert y.dtype == torch.int64 and y.device == loader.device and len(y) == len(x)


# ---------------------------------------------------------------------------- order and reproducibility


def test_training_epoch_is_a_permutation():
    split = id_split(103)
    loader = make(split, 16)
    xs, ys = run_epoch(loader)
    order = torch.cat(ys)
    assert sorted(order.tolist()) == list(range(103))
    assert not torch.equal(order, torch.arange(103))  # shuffled
    assert [len(y) for y in ys] == [16] * 6 + [7]
    assert len(loader) == 7


def test_drop_last():
    loader = make(id_split(103), 16, drop_last=True)
    _, ys = run_epoch(loader)
    assert [len(y) for y in ys] == [16] * 6
    assert len(loader) == 6
    assert len(set(torch.cat(ys).tolist())) == 96


def test_same_seed_and_epoch_same_batches():
    split = id_split()
    aug = AugmentConfig(policy="seed")
    a = run_epoch(make(split, 16, aug=aug, seed=7), epoch=3)
    b = run_epoch(make(split, 16, aug=aug, seed=7), epoch=3)
    for (xa, ya), (xb, yb) in zip(zip(*a, strict=True), zip(*b, strict=True), strict=True):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


def test_resuming_at_an_epoch_repeats_it_exactly():
    """Epoch k is the same whether the loader went through epochs 0..k-1 first or not (--resume)."""
    split = id_split()
    aug = AugmentConfig(policy="fast", cutout_size=8)
    long = make(split, 16, aug=aug, seed=1)
    for epoch in range(3):
        run_epoch(long, epoch)
    a = run_epoch(long, 2)
    b = run_epoch(make(split, 16, aug=aug, seed=1), 2)
    assert all(torch.equal(u, v) for u, v in zip(a[0] + a[1], b[0] + b[1], strict=True))


def test_different_epochs_and_seeds_differ():
    split = id_split()
    aug = AugmentConfig(policy="seed")
    loader = make(split, 200, aug=aug, seed=0)  # one batch holds the whole epoch
    (x0,), (y0,) = run_epoch(loader, 0)
    (x1,), (y1,) = run_epoch(loader, 1)
    assert not torch.equal(y0, y1)  # order
    # augmentation, compared image by image after undoing the order
    assert not torch.equal(x0[y0.argsort()], x1[y1.argsort()])
    (_,), (z0,) = run_epoch(make(split, 200, aug=aug, seed=1), 0)
    assert not torch.equal(y0, z0)


def test_training_batches_are_augmented_and_test_batches_are_not():
    split = id_split(64)
    aug = AugmentConfig(policy="seed")
    train = make(split, 64, aug=aug)
    (x,), (y,) = run_epoch(train)
    assert not torch.equal(denormalize(train, x), split.images[y])
    test = make(split, 64, aug=aug, train=False)
    (x,), (y,) = run_epoch(test)
    assert torch.equal(y, torch.arange(64))
    assert torch.equal(denormalize(test, x), split.images)


def test_indices_match_iteration_and_do_not_depend_on_history():
    loader = make(id_split(50), 8)
    loader.set_epoch(4)
    first = loader.indices()
    run_epoch(loader, 4)
    assert torch.equal(loader.indices(), first)
    assert torch.equal(torch.cat(run_epoch(loader, 4)[1]), first)


# ---------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("n", [103, 96])
def test_shards_are_disjoint_equal_and_cover_the_epoch(world_size, n):
    split = id_split(n)
    whole = make(split, 16)
    for epoch in (0, 1):
        whole.set_epoch(epoch)
        kept = n - n % world_size
        expected = set(whole.indices()[:kept].tolist())  # the epoch's permutation, remainder dropped
        shards, counts = [], []
        for rank in range(world_size):
            loader = make(split, 8, rank=rank, world_size=world_size)
            xs, ys = run_epoch(loader, epoch)
            shards.append(torch.cat(ys).tolist())
            counts.append(len(ys))
            assert len(ys) == len(loader)
            for x, y in zip(xs, ys, strict=True):
                assert torch.equal(denormalize(loader, x), split.images[y])
        assert len({len(s) for s in shards}) == 1  # the same number of samples...
        assert len(set(counts)) == 1  # ...and of steps on every rank
        union = [i for s in shards for i in s]
        assert len(union) == len(set(union)) == kept  # disjoint
        assert set(union) == expected  # and together the whole (truncated) epoch


def test_ranks_draw_their_own_augmentations():
    """Identical images at the same position on two ranks are not transformed identically."""
    img = torch.randint(0, 256, (1, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    split = Split(img.expand(64, -1, -1, -1).contiguous(), torch.arange(64))
    aug = AugmentConfig(policy="seed")
    (x0,), _ = run_epoch(make(split, 32, aug=aug, rank=0, world_size=2))
    (x1,), _ = run_epoch(make(split, 32, aug=aug, rank=1, world_size=2))
    assert not torch.equal(x0, x1)


@pytest.mark.parametrize("world_size", [2, 3])
def test_test_loader_shards_cover_everything(world_size):
    n = 103
    shards = []
    for rank in range(world_size):
        loader = make(id_split(n), 10, train=False, rank=rank, world_size=world_size)
        _, ys = run_epoch(loader)
        assert len(ys) == len(loader)
        shards.append(torch.cat(ys).tolist())
    union = sorted(i for s in shards for i in s)
    assert union == list(range(n))  # evaluation drops nothing


# ---------------------------------------------------------------------------- test loader


@pytest.mark.parametrize("batch_size", [25, 103, 1000, 1])
def test_test_loader_in_order_and_complete(batch_size):
    split = id_split(103)
    loader = make(split, batch_size, train=False)
    for epoch in (0, 5):
        xs, ys = run_epoch(loader, epoch)
        assert torch.equal(torch.cat(ys), torch.arange(103))
        sizes = [len(y) for y in ys]
        assert sizes[:-1] == [batch_size] * (len(sizes) - 1) and 0 < sizes[-1] <= batch_size
        assert len(ys) == len(loader) == -(-103 // batch_size)
        assert torch.equal(denormalize(loader, torch.cat(xs)), split.images)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch_size", [7, 16, 50])
def test_len_matches_the_number_of_batches(train, world_size, drop_last, batch_size):
    split = id_split(103)
    for rank in range(world_size):
        loader = make(split, batch_size, train=train, drop_last=drop_last, rank=rank, world_size=world_size)
        assert len(loader) == sum(1 for _ in loader)


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_subset_epoch_takes_those_images_once_in_a_random_order_and_says_which_each_batch_holds(world_size):
    split, subset = id_split(103), torch.tensor([5, 99, 17, 42, 0, 63, 8, 71, 30, 12, 88])
    loaders = [make(split, 2, drop_last=True, rank=r, world_size=world_size) for r in range(world_size)]
    taken = []
    for loader in loaders:
        loader.subset = subset
        loader.set_epoch(3)
        batches = 0
        for _, y in loader:
            assert torch.equal(loader.last_indices, y)  # labels are indices
            taken += y.tolist()
            batches += 1
        assert batches == len(loader) == (len(subset) // world_size) // 2
    assert len(set(taken)) == len(taken) and set(taken) <= set(subset.tolist())
    assert taken != sorted(taken) and len(taken) >= len(subset) - 2 * world_size - 1
    loaders[0].subset = None
    assert len(loaders[0]) == (103 // world_size) // 2  # the whole split again


# ---------------------------------------------------------------------------- options and errors


def test_channels_last():
    split = id_split(40)
    plain = make(split, 16, aug=AugmentConfig(policy="fast"))
    cl = make(split, 16, aug=AugmentConfig(policy="fast"), channels_last=True)
    for (xa, ya), (xb, yb) in zip(plain, cl, strict=True):
        assert xb.is_contiguous(memory_format=torch.channels_last)
        assert not xa.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match=rf"batch size must be positive, got {batch_size}"):
        make(id_split(10), batch_size)


@pytest.mark.parametrize("rank, world_size", [(2, 2), (-1, 2), (0, 0), (5, 3)])
def test_bad_rank(rank, world_size):
    with pytest.raises(ValueError, match=rf"rank {rank} is outside world size {world_size}"):
        make(id_split(10), 4, rank=rank, world_size=world_size)


def test_epoch_generators_are_independent_streams():
    cpu = torch.device("cpu")
    draws = {
        (seed, epoch, stream): torch.rand(4, generator=epoch_generator(seed, epoch, cpu, stream)).tolist()
        for seed in (0, 1)
        for epoch in (0, 1, 2)
        for stream in (0, 1, 2)
    }
    assert len({tuple(v) for v in draws.values()}) == len(draws)
    assert torch.rand(4, generator=epoch_generator(1, 2, cpu, 1)).tolist() == draws[(1, 2, 1)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loader():
    split = id_split(100)
    loader = make(split, 32, device="cuda", aug=AugmentConfig(policy="seed"), channels_last=True)
    for x, y in loader:
        assert x.is_cuda and y.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    a = torch.cat([x for x, _ in make(split, 32, device="cuda", aug=AugmentConfig(policy="seed"))])
    b = torch.cat([x for x, _ in make(split, 32, device="cuda", aug=AugmentConfig(policy="seed"))])
    assert torch.equal(a, b)


def test_alternating_flips_show_each_image_both_ways_in_consecutive_epochs():
    images = torch.arange(64 * 3 * 4 * 4, dtype=torch.float32).reshape(64, 3, 4, 4).remainder(251).to(torch.uint8)
    split = Split(images.repeat(1, 1, 8, 8), torch.arange(64) % 10)
    aug = AugmentConfig(policy="fast", translate_pad=0, cutout_size=0, alternate_flip=True)
    loader = DeviceLoader(split, 64, [0.5] * 3, [0.25] * 3, aug=aug, seed=3)
    plain = DeviceLoader(split, 64, [0.5] * 3, [0.25] * 3, aug=None, seed=3)
    flipped_by_epoch = []
    for epoch in (0, 1, 2):
        loader.set_epoch(epoch)
        plain.set_epoch(epoch)
        (x, y), (x0, y0) = next(iter(loader)), next(iter(plain))
        assert torch.equal(y, y0)
        flipped = (x != x0).flatten(1).any(1)
        assert torch.equal(x[flipped], x0[flipped].flip(3))
        order = plain.indices()
        by_image = torch.empty(64, dtype=torch.bool)
        by_image[order] = flipped
        flipped_by_epoch.append(by_image)
    assert torch.equal(flipped_by_epoch[0], ~flipped_by_epoch[1])
    assert torch.equal(flipped_by_epoch[0], flipped_by_epoch[2])
    assert 10 < int(flipped_by_epoch[0].sum()) < 54


def test_resolution_downsamples_batches_for_progressive_resizing():
    train, _ = synthetic_cifar10(64, 10, seed=0)
    loader = DeviceLoader(train, 16, [0.5] * 3, [0.25] * 3, aug=AugmentConfig(policy="fast"), channels_last=True)
    loader.resolution = 24
    x, y = next(iter(loader))
    assert x.shape == (16, 3, 24, 24) and len(y) == 16
    assert x.is_contiguous(memory_format=torch.channels_last)
    loader.resolution = None
    assert next(iter(loader))[0].shape == (16, 3, 32, 32)
