"""The gate: `pytest -q`. A number in metrics.json is a claim; the committed weights, re-scored
on the official 10,000-image test set, are the proof.

    pytest -q            # the gate (about half a minute on 2 CPU cores)
    pytest -q -m slow    # retrain from scratch with the committed defaults, hold it to the gate

The check_* functions raise AssertionError with a message that says what to do; the tests apply
them to the committed artifacts here and to tampered copies in test_failures.py.
"""
import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from model import Net
from summary import carried_tensors, count_params, leaf_calls, receptive_field_table, size

# The limits, in one place: a course changes them here.
MAX_PARAMS = 6_000
MIN_ACCURACY = 99.40    # percent, on the official test set
LAST_EPOCHS = 3         # the bar holds in each of the final epochs, not just one lucky one
MAX_EPOCHS = 15
MIN_RECEPTIVE_FIELD = 28  # at the output: every logit can see the whole 28x28 digit

CLAIM_TOLERANCE = 0.02   # points (2 test images) between a claim and the CPU re-score: GPU kernels round differently

ROOT = Path(__file__).parent
METRICS, WEIGHTS = ROOT / "metrics.json", ROOT / "model.pt"
RETRAIN = "run `python train.py` (about 3 minutes on a laptop CPU) and commit model.pt and metrics.json"
CHECKPOINT_ENTRIES = {"model": dict, "last_epochs": dict, "config": dict}  # what train.py writes to model.pt


def trace(model):
    """Forward a batch in training mode (dropout acts only then).

    Returns ([(module, input shape, output shape)] per leaf call, the output, the last leaf's output)."""
    calls, out = leaf_calls(model.train(), torch.rand(4, 1, 28, 28))
    return [(m, i, tuple(o.shape)) for _, m, i, o in calls], out, calls[-1][-1]


def blind_pixels(model):
    """For each logit, the input pixels it does not depend on, found by gradients, not read off the layers."""
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0), requires_grad=True)
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
    assert total <= MAX_PARAMS, \
        f"{total:,} parameters and other carried numbers, the limit is {MAX_PARAMS:,} (largest: {largest})"


