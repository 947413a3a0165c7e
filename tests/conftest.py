"""Fixtures of the project's tests: the official test set, and tests/run/, a committed run of the
reference net that the tests tamper with. None of them reads model.py."""
import sys
from pathlib import Path

import pytest

from data import DEFAULT_DATA_DIR, DataError, load_mnist
from test_model import load_weights, mnist_test_set, read_metrics, score

HERE = Path(__file__).parent
ROOT = HERE.parent
RUN = HERE / "run"  # model.pt and metrics.json of `python train.py` with the reference net
sys.path.insert(0, str(HERE))  # tests/reference.py, for the tests and for train_command's process
from reference import Reference  # noqa: E402


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
