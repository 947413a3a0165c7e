"""train.py's preflight: before any data loads, the gate's verdict on the model, and a stop with one
line for a model that could not be trained, counted or scored, so no run is lost after its last epoch."""
import pytest
import torch

import train
from conftest import train_run
from measure import count_numbers
from data import DataError
from reference import Reference
from test_rules import BatchNormNotCalled, LazyLinearAfterPool, ModuleGap, SqueezedLogits


@pytest.fixture
def no_data(monkeypatch):
    """load_splits stands in for the data: reaching it means the preflight let the model through."""
    def load_splits(*args):
        raise DataError("no data here: the preflight let the model through")

    monkeypatch.setattr(train, "load_splits", load_splits)


def main(net, tmp_path):
    with pytest.raises(SystemExit) as stop:
        train.main(["--epochs", "1", "--out", str(tmp_path), "--device", "cpu"], net=net)
    return str(stop.value.code)


def test_a_refusal_shows_before_the_data_loads_and_training_goes_on(no_data, tmp_path, capsys):
    """A BatchNorm defined but never called: the refusal is printed first; the run would go on."""
    assert main(BatchNormNotCalled, tmp_path) == "error: no data here: the preflight let the model through"
    out = capsys.readouterr().out
    assert "gate: the architecture would be refused: no BatchNorm ran in forward" in out
    assert "training it anyway" in out


def test_a_model_that_passes_says_so_with_its_count(no_data, tmp_path, capsys):
    main(Reference, tmp_path)
    assert "gate: the architecture passes (" in capsys.readouterr().out


def test_squeeze_stops_with_one_line_before_the_data_loads(no_data, tmp_path, capsys):
    """squeeze() gives (10,) for one image: one line that names the fix, before any data loads."""
    message = main(SqueezedLogits, tmp_path)
    assert message.startswith("error: output (10,) for 1 image in eval mode, expected (1, 10)")
    assert "use x.flatten(1)" in message and "\n" not in message
    assert "Traceback" not in capsys.readouterr().err


class RaisesOnOneImage(ModuleGap):
    def forward(self, x):
        if len(x) == 1:
            raise ValueError("one image is not a batch")
        return super().forward(x)


def test_an_error_in_forward_keeps_its_traceback_and_stops(no_data, tmp_path, capsys):
    message = main(RaisesOnOneImage, tmp_path)
    assert message == ("error: forward raised ValueError: one image is not a batch on 1 image in eval mode, though it "
                       "ran on 4 (x.squeeze() drops the batch dimension of a single image: use x.flatten(1))")
    err = capsys.readouterr().err
    assert "Traceback" in err and "in forward" in err


def test_the_preflight_leaves_the_random_stream_alone():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    train.preflight(Reference)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_lazy_layer_trains_with_the_weight_average(test_tensors):
    """nn.LazyLinear: one forward pass before the optimizer and the weight average are built."""
    images, labels = test_tensors
    data = (images[:256], labels[:256], images[256:512], labels[256:512], "val")
    args = train.parse_args(["--epochs", "1", "--batch-size", "64", "--ema", "0.9"])
    run, _ = train_run(args, torch.device("cpu"), data, LazyLinearAfterPool)
    assert len(run.history) == 1 and count_numbers(run.model) == 6_284
