"""Small composable layers the registered networks are built from, and the whitening stem."""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class _DilatedDepthwiseConv(torch.autograd.Function):
    """A stride-1, 'same'-padded, dilated depthwise convolution with a backward of our own.

    PyTorch's CPU backward for dilated depthwise convolutions is a slow path: on a 2-core AVX2 CPU
    at batch 128, fastnet's 96-channel one (8x8, dilation 3) took ~2 ms for the input's gradient
    and ~8 ms for the weights' against 0.14 ms forward; in bf16 on an AVX-512 CPU too. Here the
    input's gradient is the same convolution with the kernel flipped (a forward call, fast), and
    the weights' is summed tap by tap: ~1.6 ms together, a 32x32 fp32 step 0.93x, a 20x20 one
    0.89x (benchmarks/README.md, "Speed IV"). Full dilated convolutions keep PyTorch's backward:
    the same trick with matrix products was no faster in fp32 and slower in bf16.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        return F.conv2d(x, weight, None, 1, dilation * (weight.shape[-1] // 2), dilation, weight.shape[0])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        d, channels = ctx.dilation, weight.shape[0]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(2, 3).to(grad.dtype)
            grad_x = F.conv2d(grad, flipped, None, 1, d * (weight.shape[-1] // 2), d, channels)
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(grad, x, weight, d)
        return grad_x, grad_w, None


def depthwise_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """The weight gradient of a stride-1 'same' depthwise convolution, one kernel tap at a time: the
    output's gradient times the input shifted by that tap, summed per channel over the batch and the
    map. Each tap multiplies only where the shifted input overlaps the map (the padding's zeros add
    nothing), so no padded copy is made and an 8x8 map with dilation 3 takes 0.56x the products: the
    layer's forward and backward 0.62x in bf16 and 0.59x in fp32 (AVX2 approximated) against padding
    first (benchmarks/README.md, "Speed VIII"). In fp32, since bf16 products would round before the sum."""
    k, (h, w) = weight.shape[-1], grad.shape[-2:]
    grad32, x32 = grad.float(), x.float()
    taps = []
    for i in range(k):
        for j in range(k):
            dy, dx = (i - k // 2) * dilation, (j - k // 2) * dilation
            rows, cols = overlapping_slices(h, dy), overlapping_slices(w, dx)
            taps.append((grad32[:, :, rows[0], cols[0]] * x32[:, :, rows[1], cols[1]]).sum((0, 2, 3)))
    return torch.stack(taps, 1).view_as(weight).to(weight.dtype)


def overlapping_slices(size: int, shift: int) -> tuple[slice, slice]:
    """Where a map of ``size`` and its copy moved by ``shift`` overlap: the output's slice and the
    input's (both empty when the shift reaches past the map)."""
    length = max(0, size - abs(shift))
    return slice(max(0, -shift), max(0, -shift) + length), slice(max(0, shift), max(0, shift) + length)


class DilatedDepthwiseConv2d(nn.Conv2d):
    """A kxk (odd k) stride-1 'same' dilated depthwise convolution that trains on the CPU through
    ``_DilatedDepthwiseConv``; its weights, state dict, inference and export are nn.Conv2d's."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 2):
        if kernel_size % 2 == 0:
            raise ValueError(f"DilatedDepthwiseConv2d: kernel_size must be odd, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, 1, dilation * (kernel_size - 1) // 2, dilation,
                         groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._trains_on_the_cpu(x):
            return _DilatedDepthwiseConv.apply(x, self.weight, self.dilation[0])
        return super().forward(x)

    def _trains_on_the_cpu(self, x: torch.Tensor) -> bool:
        """Only a CPU training step takes our backward: evaluation, inference and export (an eval-mode
        model, even with gradients on; a trace, which cannot hold a Python autograd function) run
        nn.Conv2d's forward, so what they record is a plain convolution."""
        return (self.training and x.device.type == "cpu" and torch.is_grad_enabled()
                and self.weight.requires_grad and not torch.jit.is_tracing())


