"""The whitening stem: its patch covariance is summed in bounded chunks and equals the all-at-once one."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tinycifar.models.layers import init_whitening, patch_covariance, patch_rows


def all_at_once_covariance(images: torch.Tensor, k: int = 3) -> torch.Tensor:
    """The covariance as init_whitening computed it before chunking: every patch centred at once."""
    patches = patch_rows(images, k)
    patches = patches - patches.mean(0)
    return patches.T @ patches / len(patches)


class LargestAllocation(TorchDispatchMode):
    """The largest storage an operation creates, the caller's input (and views of it) excluded."""

    def __init__(self, given: torch.Tensor):
        super().__init__()
        self.given, self.largest = given.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != self.given:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_chunked_covariance_equals_the_all_at_once_one():
    images = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    chunked = patch_covariance(images, 3, torch.device("cpu"), max_patches=200)  # 196 per image: 10 chunks
    assert torch.allclose(chunked, all_at_once_covariance(images), atol=1e-5)


def test_whitening_filters_at_32px_are_the_unchunked_ones():
    """Recipes keep their accuracy: the filters whiten as the all-at-once covariance's do, up to float
    rounding. Compared as the map they make (sum of v v^T / (lambda + eps)): within a group of nearly
    equal eigenvalues any rounding turns the eigenvectors, never the subspace they span. Smooth images,
    as natural ones are, whose top 12 eigenvalues stand apart from the rest."""
    noise = torch.randn(300, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    images = nn.functional.interpolate(noise, size=32, mode="bilinear")
    conv = nn.Conv2d(3, 24, 3, bias=False)
    init_whitening(conv, images, max_patches=10_000)  # 300 x 900 patches in 28 chunks
    eigvals, eigvecs = torch.linalg.eigh(all_at_once_covariance(images))
    top = (eigvecs[:, -12:].T / torch.sqrt(eigvals[-12:, None] + 5e-4)).reshape(-1, 3, 3, 3)
    ours, expected = conv.weight.data[:12].flatten(1), top.flatten(1)
    assert torch.equal(conv.weight.data[12:], -conv.weight.data[:12])
    gram = expected.T @ expected
    assert (ours.T @ ours - gram).abs().max() < 1e-4 * gram.abs().max()


def test_whitening_at_128px_allocates_one_chunk_whatever_the_sample_size():
    """The peak is bounded by the chunk, not by the sample: 128 px images fit a T4 with 5000 of them."""
    budget = 1 << 14  # patches per chunk; 27 floats each
    peaks = []
    for n in (8, 32):
        images = torch.randn(n, 3, 128, 128, generator=torch.Generator().manual_seed(n))
        with LargestAllocation(images) as spy:
            init_whitening(nn.Conv2d(3, 24, 3, bias=False), images, max_patches=budget)
        peaks.append(spy.largest)
    per_image = 126 * 126 * 27 * 4  # one image's patches, the smallest chunk there can be
    assert peaks[0] == peaks[1] <= max(budget * 27 * 4, per_image)
    assert peaks[1] < 32 * per_image / 10  # the all-at-once version held all 32 images' patches
