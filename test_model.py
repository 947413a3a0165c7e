"""The gate: `pytest -q`. A number in metrics.json is a claim; the committed weights, re-scored
on the official 10,000-image test set, are the proof.

    pytest -q                                   # the gate (about half a minute on 2 CPU cores)
    pytest -q test_model.py::test_architecture  # model.py's Net alone against the rules: no training needed
    pytest -q -m slow                           # retrain from scratch with the defaults, hold it to the gate

The check_* functions raise AssertionError with a message that says what to do; the tests apply
them to model.py's Net and the committed artifacts here, to every accepted and refused way of
writing a model in test_rules.py, and to tampered artifacts in test_failures.py.
"""
import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

from model import Net
from summary import argument, buildable, carried_tensors, count_params, size, torch_calls

# --- The assignment's rules. A course changes them here, and nowhere else. ---------------------
PARAMS_BELOW = 8_000        # every number the model carries: parameters, buffers, tables kept on the side
MIN_ACCURACY = 99.40        # percent on the official 10,000-image test set,
LAST_EPOCHS = 3             # in each of the last 3 epochs (one lucky epoch is not a result),
MAX_EPOCHS = 15             # within 15 epochs.
CLASSIFIER_AFTER_GAP = True  # "optionally, a fully-connected layer": one nn.Linear, or a 1x1 conv, on the pooled map
CLASSES = 10                # the output is (N, 10): logits or log-probabilities
# BatchNorm, Dropout (p > 0, dropping in training) and a global average pool over a map larger than
# 1x1 must each run in forward. After the pool only reshapes, dropout, softmax or log_softmax and the
# optional classifier may follow. Every logit must depend on all 784 input pixels.
# ------------------------------------------------------------------------------------------------

CLAIM_TOLERANCE = 0.02   # points (2 test images) between a claim and the CPU re-score: GPU kernels round differently

ROOT = Path(__file__).parent
METRICS, WEIGHTS = ROOT / "metrics.json", ROOT / "model.pt"
RETRAIN = ("run `python train.py` (about 3 minutes on a laptop CPU) and commit model.pt, metrics.json and "
           "curves.png")
CHECKPOINT_ENTRIES = {"model": dict, "last_epochs": dict, "config": dict}  # what train.py writes to model.pt

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


def new_model():
    """model.py's Net(), which must build with no arguments; an error inside it keeps its traceback."""
    problem = buildable(Net)
    assert problem is None, problem
    return Net()


def check_metrics(metrics, params):
    """metrics.json (read_metrics has checked its fields) against the bar and the model."""
    history = metrics["history"]
    assert metrics["epochs"] == len(history) <= MAX_EPOCHS, \
        f"{metrics['epochs']} epochs claimed, {len(history)} recorded; the limit is {MAX_EPOCHS}"
    assert metrics["params"] == params, f"metrics.json says {metrics['params']} params, the model has {params}: {RETRAIN}"
    assert metrics["test_accuracy"] == history[-1]["test_accuracy"], "test_accuracy is not the last epoch's"
    last = [h["test_accuracy"] for h in history[-LAST_EPOCHS:]]
    assert len(last) == LAST_EPOCHS and min(last) >= MIN_ACCURACY, \
        f"last {LAST_EPOCHS} epochs {last}: each must be >= {MIN_ACCURACY}"


def load_weights(metrics, path):
    """sha256 against metrics.json, then a safe load (tensors only).

    Returns {epoch: Net in eval mode} for the last LAST_EPOCHS epochs; the last one is the saved model."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == metrics["checkpoint"]["sha256"], f"{path.name} does not match metrics.json's sha256: {RETRAIN}"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, not a torch file, or pickled code
        reason = (str(e).strip().splitlines() or [""])[0]
        raise AssertionError(f"{path.name} could not be loaded ({type(e).__name__}: {reason}): {RETRAIN}") from None
    for entry, kind in CHECKPOINT_ENTRIES.items():
        assert isinstance(checkpoint, dict) and isinstance(checkpoint.get(entry), kind), \
            f"{path.name} has no {entry!r} entry of type {kind.__name__}: {RETRAIN}"
    epochs = [h["epoch"] for h in metrics["history"][-LAST_EPOCHS:]]
    kept = checkpoint["last_epochs"]
    assert all(isinstance(e, int) and isinstance(weights, dict) for e, weights in kept.items()), \
        f"{path.name}: 'last_epochs' must map epoch numbers to weights: {RETRAIN}"
    assert all(e in kept for e in epochs), \
        f"{path.name} keeps the weights of epochs {sorted(kept)}, the gate re-scores {epochs}: {RETRAIN}"
    final = kept[epochs[-1]]
    assert checkpoint["model"].keys() == final.keys() and all(
        torch.equal(checkpoint["model"][k], final[k]) for k in final), \
        f"{path.name}: the saved model is not the last epoch's weights: {RETRAIN}"
    models = {}
    for epoch in epochs:
        models[epoch] = new_model()
        try:
            models[epoch].load_state_dict(kept[epoch])
        except RuntimeError as e:
            raise AssertionError(f"{path.name}: the weights of epoch {epoch} do not fit model.py's Net "
                                 f"({' '.join(str(e).split())[:300]}): {RETRAIN}") from None
        models[epoch].eval()
    return models


@torch.no_grad()
def score(model, test_set):
    """Accuracy in percent with the plain torchvision pipeline, independent of train.py's."""
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in DataLoader(test_set, batch_size=1000))
    return 100 * correct / len(test_set)