def check_architecture(model):
    model = copy.deepcopy(model)  # a forward pass in training mode moves BatchNorm's statistics
    assert not any(isinstance(m, nn.Linear) for m in model.modules()), "nn.Linear found: use a conv + GAP head"
    calls, out, last_output = trace(model)
    ran = [m for m, _, _ in calls]
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ran), "no BatchNorm in the forward pass"
    assert any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in ran), \
        "no Dropout with p > 0 in the forward pass"
    gaps = [(i, o) for m, i, o in calls if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d))]
    assert gaps, "no global average pooling in the forward pass"
    gap_in, gap_out = gaps[-1]
    assert gap_in[-2] * gap_in[-1] > 1 and gap_out[-2:] == (1, 1), \
        f"the average pool maps {gap_in[-2:]} to {gap_out[-2:]}: it must pool a map larger than 1x1 to 1x1"
    assert isinstance(ran[-1], (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) and torch.equal(out, last_output.flatten(1)), \
        "the logits must be the global average pool's output, flattened: no layer after it"
    assert out.shape == (4, 10), f"output shape {tuple(out.shape)}, expected (N, 10) logits"
    rf = receptive_field_table(model)[-1][-1]
    assert rf >= MIN_RECEPTIVE_FIELD, f"receptive field {rf} at the output, need >= {MIN_RECEPTIVE_FIELD}"
    for k, blind in enumerate(blind_pixels(model)):
        assert blind == 0, f"receptive field: logit {k} ignores {blind} of the 784 input pixels"
    check_size(model)  # after the forward passes: what forward creates or registers counts too


def check_metrics(metrics, params):
    assert metrics.get("eval_split") == "test", f"metrics.json is not from a test-set run: {RETRAIN}"
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
    dropout = checkpoint["config"].get("dropout")
    assert isinstance(dropout, float) and 0 <= dropout < 1, \
        f"{path.name}'s config has no dropout rate in [0, 1) to build Net with: {RETRAIN}"
    epochs = [h["epoch"] for h in metrics["history"][-LAST_EPOCHS:]]
    kept = checkpoint["last_epochs"]
    assert all(isinstance(e, int) and isinstance(weights, dict) for e, weights in kept.items()), \
        f"{path.name}: 'last_epochs' must map epoch numbers to weights: {RETRAIN}"
    assert all(e in kept for e in epochs), \
        f"{path.name} keeps the weights of epochs {sorted(kept)}, the gate re-scores {epochs}: make LAST_EPOCHS " \
        f"in train.py at least {LAST_EPOCHS}, then {RETRAIN}"
    final = kept[epochs[-1]]
    assert checkpoint["model"].keys() == final.keys() and all(
        torch.equal(checkpoint["model"][k], final[k]) for k in final), \
        f"{path.name}: the saved model is not the last epoch's weights: {RETRAIN}"
    models = {}
    for epoch in epochs:
        models[epoch] = Net(dropout=dropout)  # as the run built it
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
    """metrics.json, checked for every field the gate reads, so that a broken file fails with one
    message that names the file and the fix instead of a KeyError."""
    path = Path(path)
    assert path.exists(), f"{path.name} is missing: {RETRAIN}"
    try:
        metrics = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AssertionError(f"{path.name} is not valid JSON ({e}): {RETRAIN}") from None
    assert isinstance(metrics, dict), f"{path.name} holds a {type(metrics).__name__}, not a JSON object: {RETRAIN}"
    split = metrics.get("eval_split")
    accuracy = f"{split}_accuracy"
    fields = {"eval_split": lambda v: isinstance(v, str), "epochs": whole, "params": whole, accuracy: percent,
              "history": lambda v: isinstance(v, list) and v, "checkpoint": lambda v: isinstance(v, dict)}
    for field, valid in fields.items():
        assert valid(metrics.get(field)), f"{path.name} has no valid {field!r} field: {RETRAIN}"
    assert all(
        isinstance(h, dict) and whole(h.get("epoch")) and percent(h.get(accuracy)) for h in metrics["history"]), \
        f"{path.name}: each 'history' entry needs an 'epoch' and a {accuracy!r} from 0 to 100: {RETRAIN}"
    assert isinstance(metrics["checkpoint"].get("sha256"), str), \
        f"{path.name} has no 'checkpoint': {{'sha256': ...}} for model.pt: {RETRAIN}"
    return metrics


def test_architecture():
    check_architecture(Net())


def test_committed_model_is_the_architecture_it_claims(committed_models):
    """The saved model, built as its run built it (e.g. with its dropout rate), passes the same checks."""
    check_architecture(committed_models[max(committed_models)])


def test_metrics_meet_the_bar(metrics):
    check_metrics(metrics, count_params(Net()))


def test_committed_weights_score_what_metrics_claim(metrics, committed_scores):
    assert sorted(committed_scores) == [h["epoch"] for h in metrics["history"][-LAST_EPOCHS:]]
    check_scores(metrics, committed_scores)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_reproduce_from_scratch(tmp_path, test_set):
    """Retrain with the committed defaults and hold the fresh run to the same gate."""
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path)], cwd=ROOT, check=True)
    fresh = read_metrics(tmp_path / "metrics.json")
    check_metrics(fresh, count_params(Net()))
    models = load_weights(fresh, tmp_path / "model.pt")
    check_scores(fresh, {epoch: score(model, test_set) for epoch, model in models.items()})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_same_command_twice_gives_same_metrics(tmp_path):
    """Seeded on the CPU: two identical one-epoch runs agree on every recorded number."""
    histories = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--epochs", "1", "--device", "cpu",
                        "--out", str(tmp_path / run)], cwd=ROOT, check=True, capture_output=True)
        history = read_metrics(tmp_path / run / "metrics.json")["history"]
        histories.append([{k: v for k, v in h.items() if k != "seconds"} for h in history])
    assert histories[0] == histories[1]
