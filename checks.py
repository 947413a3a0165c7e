"""How the gate judges a model against the assignment's rules (rules.py): by the torch operations
its forward pass runs (summary.torch_calls), the numbers it carries (summary.carried_tensors) and
the input pixels each logit depends on. test_model.py applies check_architecture to model.py's Net;
train.py applies it before the first epoch, so a refusal shows in seconds, not after training.
"""
import copy

import torch
from torch.overrides import TorchFunctionMode

from rules import CLASSES, CLASSIFIER_AFTER_GAP, PARAMS_BELOW
from summary import argument, carried_tensors, size, torch_calls

# How the recorded torch calls (summary.torch_calls) are read. Modules and their functional forms
# record the same name: nn.Dropout and F.dropout are both "dropout".
BATCH_NORM = "batch_norm"
DROPOUT_TRAINS_BY_DEFAULT = {"dropout": True, "dropout1d": True, "dropout2d": True, "dropout3d": True,
                             "alpha_dropout": False, "feature_alpha_dropout": False}
RESHAPES = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous"}
OUTPUT_NORMALISERS = {"softmax", "log_softmax"}
CLASSIFIERS = {"linear", "conv2d"}  # nn.Linear / F.linear; nn.Conv2d / F.conv2d, 1x1 only


def drops(call):
    """Whether a recorded call is a dropout that drops: p > 0, in training mode."""
    if call.name not in DROPOUT_TRAINS_BY_DEFAULT:
        return False
    training = call.kwargs.get("train", argument(call, 2, "training", DROPOUT_TRAINS_BY_DEFAULT[call.name]))
    return argument(call, 1, "p", 0.5) > 0 and bool(training)


def average_pool_to_one(call):
    """The (H, W) that a recorded call averages to one value per channel, or None if it is no such
    pool: adaptive_avg_pool2d to 1x1, avg_pool2d with a window over the whole map, a mean over H and
    W, or a mean over the last axis of a map viewed as (N, C, H*W). A map that is the same at every
    position on the traced batch (a 1x1 map expanded or upsampled) counts as 1x1."""
    x = call.args[0] if call.args else call.kwargs.get("input")
    if not (isinstance(x, torch.Tensor) and x.dim() in (3, 4) and isinstance(call.out, torch.Tensor)):
        return None
    hw = tuple(x.shape[2:]) if x.dim() == 4 else (x.shape[2], 1)
    if x.numel() and bool((x.flatten(2).amax(2) == x.flatten(2).amin(2)).all()):
        hw = (1, 1)
    dims = argument(call, 1, "dim") if call.name == "mean" else None
    dims = None if dims is None else {d % x.dim() for d in ((dims,) if isinstance(dims, int) else dims)}
    if dims == ({2, 3} if x.dim() == 4 else {2}):  # x.mean((2, 3)), or x.view(n, c, -1).mean(-1)
        return hw
    if x.dim() == 3:
        return None
    if call.name == "adaptive_avg_pool2d" and tuple(call.out.shape[-2:]) == (1, 1):
        return hw
    if call.name == "avg_pool2d":
        kernel, padding = argument(call, 1, "kernel_size"), argument(call, 3, "padding", 0)
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        if kernel[0] >= x.shape[2] and kernel[1] >= x.shape[3] and padding in (0, (0, 0), [0, 0]):
            return hw
    return None


def tensors_in(call):
    values = [*call.args, *call.kwargs.values()]
    return [t for v in values for t in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(t, torch.Tensor)]


def feeding(calls, out):
    """The indices of the calls that the output depends on, found walking back from it: a layer
    whose result is thrown away does not count."""
    on_path, needed = set(), {id(out)}
    for i in reversed(range(len(calls))):
        if id(calls[i].out) in needed:
            on_path.add(i)
            needed.update(id(t) for t in tensors_in(calls[i]))
    return on_path


def reshapes(call):
    """Whether a call only rearranges the values it is given (x[:, :, 0, 0] on a 1x1 map included)."""
    if call.name == "getitem":
        return isinstance(call.out, torch.Tensor) and call.out.numel() == call.args[0].numel()
    return call.name in RESHAPES


