"""Shared fixtures for the gate: the committed claims, the official test set, the committed model."""
import pytest
from torchvision import transforms
from torchvision.datasets import MNIST

from data import DEFAULT_DATA_DIR, DataError, load_mnist
from test_model import METRICS, RETRAIN, WEIGHTS, load_weights, read_metrics, score


@pytest.fixture(scope="session")
def metrics():
    return read_metrics(METRICS)


@pytest.fixture(scope="session")
def test_tensors():
    """The test set as train.py loads it: (uint8 images, labels) on the CPU. Downloads it, or fails
    with one line that says how to get the files."""
    try:
        return load_mnist(DEFAULT_DATA_DIR, train=False, device="cpu")
    except DataError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def test_set(test_tensors):
    """The same files through the plain torchvision pipeline, which the gate scores with."""
    return MNIST(DEFAULT_DATA_DIR, train=False, transform=transforms.ToTensor())


@pytest.fixture(scope="session")
def committed_models(metrics):
    """{epoch: model} for the last epochs whose weights model.pt keeps."""
    assert WEIGHTS.exists(), f"{WEIGHTS.name} is missing: {RETRAIN}"
    return load_weights(metrics, WEIGHTS)


@pytest.fixture(scope="session")
def committed_scores(committed_models, test_set):
    return {epoch: score(model, test_set) for epoch, model in committed_models.items()}
