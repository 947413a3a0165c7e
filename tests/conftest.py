"""Fixtures of the project's tests: the official test set, and RUN, a run of the reference net that
the tests tamper with. None of them reads model.py.

tests/run/ holds model.pt and metrics.json of `python train.py` with the reference net, under this
repository's rules. A course with other rules (rules.py) gets the same run fitted to them: its
history cut or lengthened to a run the rules allow, and each of the last LAST_EPOCHS epochs given
one of the weights tests/run kept, with the accuracy those weights score. The gate then judges real
weights against true claims under the course's rules.
"""
import atexit
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import artifacts
import rules
from data import DEFAULT_DATA_DIR, DataError, load_mnist
from test_model import load_weights, mnist_test_set, read_metrics, score

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # tests/reference.py, for the tests and for train_command's process
from reference import Reference  # noqa: E402


def fitted_run(source, folder):
    """source's run fitted to rules.py, written to folder; returns folder."""
    metrics = json.loads((source / artifacts.METRICS).read_text())
    checkpoint = torch.load(source / artifacts.MODEL, weights_only=True)
    kept = sorted(checkpoint["last_epochs"])
    scored = {h["epoch"]: h for h in metrics["history"] if h["epoch"] in kept}
    epochs = max(rules.LAST_EPOCHS, min(len(metrics["history"]), rules.MAX_EPOCHS))
    history = [copy.deepcopy(h) for h in metrics["history"][-epochs:]]
    while len(history) < epochs:
        history.insert(0, copy.deepcopy(history[0]))
    weights = {}
    for back, h in enumerate(reversed(history[-rules.LAST_EPOCHS:])):  # the last epoch keeps the last weights
        source_epoch = kept[-1 - back % len(kept)]
        h.update({k: scored[source_epoch][k] for k in ("test_loss", "test_accuracy")})
        weights[len(history) - back] = checkpoint["last_epochs"][source_epoch]
    for epoch, h in enumerate(history, 1):
        h["epoch"] = epoch
    low = min(h["test_accuracy"] for h in history[-rules.LAST_EPOCHS:])
    if low < rules.MIN_ACCURACY:
        raise pytest.UsageError(f"tests/run, the reference net's run, scores {low:.2f} in one of its last epochs, "
                                f"below rules.MIN_ACCURACY = {rules.MIN_ACCURACY}: the project's tests need a run that "
                                "meets the course's bar; retrain tests/run with the reference net")
    data = artifacts.checkpoint_bytes(weights, {**checkpoint["config"], "epochs": epochs})
    metrics.update(epochs=epochs, history=history, test_accuracy=history[-1]["test_accuracy"],
                   checkpoint={"file": artifacts.MODEL, "sha256": artifacts.sha256(data)})
    (folder / artifacts.MODEL).write_bytes(data)
    (folder / artifacts.METRICS).write_bytes(artifacts.json_bytes(metrics))
    return folder


def run_for_these_rules():
    """tests/run itself when it fits rules.py, else a fitted copy in a temporary folder."""
    committed = HERE / "run"
    history = json.loads((committed / artifacts.METRICS).read_text())["history"]
    if rules.LAST_EPOCHS == 3 and len(history) <= rules.MAX_EPOCHS:  # tests/run keeps 3 epochs' weights
        return committed
    folder = Path(tempfile.mkdtemp(prefix="fitted-run-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return fitted_run(committed, folder)


RUN = run_for_these_rules()  # model.pt and metrics.json of a run of the reference net under rules.py


def train_run(args, device, data, net):
    """A whole run as train.main trains it, without saving: (Run, metrics)."""
    import train

    run = train.start(args, device, data, net)
    train.train_epochs(run, args, data, args.epochs)
    return run, train.metrics_of(run, args, device, data[-1], params=0)


def train_command(*argv):
    """`python train.py ARGV`, but training the reference net, in a process of its own."""
    launch = f"import sys; sys.path.insert(0, {str(HERE)!r}); import train, reference; train.main(net=reference.Reference)"
    return [sys.executable, "-c", launch, *argv]


@pytest.fixture(scope="session")
def test_tensors():
    """The test set as train.py loads it: (uint8 images, labels) on the CPU."""
    try:
        return load_mnist(DEFAULT_DATA_DIR, train=False, device="cpu")
    except DataError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def test_set(test_tensors):
    """The same files through the plain torchvision pipeline, which the gate scores with."""
    return mnist_test_set()


@pytest.fixture(scope="session")
def run_metrics():
    return read_metrics(RUN / "metrics.json")


@pytest.fixture(scope="session")
def run_scores(run_metrics, test_set):
    """{epoch: test accuracy} of tests/run's weights of each of the last epochs."""
    models = load_weights(run_metrics, RUN / "model.pt", Reference)
    return {epoch: score(model, test_set) for epoch, model in models.items()}