def check_scores(metrics, scores):
    """scores: {epoch: test accuracy of that epoch's saved weights, re-scored here}."""
    claimed = {h["epoch"]: h["test_accuracy"] for h in metrics["history"]}
    for epoch, accuracy in scores.items():
        assert abs(accuracy - claimed[epoch]) <= CLAIM_TOLERANCE + 1e-9, \
            f"epoch {epoch}: the weights score {accuracy:.2f}% but metrics.json claims {claimed[epoch]:.2f}%: {RETRAIN}"
        assert accuracy >= MIN_ACCURACY, f"epoch {epoch}: the weights score {accuracy:.2f}%, below {MIN_ACCURACY}%"


def whole(value):
    """A JSON integer (true and false are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def percent(value):
    """A JSON number from 0 to 100 (NaN and infinity are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 100


def read_metrics(path):
    """metrics.json of a test-set run, checked for every field the gate reads, so that a broken file
    (or one from a --holdout run) fails every test with one message that names the file and the fix."""
    path = Path(path)
    assert path.exists(), f"{path.name} is missing: {RETRAIN}"
    try:
        metrics = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AssertionError(f"{path.name} is not valid JSON ({e}): {RETRAIN}") from None
    assert isinstance(metrics, dict), f"{path.name} holds a {type(metrics).__name__}, not a JSON object: {RETRAIN}"
    assert metrics.get("eval_split") == "test", \
        f"{path.name} is not from a test-set run (eval_split {metrics.get('eval_split')!r}, e.g. from --holdout): {RETRAIN}"
    fields = {"epochs": whole, "params": whole, "test_accuracy": percent,
              "history": lambda v: isinstance(v, list) and v, "checkpoint": lambda v: isinstance(v, dict)}
    for field, valid in fields.items():
        assert valid(metrics.get(field)), f"{path.name} has no valid {field!r} field: {RETRAIN}"
    assert all(
        isinstance(h, dict) and whole(h.get("epoch")) and percent(h.get("test_accuracy")) for h in metrics["history"]), \
        f"{path.name}: each 'history' entry needs an 'epoch' and a 'test_accuracy' from 0 to 100: {RETRAIN}"
    assert isinstance(metrics["checkpoint"].get("sha256"), str), \
        f"{path.name} has no 'checkpoint': {{'sha256': ...}} for model.pt: {RETRAIN}"
    return metrics


def test_architecture():
    """model.py's Net against the assignment's rules; needs no training and no artifacts."""
    check_architecture(new_model())


def test_metrics_meet_the_bar(metrics):
    check_metrics(metrics, count_params(new_model()))


def test_committed_weights_score_what_metrics_claim(metrics, committed_scores):
    check_scores(metrics, committed_scores)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_reproduce_from_scratch(tmp_path, test_set):
    """Retrain with the committed defaults and hold the fresh run to the same gate."""
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path)], cwd=ROOT, check=True)
    fresh = read_metrics(tmp_path / "metrics.json")
    check_metrics(fresh, count_params(new_model()))
    models = load_weights(fresh, tmp_path / "model.pt")
    check_scores(fresh, {epoch: score(model, test_set) for epoch, model in models.items()})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_same_command_twice_gives_same_metrics_and_weights_file(tmp_path):
    """Seeded on the CPU: two identical one-epoch runs agree on every recorded number, and their
    model.pt files are the same bytes."""
    histories, digests = [], []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--epochs", "1", "--device", "cpu",
                        "--out", str(tmp_path / run)], cwd=ROOT, check=True, capture_output=True)
        history = json.loads((tmp_path / run / "metrics.json").read_text())["history"]
        histories.append([{k: v for k, v in h.items() if k != "seconds"} for h in history])
        digests.append(hashlib.sha256((tmp_path / run / "model.pt").read_bytes()).hexdigest())
    assert histories[0] == histories[1]
    assert digests[0] == digests[1]
