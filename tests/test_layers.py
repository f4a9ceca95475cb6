"""The whitening stem: its patch covariance is summed in bounded chunks and equals the all-at-once one.
The dilated depthwise convolution: our backward gives PyTorch's gradients, and only training takes it.
Folding batch norms for inference keeps the function and leaves the model alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tinycifar.models.layers import (
    ConvBNAct,
    DepthwiseSeparable,
    DilatedDepthwiseConv2d,
    _DilatedDepthwiseConv,
    fold_batch_norms,
    init_whitening,
    no_tf32,
    patch_covariance,
    patch_rows,
    same_outputs,
)


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


@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_chunked_covariance_equals_the_all_at_once_one(offset):
    """One pass (Gram / n - mean mean^T) holds where the mean is far from zero too (offset: 3 standard
    deviations), where centring first would matter most."""
    images = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(0)) + offset
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


@pytest.mark.parametrize("kernel_size,dilation", [(3, 2), (3, 3), (5, 2), (5, 4)])  # (5, 4): taps past the map
@pytest.mark.parametrize("channels_last", [False, True])
def test_dilated_depthwise_backward_passes_gradcheck(kernel_size, dilation, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(3, 1, kernel_size, kernel_size, dtype=torch.float64, generator=g)
    inputs = (x.requires_grad_(), weight.requires_grad_(), dilation)
    assert torch.autograd.gradcheck(_DilatedDepthwiseConv.apply, inputs)


def gradients(conv: nn.Module, x: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
    """The output and the gradients of the input and the weights for a fixed, uneven upstream gradient."""
    x = x.detach().requires_grad_()
    conv.weight.grad = None
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = conv(x)
    y.float().backward(torch.linspace(-1, 1, y.numel()).view_as(y).sin())
    return [y.detach().float(), x.grad, conv.weight.grad]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dilated_depthwise_gradients_are_pytorchs(autocast, channels_last):
    ours = DilatedDepthwiseConv2d(16, 3, dilation=3)
    theirs = nn.Conv2d(16, 16, 3, padding=3, dilation=3, groups=16, bias=False)
    theirs.weight.data.copy_(ours.weight.data)
    x = torch.randn(8, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x, ours, theirs = (t.to(memory_format=torch.channels_last) for t in (x, ours, theirs))
    tolerance = 2e-2 if autocast else 1e-5  # bf16 keeps 8 bits: both round, each its own way
    names = ["output", "input", "weight"]
    for a, b, name in zip(gradients(ours, x, autocast), gradients(theirs, x, autocast), names, strict=True):
        assert a.dtype == b.dtype, name
        assert torch.allclose(a, b, rtol=tolerance, atol=tolerance * b.abs().max().item()), name


def test_only_training_on_the_cpu_takes_our_backward():
    conv = DilatedDepthwiseConv2d(4, 3, dilation=2)
    x = torch.randn(1, 4, 6, 6)
    assert "DilatedDepthwiseConv" in conv(x).grad_fn.name()
    with torch.no_grad():  # inference and export: nn.Conv2d's forward, nothing custom to trace
        assert torch.equal(conv(x), nn.functional.conv2d(x, conv.weight, None, 1, 2, 2, 4))
    conv.weight.requires_grad_(False)  # a frozen layer
    assert "DilatedDepthwiseConv" not in conv(x.requires_grad_()).grad_fn.name()
    conv.weight.requires_grad_(True)
    assert "DilatedDepthwiseConv" not in conv.eval()(x).grad_fn.name()  # an exported model: eval, grads on


@pytest.mark.parametrize("training", [True, False])
def test_a_traced_dilated_depthwise_conv_is_a_plain_convolution(training):
    """export --format torchscript traces with gradients on; the trace's own check compares it with
    a second trace under no_grad, which fails if the first recorded our autograd function."""
    conv = DilatedDepthwiseConv2d(4, 3, dilation=2).train(training)
    x = torch.randn(2, 4, 6, 6)
    traced = torch.jit.trace(conv, x)  # check_trace=True by default
    assert "PythonOp" not in str(traced.graph)
    assert torch.allclose(traced(x), nn.functional.conv2d(x, conv.weight, None, 1, 2, 2, 4), atol=1e-6)


def test_conv_bn_act_picks_it_for_dilated_depthwise_convs_only():
    assert type(ConvBNAct(8, 8, 3, dilation=2, groups=8)[0]) is DilatedDepthwiseConv2d
    assert type(DepthwiseSeparable(8, 16, dilation=3)[0][0]) is DilatedDepthwiseConv2d
    for plain in (ConvBNAct(8, 8, 3, dilation=2), ConvBNAct(8, 8, 3, groups=8), ConvBNAct(8, 8, 3, 2, 2, groups=8)):
        assert type(plain[0]) is nn.Conv2d  # full, undilated or strided: PyTorch's backward
    conv = ConvBNAct(8, 8, 3, dilation=2, groups=8)[0]
    assert list(conv.state_dict()) == ["weight"] and conv.padding == (2, 2)  # checkpoints load as before


def with_trained_norms(model: nn.Module) -> nn.Module:
    """``model`` with batch norms whose statistics and affine parameters are not the identity's."""
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t, low, high in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0), (m.weight, 0.5, 1.5),
                                 (m.bias, -0.2, 0.2)):
                t.data.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)
    return model


