"""A network of your own for the ERA V1 session-9 assignment, written the way the course does.

Check it, train it, report it and export it without touching tinycifar's source:

    tinycifar check  --model examples/my_net.py:Net
    tinycifar train  --model examples/my_net.py:Net --preset seed --out runs/my-net
    tinycifar report runs/my-net --model examples/my_net.py:Net
    tinycifar export --checkpoint runs/my-net/best.pt --model examples/my_net.py:Net --out my_net.onnx

Rules: blocks C1-C4 then an output block, no max-pooling (C1-C3 end in a stride-2 or dilated
convolution instead), a depthwise-separable and a dilated convolution, global average
pooling then one linear layer, fewer than 200,000 parameters, receptive field above 44.
"""

import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1, dropout: float = 0.0) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU, dropout; padding keeps the size unless strided."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(), nn.Dropout(dropout),
    )


def separable(cin: int, cout: int, dropout: float = 0.0) -> nn.Sequential:
    """Depthwise 3x3 (one filter per channel), then a pointwise 1x1 that mixes the channels."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(), nn.Dropout(dropout),
    )


class Net(nn.Module):
    def __init__(self, width: int = 28, dropout: float = 0.05, num_classes: int = 10):
        super().__init__()
        w, d = width, dropout
        self.c1 = nn.Sequential(conv_bn(3, w, dropout=d), conv_bn(w, w, dropout=d),
                                conv_bn(w, w, stride=2, dropout=d))                      # 32 -> 16
        self.c2 = nn.Sequential(conv_bn(w, 2 * w, dropout=d), separable(2 * w, 2 * w, d),
                                conv_bn(2 * w, 2 * w, stride=2, dropout=d))              # 16 -> 8
        self.c3 = nn.Sequential(conv_bn(2 * w, 2 * w, dilation=2, dropout=d), separable(2 * w, 3 * w, d),
                                conv_bn(3 * w, 3 * w, stride=2, dropout=d))              # 8 -> 4
        self.c4 = nn.Sequential(separable(3 * w, 4 * w, d), separable(4 * w, 4 * w))  # 4x4
        self.fc = nn.Linear(4 * w, num_classes)                                        # output block

    def forward(self, x):
        x = self.c4(self.c3(self.c2(self.c1(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # global average pooling
        return self.fc(x)
