"""The gate: `pytest -q`. A number in metrics.json is a claim; the committed weights, re-scored
on the official 10,000-image test set, are the proof.

    pytest -q                                   # the gate: model.py's Net and the committed run
    pytest -q test_model.py::test_architecture  # model.py's Net alone against the rules: no training needed

The assignment's rules are set in rules.py. The check_* functions raise AssertionError with a
message that says what to do. The project's own tests (tests/) apply them to every accepted and
refused way of writing a model, and to tampered artifacts.
"""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import MNIST

from checks import check_architecture
from data import DEFAULT_DATA_DIR, DataError, load_mnist
from rules import LAST_EPOCHS, MAX_EPOCHS, MIN_ACCURACY
from checks import buildable, student_net
from measure import count_numbers

CLAIM_TOLERANCE = 0.02   # points (2 test images) between a claim and the CPU re-score: GPU kernels round differently

ROOT = Path(__file__).parent
METRICS, WEIGHTS = ROOT / "metrics.json", ROOT / "model.pt"
RETRAIN = ("run `python train.py` (3 to 5 minutes on a laptop CPU) and commit model.pt, metrics.json and "
           "curves.png")
CHECKPOINT_ENTRIES = {"model": dict, "last_epochs": dict, "config": dict}  # what train.py writes to model.pt


def new_model(net=None):
    """net() (default: model.py's Net), which must build with no arguments."""
    net = net or student_net()
    problem = buildable(net)
    assert problem is None, problem
    return net()


def check_metrics(metrics, params):
    """metrics.json (read_metrics has checked its fields) against the model and the bar."""
    assert metrics["params"] == params, \
        f"metrics.json is from another model ({metrics['params']:,} numbers; model.py's Net carries {params:,}): " \
        f"model.py changed after the run: {RETRAIN}"
    history = metrics["history"]
    assert metrics["epochs"] == len(history) <= MAX_EPOCHS, \
        f"{metrics['epochs']} epochs claimed, {len(history)} recorded; the limit is {MAX_EPOCHS}"
    assert metrics["test_accuracy"] == history[-1]["test_accuracy"], "test_accuracy is not the last epoch's"
    last = [h["test_accuracy"] for h in history[-LAST_EPOCHS:]]
    assert len(last) == LAST_EPOCHS and min(last) >= MIN_ACCURACY, \
        f"last {LAST_EPOCHS} epochs {last}: each must be >= {MIN_ACCURACY}"


def load_weights(metrics, path, net=None):
    """sha256 against metrics.json, then a safe load (tensors only) into net() (default: model.py's Net).

    Returns {epoch: model in eval mode} for the last LAST_EPOCHS epochs; the last one is the saved model."""
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
        models[epoch] = new_model(net)
        try:
            models[epoch].load_state_dict(kept[epoch])
        except RuntimeError as e:
            raise AssertionError(f"{path.name}: the weights of epoch {epoch} do not fit model.py's Net "
                                 f"({' '.join(str(e).split())[:300]}): model.py changed after the run: "
                                 f"{RETRAIN}") from None
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


def mnist_test_set(root=DEFAULT_DATA_DIR):
    """The official test set through the plain torchvision pipeline. Downloads it (data.load_mnist),
    or fails with one line that says how to get the files."""
    try:
        load_mnist(root, train=False, device="cpu")
    except DataError as e:
        pytest.fail(str(e))
    return MNIST(root, train=False, transform=transforms.ToTensor())


def check_run(metrics_path, weights_path, test_set, net=None):
    """A committed run: its claims against the model and the bar, then its weights re-scored."""
    metrics = read_metrics(metrics_path)
    check_metrics(metrics, count_numbers(new_model(net)))
    assert Path(weights_path).exists(), f"{Path(weights_path).name} is missing: {RETRAIN}"
    models = load_weights(metrics, weights_path, net)
    check_scores(metrics, {epoch: score(model, test_set) for epoch, model in models.items()})


def test_architecture():
    """model.py's Net against the assignment's rules; needs no training and no artifacts."""
    check_architecture(new_model())


def test_committed_run():
    """The committed model.pt and metrics.json: from this model.py's Net, at the bar, and the
    weights of each of the last epochs re-scored on the test set to what metrics.json claims."""
    check_run(METRICS, WEIGHTS, mnist_test_set())
