"""Networks and the model registry.

Every network is ``features`` (convolutions, no max-pooling) followed by ``head``
(global average pooling and one linear layer). Keeping that split on every model
lets the receptive-field walk, the summary table and Grad-CAM work on any of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        MODEL_REGISTRY[name] = factory
        return factory

    return add


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(sorted(MODEL_REGISTRY))}")
    model = MODEL_REGISTRY[name](**kwargs)
    model.name = name
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- layers


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
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation, groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


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


# ---------------------------------------------------------------------------- networks


@register_model("era9")
def era9(num_classes: int = 10, dropout: float = 0.05) -> Net:
    """The assignment's network: C1..C4, strided/dilated downsampling, no max-pooling.

    C2 and C3 hold the depthwise-separable convolutions, C3 opens with a dilated one.
    Receptive field 83, 195,410 parameters, 21M multiply-accumulates per image.
    """
    d = dropout
    features = nn.Sequential(
        nn.Sequential(  # C1, 32x32
            ConvBNAct(3, 24, dropout=d),
            ConvBNAct(24, 32, dropout=d),
            ConvBNAct(32, 32, stride=2, dropout=d),  # -> 16x16
        ),
        nn.Sequential(  # C2, 16x16
            ConvBNAct(32, 48, dropout=d),
            DepthwiseSeparable(48, 64, dropout=d),
            ConvBNAct(64, 64, stride=2, dropout=d),  # -> 8x8
        ),
        nn.Sequential(  # C3, 8x8
            ConvBNAct(64, 64, dilation=2, dropout=d),
            DepthwiseSeparable(64, 96, dropout=d),
            ConvBNAct(96, 48, stride=2, dropout=d),  # -> 4x4
        ),
        nn.Sequential(  # C4, 4x4
            ConvBNAct(48, 64, dropout=d),
            DepthwiseSeparable(64, 128),
        ),
    )
    return Net(features, ClassifierHead(128, num_classes))


@register_model("fastnet")
def fastnet(num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 96), dropout: float = 0.0) -> Net:
    """Speed-first network: downsamples at once, residual blocks at 16x16 and 8x8.

    Half of era9's multiply-accumulates at 32x32 go away; residual connections keep the
    early epochs steep, which is what time-to-accuracy rewards.
    """
    c1, c2, c3 = widths
    features = nn.Sequential(
        nn.Sequential(  # C1: 32x32 -> 16x16
            ConvBNAct(3, c1),
            ConvBNAct(c1, c2, stride=2),
        ),
        nn.Sequential(  # C2: 16x16 -> 8x8
            Residual(DepthwiseSeparable(c2, c2)),
            ConvBNAct(c2, c3, stride=2, dropout=dropout),
        ),
        nn.Sequential(  # C3: 8x8, dilated
            Residual(ConvBNAct(c3, c3, dilation=2)),
        ),
        nn.Sequential(  # C4: 8x8, dilated depthwise-separable
            DepthwiseSeparable(c3, 128, dilation=3),
        ),
    )
    return Net(features, ClassifierHead(128, num_classes))


@torch.no_grad()
def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set ``conv``'s filters to the whitening basis of the images' patches (airbench's trick).

    Each filter projects a patch onto one principal direction scaled by 1/sqrt(variance);
    filters come in +/- pairs so a following ReLU keeps both signs. The first layer then
    starts decorrelated instead of random, which makes the first epochs count more.
    ``images``: a sample of normalized training images (N, C, H, W).
    """
    k, cin, cout = conv.kernel_size[0], conv.in_channels, conv.out_channels
    if conv.groups != 1 or cout % 2 or cout // 2 > cin * k * k:
        raise ValueError(f"whitening needs an ungrouped conv with an even number of at most {2 * cin * k * k} filters")
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, cin * k * k)
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / len(patches)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    top = eigvecs[:, -(cout // 2):].T / torch.sqrt(eigvals[-(cout // 2):, None] + eps)
    filters = top.reshape(-1, cin, k, k)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))


def _slimres(widths: tuple[int, int, int], stage3_blocks: int, num_classes: int, dropout: float) -> Net:
    """ResNet-style: full 3x3 residual blocks where the map is large and parameters cheap,
    depthwise-separable (first one dilated) residual blocks at 8x8 where width is expensive.

    Parameters buy little at 32x32 and 16x16 (few channels, many positions); at 8x8 a full
    3x3 conv of width 128 alone would cost 147k weights, so stage 3 is depthwise-separable.
    """
    c1, c2, c3 = widths
    stage3 = [Residual(nn.Sequential(DepthwiseSeparable(c3, c3, dilation=2 if i == 0 else 1),
                                     DepthwiseSeparable(c3, c3, dropout=dropout)))
              for i in range(stage3_blocks)]
    features = nn.Sequential(
        nn.Sequential(  # C1, 32x32
            ConvBNAct(3, c1),
            Residual(nn.Sequential(ConvBNAct(c1, c1), ConvBNAct(c1, c1))),
        ),
        nn.Sequential(  # C2, 16x16
            ConvBNAct(c1, c2, stride=2),
            Residual(nn.Sequential(ConvBNAct(c2, c2), ConvBNAct(c2, c2))),
        ),
        nn.Sequential(  # C3, 8x8
            DepthwiseSeparable(c2, c3, stride=2),
            *stage3[:1],
        ),
        nn.Sequential(*stage3[1:]),  # C4, 8x8
    )
    return Net(features, ClassifierHead(c3, num_classes))


@register_model("slimres50k")
def slimres50k(num_classes: int = 10, dropout: float = 0.0) -> Net:
    """slimres at widths 16/32/64: 51,258 parameters, 12M MACs, receptive field 61."""
    return _slimres((16, 32, 64), 2, num_classes, dropout)


@register_model("slimres100k")
def slimres100k(num_classes: int = 10, dropout: float = 0.0) -> Net:
    """slimres at widths 24/48/96: 111,442 parameters, 27M MACs, receptive field 61."""
    return _slimres((24, 48, 96), 2, num_classes, dropout)


@register_model("slimres200k")
def slimres200k(num_classes: int = 10, dropout: float = 0.0) -> Net:
    """slimres at widths 32/64/128, the ``best`` preset's network: 194,666 parameters, 48M MACs, RF 61."""
    return _slimres((32, 64, 128), 2, num_classes, dropout)