def check_head(calls, out, on_path):
    """A global average pool over a map larger than 1x1 feeds the output, and what runs between the
    two is parameter-free (reshapes, dropout, softmax / log_softmax) but for one optional classifier."""
    pools = {i: hw for i, call in enumerate(calls) if (hw := average_pool_to_one(call))}
    assert pools, ("no global average pooling ran in forward: use nn.AdaptiveAvgPool2d(1), nn.AvgPool2d over the "
                   "whole map, F.adaptive_avg_pool2d(x, 1) or x.mean((2, 3))")
    gaps = [i for i, (h, w) in pools.items() if h * w > 1]
    assert gaps, f"the average pool maps {tuple(pools[max(pools)])} to (1, 1): it must pool a map larger than 1x1"
    feeding_gaps = [i for i in gaps if i in on_path]
    assert feeding_gaps, "the output does not come from the global average pool"
    gap = feeding_gaps[-1]  # the last pool the output comes from: what runs before it is the body of the net
    # Before it, nn.Linear may only act on a pooled vector (a squeeze-and-excitation gate, say), not on
    # a map: flatten -> nn.Linear -> view -> pool is a fully-connected head with a pool for show.
    vectors = set()
    for i, call in enumerate(calls[:gap]):
        if i in pools or (reshapes(call) and any(id(t) in vectors for t in tensors_in(call))):
            vectors.add(id(call.out))
        elif call.name == "linear" and i in on_path:
            assert id(call.args[0]) in vectors, \
                "nn.Linear runs on a map before the global average pool: a fully-connected layer may only " \
                "classify the pooled vector"
    allowed = "reshapes, dropout, softmax or log_softmax" + \
              (" and one classifier (nn.Linear or a 1x1 conv)" if CLASSIFIER_AFTER_GAP else "")
    pooled, classifiers = {id(calls[gap].out)}, 0
    for i in range(gap + 1, len(calls)):
        call = calls[i]
        if i not in on_path or not any(id(t) in pooled for t in tensors_in(call)):
            continue  # work the output does not depend on, or on another branch that joins later
        if call.name in CLASSIFIERS:
            assert CLASSIFIER_AFTER_GAP, \
                f"`{call.name}` runs after the global average pool: these rules allow no classifier there"
            kernel = tuple(argument(call, 1, "weight").shape[-2:]) if call.name == "conv2d" else (1, 1)
            assert kernel == (1, 1), \
                f"a {kernel[0]}x{kernel[1]} conv runs after the global average pool: only a 1x1 conv or nn.Linear " \
                "may classify the pooled map"
            classifiers += 1
            assert classifiers == 1, f"{classifiers} layers run after the global average pool: {allowed} may follow it"
        else:
            assert reshapes(call) or call.name in OUTPUT_NORMALISERS | set(DROPOUT_TRAINS_BY_DEFAULT), \
                f"`{call.name}` runs after the global average pool: only {allowed} may follow it"
        pooled.add(id(call.out))


class _RectifiersAsIdentity(TorchFunctionMode):
    """ReLU and its clipped kin pass their input through: a unit that is dead at initialisation
    still connects its inputs to the output, and the blind-pixel check is about the connections."""

    RECTIFIERS = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.RECTIFIERS:
            return args[0]
        return func(*args, **(kwargs or {}))


def blind_pixels(model):
    """For each logit, the input pixels it does not depend on, found by gradients (with rectifiers
    passing everything through), not read off the layers."""
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with _RectifiersAsIdentity():
        logits = model.eval()(x)
    blind = []
    for k in range(logits.shape[1]):
        (grad,) = torch.autograd.grad(logits[:, k].sum(), x, retain_graph=True)
        blind.append(int((grad.abs().sum(0) == 0).sum()))
    return blind


def check_size(model):
    """Counts every number the model carries, not only model.parameters(): a buffer or a tensor
    kept on the side is as much a learned table as a weight is (summary.carried_tensors)."""
    carried = carried_tensors(model)
    total = sum(size(t) for t in carried.values())
    largest = ", ".join(f"{name} {size(t):,}" for name, t in sorted(carried.items(), key=lambda item: -size(item[1]))[:3])
    assert total < PARAMS_BELOW, \
        f"{total:,} parameters and other carried numbers; the rule is fewer than {PARAMS_BELOW:,} (largest: {largest})"


def check_architecture(model):
    """The assignment's rules on a model, judged by the torch operations its forward pass runs."""
    model = copy.deepcopy(model).train()  # dropout drops only in training; a copy, as BatchNorm's statistics move
    calls, out = torch_calls(model, torch.rand(4, 1, 28, 28))
    assert isinstance(out, torch.Tensor) and out.shape == (4, CLASSES), \
        f"output {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__} for 4 images, " \
        f"expected (4, {CLASSES}): logits or log-probabilities"
    on_path = feeding(calls, out)
    assert any(calls[i].name == BATCH_NORM for i in on_path), \
        "no BatchNorm ran in forward (nn.BatchNorm2d or F.batch_norm; one defined but not called, or whose " \
        "result is not used, does not count)"
    assert any(drops(calls[i]) for i in on_path), \
        "no Dropout with p > 0 ran in forward in training mode (nn.Dropout, nn.Dropout2d, or " \
        "F.dropout(x, p, training=self.training); one whose result is not used does not count)"
    check_head(calls, out, on_path)
    for k, blind in enumerate(blind_pixels(model)):
        assert blind == 0, f"logit {k} ignores {blind} of the 784 input pixels: every logit must see the whole image"
    check_size(model)  # after the forward passes: what forward creates or registers counts too
