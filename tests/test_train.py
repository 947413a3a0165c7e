"""train.py beyond the gate: it trains any Net a student writes, a forked run equals the full run
(which research/ablate.py's paired rows rely on), and the same weights give the same model.pt."""
import copy
import hashlib

import pytest
import torch

import artifacts
import steps
import train
from conftest import train_run
from reference import Reference
from test_rules import ACCEPTED


def without_times(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_a_forked_run_is_the_full_run(test_tensors):
    """Two runs that differ from epoch 3 on (augmentation in the last epoch or not), forked after
    epoch 2 as research/ablate.py does, give the same numbers as each run done from scratch."""
    images, labels = test_tensors
    data = (images[:1000], labels[:1000], images[1000:2000], labels[1000:2000], "val")
    flags = {clean: train.parse_args(["--epochs", "3", "--batch-size", "64", "--clean-epochs", str(clean)])
             for clean in (0, 1)}
    whole = {clean: without_times(train_run(args, "cpu", data, Reference)[0].history) for clean, args in flags.items()}
    state = train.start(flags[0], "cpu", data, Reference)
    train.train_epochs(state, flags[0], data, 2)
    rng = torch.get_rng_state()
    for clean, args in flags.items():
        torch.set_rng_state(rng)
        branch = copy.deepcopy(state)
        train.train_epochs(branch, args, data, args.epochs)
        assert without_times(branch.history) == whole[clean]
    assert whole[0][-1] != whole[1][-1]  # the last epoch did differ


@pytest.mark.parametrize("model", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_train_py_trains_every_accepted_form(test_tensors, model):
    """Logits or log-probabilities, modules or functions: two epochs on 512 images lower the loss."""
    images, labels = test_tensors
    data = (images[:512], labels[:512], images[512:1024], labels[512:1024], "val")
    args = train.parse_args(["--epochs", "2", "--batch-size", "64", "--clean-epochs", "0"])
    _, metrics = train_run(args, torch.device("cpu"), data, model)
    first, last = metrics["history"][0], metrics["history"][-1]
    assert last["train_loss"] < first["train_loss"] and last["val_accuracy"] > 10


def test_a_step_that_cannot_be_captured_trains_eagerly(test_tensors, monkeypatch, capsys):
    """If a model's step cannot be captured as a CUDA graph, the run starts again with the eager loop
    (on the CPU the capture, which happens before the first epoch, is stood in for by an error)."""
    def capture_fails(self, *args, **kwargs):
        raise steps.CaptureError("the training step could not be captured as a CUDA graph (stand-in)")

    monkeypatch.setattr(steps.GraphedSteps, "__init__", capture_fails)
    images, labels = test_tensors
    data = (images[:256], labels[:256], images[256:512], labels[256:512], "val")
    args = train.parse_args(["--epochs", "1", "--batch-size", "64"])
    args.cuda_graph = True
    run, metrics = train_run(args, torch.device("cpu"), data, Reference)
    assert isinstance(run.steps, steps.EagerSteps) and metrics["cuda_graph"] is False and len(run.history) == 1
    assert "training with the eager loop instead" in capsys.readouterr().err


def test_the_same_weights_give_the_same_model_file(tmp_path):
    """torch.save into a file names the archive after the file; train.py saves through a buffer, so
    two saves of the same weights are the same bytes (the slow test trains twice and compares)."""
    weights = {1: Reference().state_dict()}
    digests = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        path = tmp_path / run / artifacts.MODEL
        artifacts.write_atomic(path, artifacts.checkpoint_bytes(weights, config={"seed": 1}))
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