class ConvBNAct(nn.Sequential):
    """3x3 (or kxk) convolution, batch norm, ReLU; 'same' padding for any dilation."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        dropout: float = 0.0,
        act: bool = True,
    ):
        padding = dilation * (kernel_size - 1) // 2
        if dilation > 1 and stride == 1 and kernel_size % 2 and groups == cin == cout:
            conv: nn.Conv2d = DilatedDepthwiseConv2d(cin, kernel_size, dilation)  # its CPU backward is faster
        else:
            conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation, groups, bias=False)
        layers: list[nn.Module] = [conv, nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


def fold_batch_norms(model: nn.Module, probe: torch.Tensor | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` in which each batch norm that directly follows a convolution inside an
    ``nn.Sequential`` (ConvBNAct; networks of yours written that way) is folded into the convolution's
    weights and bias: the same function up to float rounding, without a pass over every map for the norm.
    A test pass over the 10,000 CIFAR-10 test images with flip TTA took 0.85x in fp32 (Intel Xeon,
    approximating AVX2; benchmarks/README.md, "Speed XIV"). Only where the order is the forward's for
    sure: a Sequential that keeps nn.Sequential's forward, a plain convolution (or ours, which infers as
    one) and a plain batch norm, neither hooked (a hook would see another output, or be lost).
    A forward of yours may still call a Sequential's layers one by one, or use a convolution's output
    before its norm: with ``probe`` (a few inputs) the folded copy is returned only where its outputs on
    them are the unfolded network's, else an unfolded eval-mode copy. ``model`` itself is not changed."""
    folded, changed = copy.deepcopy(model).eval(), False
    for block in folded.modules():
        if not isinstance(block, nn.Sequential) or type(block).forward is not nn.Sequential.forward:
            continue
        for i in range(len(block) - 1):
            conv, norm = block[i], block[i + 1]
            if (type(conv) in (nn.Conv2d, DilatedDepthwiseConv2d) and type(norm) is nn.BatchNorm2d
                    and norm.running_mean is not None and not hooked(conv) and not hooked(norm)):
                block[i], block[i + 1], changed = fuse_conv_bn_eval(conv, norm), nn.Identity(), True
    if changed and probe is not None:
        plain = copy.deepcopy(model).eval()
        if not same_outputs(plain, folded, probe):
            warnings.warn(f"{type(model).__name__}: its forward is not the one its batch norms could be folded "
                          "into (checked on a few inputs); it runs unfolded", stacklevel=2)
            return plain
    return folded


@torch.no_grad()
def same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    """Whether two networks give x the same tensor, in full fp32: no autocast and no TF32 (a CUDA GPU's
    default for convolutions, whose 10-bit mantissas round the folded and unfolded weights apart by
    more than the tolerance), so a correct fold differs by float rounding alone. The tolerance, 1e-4
    of the largest output, is some 300 times what fp32 rounding left in a trained fastnet (3.3e-7 on
    1,000 test images; benchmarks/README.md, "Speed XV"). A network that cannot take x in fp32 counts
    as different: the unfolded copy is the safe answer."""
    try:
        with torch.autocast(x.device.type, enabled=False), no_tf32():
            ya, yb = a(x.float()), b(x.float())
    except (RuntimeError, TypeError):
        return False
    if not (isinstance(ya, torch.Tensor) and isinstance(yb, torch.Tensor)) or ya.shape != yb.shape:
        return False
    return bool(((ya - yb).abs().max() <= 1e-4 * (1 + ya.abs().max())).item())


