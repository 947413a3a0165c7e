"""The nets the research scripts study, built here and never taken from model.py: a student's
rewrite of model.py leaves every script able to start.

    plain((8, 8), (12, 12, 12), "3x3")   # the default's layers: model.py's Net, 5,288 parameters

Families:
- plain: 3x3 convs (no padding) -> BatchNorm -> SiLU, a max-pool after the convs in `before`,
  dropout after each conv in `after`;
- separable: the same, but each conv after the pool is depthwise-separable: a 3x3 per channel, then a
  1x1 that mixes them (16 -> 16 channels cost 144 + 256 numbers instead of 2,304); padded, its convs
  keep the map's size, and a second max-pool may sit among them.
The head is "3x3" (a 3x3 conv to 10 class maps, then the global average pool, as model.py's Net),
"sep3x3" (the same conv made depthwise-separable: a 3x3 per channel, then a 1x1 to 10 maps) or
"1x1" (the global average pool, then a bias-free 1x1 conv to 10: a fully-connected layer on the
pooled vector).
"""
import torch.nn as nn

from measure import count_numbers

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DROPOUT = 0.05


def conv_block(c_in, c_out, dropout=0.0, separable=False, padding=0):
    """[depthwise 3x3 ->] 3x3 or 1x1 conv -> BatchNorm -> SiLU [-> Dropout], no conv bias."""
    if separable:
        convs = [nn.Conv2d(c_in, c_in, 3, padding=padding, groups=c_in, bias=False),
                 nn.Conv2d(c_in, c_out, 1, bias=False)]
    else:
        convs = [nn.Conv2d(c_in, c_out, 3, padding=padding, bias=False)]
    layers = [*convs, nn.BatchNorm2d(c_out), nn.SiLU()]
    return nn.Sequential(*layers, *([nn.Dropout(dropout)] if dropout else []))


class Family(nn.Module):
    """before-pool convs, a max-pool, after-pool convs, and a head; input raw [0, 1] pixels. An
    entry "pool" in `after` is a second max-pool there; `padding` applies to the after-pool convs."""

    def __init__(self, before, after, head, separable=False, dropout=DROPOUT, padding=0):
        super().__init__()
        widths = (1, *before)
        layers = [conv_block(c_in, c_out) for c_in, c_out in zip(widths, widths[1:])]
        layers.append(nn.MaxPool2d(2))
        c_in = before[-1]
        for c_out in after:
            if c_out == "pool":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_block(c_in, c_out, dropout, separable, padding))
                c_in = c_out
        if head == "3x3":
            layers += [nn.Conv2d(c_in, 10, 3, bias=False), nn.AdaptiveAvgPool2d(1)]
        elif head == "sep3x3":
            layers += [nn.Conv2d(c_in, c_in, 3, groups=c_in, bias=False),
                       nn.Conv2d(c_in, 10, 1, bias=False), nn.AdaptiveAvgPool2d(1)]
        else:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, 10, 1, bias=False)]
        self.layers = nn.Sequential(*layers, nn.Flatten())

    def forward(self, x):
        return self.layers((x - MNIST_MEAN) / MNIST_STD)


def plain(before, after, head):
    """A zero-argument builder, as train.py takes one."""
    return lambda: Family(before, after, head)


def separable(before, after, head, padding=0):
    return lambda: Family(before, after, head, separable=True, padding=padding)


def params(build):
    """The numbers a net carries, counted as the gate counts them (measure.count_numbers)."""
    return count_numbers(build())
