"""fastnet: the speed-first network of the ``fast`` preset."""

from __future__ import annotations

from torch import nn

from .layers import ClassifierHead, ConvBNAct, DepthwiseSeparable, Net, Residual
from .registry import register_model


@register_model("fastnet")
def fastnet(num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 96), dropout: float = 0.0,
            stem_stride: int = 1, block16: bool = True) -> Net:
    """Speed-first network: downsamples at once, residual blocks at 16x16 and 8x8.

    Half of era9's multiply-accumulates at 32x32 go away; residual connections keep the
    early epochs steep, which is what time-to-accuracy rewards. ``stem_stride=2`` moves the
    downsampling into the first convolution, so nothing runs at 32x32 at all (on a CPU the
    step is bound by memory traffic, and the 32x32 maps were a third of it). ``block16=False`` leaves
    out the residual block at 16x16 (173,002 parameters, receptive field 49): little arithmetic but
    much memory traffic, so a fp32 epoch took about 0.8x on a CPU approximating AVX2, but the `fast`
    recipe needed a seventh epoch for the accuracy, and took as long (benchmarks/README.md, "Speed XII").
    """
    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
    c1, c2, c3 = widths
    features = nn.Sequential(
        nn.Sequential(  # C1: 32x32 -> 16x16
            ConvBNAct(3, c1, stride=stem_stride),
            ConvBNAct(c1, c2, stride=3 - stem_stride),
        ),
        nn.Sequential(  # C2: 16x16 -> 8x8
            *([Residual(DepthwiseSeparable(c2, c2))] if block16 else []),
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
