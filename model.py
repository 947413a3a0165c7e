"""A tiny CNN for MNIST: BatchNorm, Dropout, global average pooling, no fully-connected layer.

    python model.py        # prints the layer table and the receptive-field table

Input: (N, 1, 28, 28) floats in [0, 1], as ToTensor gives. Output: (N, 10) logits.
"""
import torch
import torch.nn as nn

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # training-set pixel statistics


def conv_block(c_in, c_out, dropout=0.0):
    """3x3 conv (no padding) -> BatchNorm -> SiLU [-> Dropout]. No conv bias: BN's shift replaces it.

    SiLU, x * sigmoid(x), is a smooth ReLU-like curve. Over 23 seeds on the held-out split it raised
    the min of the last 3 epochs' accuracy by 0.03 points over ReLU (README).
    """
    layers = [nn.Conv2d(c_in, c_out, 3, bias=False), nn.BatchNorm2d(c_out), nn.SiLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Net(nn.Module):
    def __init__(self, dropout=0.05):
        super().__init__()
        # Fixed normalisation inside the model: callers feed raw [0, 1] pixels.
        self.register_buffer("mean", torch.tensor(MNIST_MEAN))
        self.register_buffer("std", torch.tensor(MNIST_STD))
        # Strokes and edges at full resolution: 8 channels keep these big maps cheap.
        self.conv1 = conv_block(1, 8)
        self.conv2 = conv_block(8, 8)
        self.pool = nn.MaxPool2d(2)
        # Digit parts on small maps, where a parameter costs 6-16x less compute. 13 channels
        # is the widest that fits under 6,000 parameters. Per-pixel dropout only here: on these
        # few activations it is cheap, and it is gentler than dropping whole maps.
        self.conv3 = conv_block(8, 13, dropout)
        self.conv4 = conv_block(13, 13, dropout)
        self.conv5 = conv_block(13, 13, dropout)
        self.head = nn.Conv2d(13, 10, 3, bias=False)  # one 4x4 evidence map per class
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):              # (N, 1, 28, 28)
        x = (x - self.mean) / self.std
        x = self.conv1(x)              # (N, 8, 26, 26)   RF 3
        x = self.conv2(x)              # (N, 8, 24, 24)   RF 5
        x = self.pool(x)               # (N, 8, 12, 12)   RF 6
        x = self.conv3(x)              # (N, 13, 10, 10)  RF 10
        x = self.conv4(x)              # (N, 13, 8, 8)    RF 14
        x = self.conv5(x)              # (N, 13, 6, 6)    RF 18
        x = self.head(x)               # (N, 10, 4, 4)    RF 22
        x = self.gap(x)                # (N, 10, 1, 1)    RF 28: every logit sees the whole image
        return x.flatten(1)            # (N, 10) logits


def replace_modules(model, kind, make=nn.Identity):
    """Swaps each submodule of type `kind` for make(old), in place, and returns model. A replacement
    is not searched again, so it may wrap the module it replaces."""
    for name, child in model.named_children():
        if isinstance(child, kind):
            setattr(model, name, make(child))
        else:
            replace_modules(child, kind, make)
    return model


def count_params(model):
    """Every parameter, trainable or frozen: a frozen layer still has to fit in the budget."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def leaf_calls(model, x):
    """Runs model(x); returns ([(name, module, input shape, output)] per leaf module, in the order
    forward called them, and the model's output)."""
    names = {m: name for name, m in model.named_modules()}
    calls, hooks = [], []
    for m in model.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(
                lambda m, i, o: calls.append((names[m], m, tuple(i[0].shape), o))))
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls, out


def eval_leaf_calls(model, size=28):
    """leaf_calls on one blank size x size image in eval mode; the model's mode is left as it was."""
    was_training = model.training
    calls, _ = leaf_calls(model.eval(), torch.zeros(1, 1, size, size))
    model.train(was_training)
    return calls


def layer_table(model, size=28):
    """Rows of (name, type, output shape, params) for each leaf module run, like torchsummary."""
    return [(name, type(m).__name__, tuple(o.shape[1:]), sum(p.numel() for p in m.parameters()))
            for name, m, _, o in eval_leaf_calls(model, size)]


def receptive_field_table(model, size=28):
    """Rows of (name, kernel, padding, stride, n_in, n_out, jump, rf) for each conv and pool, in the
    order forward runs them.

    rf_out = rf_in + (kernel - 1) * jump_in;  jump_out = jump_in * stride.
    A dilated kernel counts its span; the global average pool's row uses the whole map as its kernel.
    """
    rows, rf, jump = [], 1, 1
    for name, m, in_shape, out in eval_leaf_calls(model, size):
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, p, s = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.padding, m.stride))
            d = getattr(m, "dilation", 1)
            k = (d if isinstance(d, int) else d[0]) * (k - 1) + 1
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            k, p, s = in_shape[-1], 0, 1
        else:
            continue
        rf, jump_in = rf + (k - 1) * jump, jump
        jump *= s
        rows.append((name, k, p, s, in_shape[-1], out.shape[-1], jump_in, rf))
    return rows


def main():
    model = Net()
    print(f"{'layer':<10}{'type':<19}{'output shape':>14}{'params':>8}")
    for name, kind, shape, params in layer_table(model):
        print(f"{name:<10}{kind:<19}{str(list(shape)):>14}{params:>8,}")
    print(f"{'total':<29}{'':>14}{count_params(model):>8,}\n")
    print(f"{'layer':<10}{'k':>4}{'p':>4}{'s':>4}{'n_in':>6}{'n_out':>6}{'j_in':>6}{'RF':>5}")
    for name, k, p, s, n_in, n_out, j, rf in receptive_field_table(model):
        print(f"{name:<10}{k:>4}{p:>4}{s:>4}{n_in:>6}{n_out:>6}{j:>6}{rf:>5}")


if __name__ == "__main__":
    main()