@contextlib.contextmanager
def no_tf32():
    """CUDA convolutions and matrix products in full fp32 inside, the flags as they were after."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn
    torch.set_float32_matmul_precision("highest")
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)


def hooked(module: nn.Module) -> bool:
    """Whether a forward hook or pre-hook is registered on the module itself."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class DepthwiseSeparable(nn.Sequential):
    """Depthwise kxk then pointwise 1x1: ~k*k times fewer weights than a full conv."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0):
        super().__init__(
            ConvBNAct(cin, cin, 3, stride, dilation, groups=cin),
            ConvBNAct(cin, cout, 1, dropout=dropout),
        )


class Residual(nn.Module):
    """x + body(x); the identity path adds nothing to the receptive field."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al., 2018): each channel scaled by a gate computed from the
    whole map's channel means, through a ``hidden``-wide bottleneck.

    It buys global context for about ``2 * channels * hidden`` weights; the global average here
    does not count toward the receptive field or the classifier's pooling (models/graph.py).
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class ClassifierHead(nn.Sequential):
    """Global average pooling, then a linear layer to the classes."""

    def __init__(self, cin: int, num_classes: int = 10, scale: float = 1.0):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale if self.scale != 1.0 else super().forward(x)


class Net(nn.Module):
    """features -> head. ``features`` keeps the spatial map that Grad-CAM reads."""

    def __init__(self, features: nn.Sequential, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# Patches held on the device at a time while the whitening covariance is summed: 2**20 patches of
# 3x3x3 values are 113 MB, so a 128 px sample fits a 16 GB GPU (all 5000 images at once: 8.6 GB a copy).
WHITENING_PATCHES_PER_CHUNK = 1 << 20


def patch_rows(images: torch.Tensor, k: int) -> torch.Tensor:
    """Every k x k patch of the images as one row (N * H' * W', C * k * k)."""
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * k * k)


def patch_covariance(images: torch.Tensor, k: int, device: torch.device,
                     max_patches: int = WHITENING_PATCHES_PER_CHUNK) -> torch.Tensor:
    """Covariance of the images' k x k patches, summed over chunks of at most ``max_patches`` patches.

    One pass: each chunk adds its patches' sum and Gram matrix (in float32, accumulated in float64),
    and the covariance is Gram / n - mean mean^T, which equals centring all patches at once up
    to float rounding (the images are normalized, so the mean is small beside the spread). Only one
    chunk's patches exist at a time; ``images`` may stay on the CPU, each chunk goes to ``device``.
    Centring each chunk on the mean from a first pass built every patch row twice: 0.99 s against
    0.58 s of a 2-core CPU's start-up for 5000 images (Intel Xeon approximating AVX2).
    """
    per_image = (images.shape[2] - k + 1) * (images.shape[3] - k + 1)
    step = max(1, max_patches // per_image)
    width = images.shape[1] * k * k
    total = torch.zeros(width, dtype=torch.float64, device=device)
    gram = torch.zeros(width, width, dtype=torch.float64, device=device)
    for i in range(0, len(images), step):
        rows = patch_rows(images[i : i + step].to(device), k)
        total += rows.sum(0).double()  # a float64 sum of the rows took three times as long
        gram += (rows.T @ rows).double()
    count = len(images) * per_image
    mean = total / count
    return (gram / count - torch.outer(mean, mean)).float()


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4,
                   max_patches: int = WHITENING_PATCHES_PER_CHUNK) -> None:
    """Set ``conv``'s filters to the whitening basis of the images' patches (airbench's trick).

    Each filter projects a patch onto one principal direction scaled by 1/sqrt(variance);
    filters come in +/- pairs so a following ReLU keeps both signs. The first layer then
    starts decorrelated instead of random, which makes the first epochs count more.
    ``images``: a sample of normalized training images (N, C, H, W), on any device; the patch
    covariance is summed in chunks of ``max_patches`` on the conv's device (see ``patch_covariance``).
    """
    k, cin, cout = conv.kernel_size[0], conv.in_channels, conv.out_channels
    if conv.groups != 1 or cout % 2 or cout // 2 > cin * k * k:
        raise ValueError(f"whitening needs an ungrouped conv with an even number of at most {2 * cin * k * k} filters")
    cov = patch_covariance(images, k, conv.weight.device, max_patches)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    top = eigvecs[:, -(cout // 2):].T / torch.sqrt(eigvals[-(cout // 2):, None] + eps)
    filters = top.reshape(-1, cin, k, k)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))
