"""A tiny CNN for MNIST: BatchNorm, Dropout, global average pooling, no fully-connected layer.

    python summary.py      # prints this Net's layer table and receptive-field table

How each choice was made, with the measurements behind it: research/README.md#the-default-net.

This is the file to rewrite. train.py and the gate build `Net()` with no arguments and feed it
(N, 1, 28, 28) floats in [0, 1], as ToTensor gives, with no Normalize in front: a model that wants
normalised inputs normalises them itself, as this one does first thing in forward. The output is
(N, 10): logits, as here, or log-probabilities (F.log_softmax); train.py's loss takes either.
"""
import torch.nn as nn

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # training-set pixel statistics
DROPOUT = 0.05  # after conv3, conv4 and conv5


def conv_block(c_in, c_out, dropout=0.0):
    """3x3 conv (no padding) -> BatchNorm -> SiLU [-> Dropout]. No conv bias: BN's shift replaces it.
    SiLU, x * sigmoid(x), is a smooth ReLU-like curve; it held the bar more often than ReLU did."""
    layers = [nn.Conv2d(c_in, c_out, 3, bias=False), nn.BatchNorm2d(c_out), nn.SiLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # Strokes and edges at full resolution: 8 channels keep these big maps cheap.
        self.conv1 = conv_block(1, 8)
        self.conv2 = conv_block(8, 8)
        self.pool = nn.MaxPool2d(2)
        # Digit parts on small maps, where a parameter costs 6-16x less compute: 12 channels is the
        # narrowest width that held the bar (the size frontier). Per-pixel dropout only here: on these
        # few activations it is cheap, and it is gentler than dropping whole maps.
        self.conv3 = conv_block(8, 12, DROPOUT)
        self.conv4 = conv_block(12, 12, DROPOUT)
        self.conv5 = conv_block(12, 12, DROPOUT)
        self.head = nn.Conv2d(12, 10, 3, bias=False)  # one 4x4 evidence map per class
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):              # (N, 1, 28, 28)
        x = (x - MNIST_MEAN) / MNIST_STD  # fixed normalisation: callers feed raw [0, 1] pixels
        x = self.conv1(x)              # (N, 8, 26, 26)   RF 3
        x = self.conv2(x)              # (N, 8, 24, 24)   RF 5
        x = self.pool(x)               # (N, 8, 12, 12)   RF 6
        x = self.conv3(x)              # (N, 12, 10, 10)  RF 10
        x = self.conv4(x)              # (N, 12, 8, 8)    RF 14
        x = self.conv5(x)              # (N, 12, 6, 6)    RF 18
        x = self.head(x)               # (N, 10, 4, 4)    RF 22
        x = self.gap(x)                # (N, 10, 1, 1)    RF 28: every logit sees the whole image
        return x.flatten(1)            # (N, 10) logits
