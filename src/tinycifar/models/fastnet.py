"""fastnet: the speed-first network of the ``fast`` preset."""

from __future__ import annotations

from torch import nn

from .layers import ClassifierHead, ConvBNAct, DepthwiseSeparable, Net, Residual
from .registry import register_model


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
