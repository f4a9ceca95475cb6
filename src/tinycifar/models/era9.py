"""era9: the assignment's own network (the ``seed`` preset)."""

from __future__ import annotations

from torch import nn

from .layers import ClassifierHead, ConvBNAct, DepthwiseSeparable, Net
from .registry import register_model


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
