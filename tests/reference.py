"""The project's own nets, so that no rewrite of model.py can break the project's tests.

Reference has the layers, and the state_dict keys, of model.py's default Net (5,288 parameters):
tests/run/ holds a real run of it, `python train.py` with that net in model.py, which the tests
tamper with and re-score.
"""
import torch.nn as nn


def block(c_in, c_out, dropout=0.0):
    layers = [nn.Conv2d(c_in, c_out, 3, bias=False), nn.BatchNorm2d(c_out), nn.SiLU()]
    return nn.Sequential(*layers, *([nn.Dropout(dropout)] if dropout else []))


class Reference(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.pool = block(1, 8), block(8, 8), nn.MaxPool2d(2)
        self.conv3, self.conv4, self.conv5 = block(8, 12, 0.05), block(12, 12, 0.05), block(12, 12, 0.05)
        self.head, self.gap = nn.Conv2d(12, 10, 3, bias=False), nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = (x - 0.1307) / 0.3081
        x = self.pool(self.conv2(self.conv1(x)))
        x = self.conv5(self.conv4(self.conv3(x)))
        return self.gap(self.head(x)).flatten(1)