def test_folding_keeps_fastnet_s_function_and_leaves_no_norm_nor_changes_the_model():
    from tinycifar.models import create_model

    model = with_trained_norms(create_model("fastnet")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    folded = fold_batch_norms(model)
    assert model.training  # its mode too
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x)
    assert torch.allclose(folded(x), expected, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) and not folded.training
    assert len(norms) == 8 and norms == [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class ScaledConv(nn.Conv2d):
    """A convolution with a forward of its own: folding a norm into its weights would change its function."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_folding_takes_only_a_plain_convolution_right_before_its_norm_in_a_sequential():
    class Attributes(nn.Module):  # conv and norm as attributes: their order in the forward is unknown
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(self.bn(x))

    net = with_trained_norms(nn.Sequential(
        nn.Sequential(ScaledConv(3, 4, 3, padding=1), nn.BatchNorm2d(4)),  # its own forward: kept
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)),  # not directly after: kept
        Attributes(),  # kept
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)),  # folded
    ))
    folded = fold_batch_norms(net)
    assert [type(m).__name__ for m in folded.modules() if isinstance(m, (nn.BatchNorm2d, nn.Identity))] == \
        ["BatchNorm2d", "BatchNorm2d", "BatchNorm2d", "Identity"]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(folded(x), net.eval()(x), atol=1e-5)


def test_folding_leaves_a_pair_with_hooks_and_a_sequential_with_its_own_forward():
    """A hook on the convolution would see the norm's output, one on the norm would be lost; a Sequential
    subclass may run its modules in another order: each keeps its norm."""
    class Reordered(nn.Sequential):
        def forward(self, x):
            return self[0](self[1](x))

    hooked = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
    hooked[0].register_forward_hook(lambda m, i, o: None)
    pre_hooked = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
    pre_hooked[1].register_forward_pre_hook(lambda m, i: None)
    net = with_trained_norms(nn.Sequential(hooked, pre_hooked, Reordered(nn.Conv2d(3, 3, 3, padding=1),
                                                                         nn.BatchNorm2d(3))))
    folded = fold_batch_norms(net)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 3
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(folded(x), net.eval()(x), atol=1e-5)


class PreNormSkip(nn.Module):
    """Calls its block's layers one by one and adds the convolution's output before the norm: folding
    the plain Sequential would change what it computes, which only running it shows."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.block[0](x)
        return self.block[1](y) + y


def test_a_probe_keeps_the_norms_where_folding_would_change_the_function():
    net = with_trained_norms(PreNormSkip())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = net.eval()(x)
        assert not torch.allclose(fold_batch_norms(net)(x), expected, atol=1e-3)  # without a probe: wrong
        with pytest.warns(UserWarning, match="PreNormSkip: .* it runs unfolded"):
            checked = fold_batch_norms(net, probe=x[:1])
        assert torch.allclose(checked(x), expected, atol=1e-6) and not checked.training
    assert any(isinstance(m, nn.BatchNorm2d) for m in checked.modules())


def test_the_probe_runs_in_full_fp32_and_restores_the_flags():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # a user's TF32 for matrix products
    try:
        with no_tf32():
            assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_network_the_probe_cannot_compare_counts_as_different():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    x = torch.randn(1, 3, 4, 4)
    assert not same_outputs(Pair(), Pair(), x)  # not a tensor
    assert not same_outputs(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1).double(), x)  # cannot take fp32 input
    assert same_outputs(nn.Identity(), nn.Identity(), x)


def test_a_probe_keeps_the_fold_where_it_is_the_same_function():
    from tinycifar.models import create_model

    model = with_trained_norms(create_model("fastnet"))
    probe = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    folded = fold_batch_norms(model, probe=probe)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_folding_in_bf16_autocast_stays_within_bf16_rounding():
    """Under autocast the folded weights are rounded to bf16 once, the unfolded ones and the norm apart:
    the logits agree to bf16's precision, not bit for bit."""
    from tinycifar.models import create_model

    model = with_trained_norms(create_model("fastnet")).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        plain, folded = model(x).float(), fold_batch_norms(model)(x).float()
    assert (folded - plain).abs().max() <= 0.05 * plain.abs().max()
