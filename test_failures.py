"""The gate must refuse what breaks a promise: tampered artifacts, a model that drops a required
part, bad command-line input, missing or corrupt data. Each case runs the gate's own checks.

Training-based cases (an interrupted run) are marked slow: `pytest -q -m slow`.
"""
import copy
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

import data
import train
import test_model
from model import Net, replace_modules
from summary import count_params
from test_model import (MAX_EPOCHS, MAX_PARAMS, METRICS, ROOT, WEIGHTS, check_architecture, check_metrics,
                        check_scores, load_weights, read_metrics, score)


# --- model.py changes that break a promise ---------------------------------------------------

class WithLinear(Net):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)

    def forward(self, x):
        return self.fc(super().forward(x))


class Bloated(Net):
    def __init__(self, trainable=True):
        super().__init__()
        self.spare = nn.Parameter(torch.zeros(MAX_PARAMS), requires_grad=trainable)


class WithBuffer(Net):
    """A 9,000-number table read by forward, stored as a buffer instead of a parameter."""

    def __init__(self, persistent=True):
        super().__init__()
        self.register_buffer("bank", torch.zeros(9_000), persistent=persistent)

    def forward(self, x):
        return super().forward(x) + self.bank[:10]


class WithPlainTensor(Net):
    """The same table kept as a plain attribute: not a parameter, not a buffer."""

    def __init__(self):
        super().__init__()
        self.bank = [torch.zeros(9_000)]

    def forward(self, x):
        return super().forward(x) + self.bank[0][:10]


class GrowsInForward(Net):
    """Registers its table during the first forward pass, after any count taken at construction."""

    def forward(self, x):
        if not hasattr(self, "bank"):
            self.register_buffer("bank", torch.zeros(9_000, device=x.device))
        return super().forward(x) + self.bank[:10]


class BatchNormTable(Net):
    """The table as the running mean of a BatchNorm without weights: statistics by name only."""

    def __init__(self):
        super().__init__()
        self.bank = nn.BatchNorm1d(9_000, affine=False)

    def forward(self, x):
        return super().forward(x) + self.bank.running_mean[:10]


class WithClassTable(Net):
    BANK = torch.zeros(9_000)


class InheritsTable(WithClassTable):
    """The table on a base class, not on the class the model is."""

    def forward(self, x):
        return super().forward(x) + self.BANK[:10]


class WithDefaultArgument(Net):
    """The table as a default value of forward's arguments."""

    def forward(self, x, bank=torch.zeros(9_000)):
        return super().forward(x) + bank[:10]


class LinearAfterGap(Net):
    """A fully-connected layer in disguise: no nn.Linear module, but a matrix on the pooled logits."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mix", torch.randn(10, 10))

    def forward(self, x):
        return super().forward(x) @ self.mix


class CentreOnly(Net):
    """Blanks a 2-pixel border before the convs: the layer table still reads RF 28."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x[:, :, 2:-2, 2:-2], (2, 2, 2, 2)))


def pool_to_one_first(model):
    """Max-pools to 1x1 before the average pool, which then averages a single value."""
    return replace_modules(model, nn.AdaptiveAvgPool2d,
                   lambda gap: nn.Sequential(nn.AdaptiveMaxPool2d(1), gap))


@pytest.mark.parametrize("broken, message", [
    (lambda: replace_modules(Net(), nn.modules.dropout._DropoutNd), "no Dropout"),
    (lambda: Net(dropout=0.0), "no Dropout"),
    (lambda: replace_modules(Net(), nn.BatchNorm2d), "no BatchNorm"),
    (lambda: replace_modules(Net(), nn.AdaptiveAvgPool2d), "no global average pooling"),
    (WithLinear, "nn.Linear"),
    (Bloated, "the limit is"),
    (lambda: Bloated(trainable=False), "the limit is"),
    (WithBuffer, "bank 9,000"),
    (lambda: WithBuffer(persistent=False), "bank 9,000"),
    (WithPlainTensor, "bank 9,000"),
    (GrowsInForward, "bank 9,000"),
    (BatchNormTable, "bank.running_mean 9,000"),
    (InheritsTable, "WithClassTable.BANK 9,000"),
    (WithDefaultArgument, "WithDefaultArgument.forward defaults 9,000"),
    (lambda: pool_to_one_first(Net()), "larger than 1x1"),
    (lambda: replace_modules(Net(), nn.AdaptiveAvgPool2d,
                             lambda gap: nn.Sequential(gap, nn.Conv2d(10, 10, 1, groups=10))),
     "no layer after it"),
    (LinearAfterGap, "no layer after it"),
    (CentreOnly, "logit 0 ignores 208 of the 784 input pixels"),
], ids=["dropout-removed", "dropout-zero", "batchnorm-removed", "gap-removed", "linear-head",
        "too-many-params", "frozen-params", "buffer", "non-persistent-buffer", "plain-attribute",
        "registered-in-forward", "batchnorm-statistics", "base-class-attribute", "default-argument", "gap-on-1x1", "conv-after-gap", "matmul-after-gap", "blind-border"])
def test_gate_refuses_broken_model(broken, message):
    with pytest.raises(AssertionError, match=message):
        check_architecture(broken())


@pytest.mark.parametrize("bank", [torch.zeros(9_000), np.zeros(9_000, dtype=np.float32)], ids=["tensor", "numpy"])
def test_gate_counts_a_table_at_the_top_of_the_model_file(monkeypatch, bank):
    """A table at the top level of the file that defines the model, read by forward: outside the
    module tree, but carried all the same."""
    student_file = types.ModuleType("student_model")
    student_file.BANK = bank

    class WithTopLevelTensor(Net):
        def forward(self, x):
            return super().forward(x) + torch.as_tensor(student_file.BANK[:10])

    WithTopLevelTensor.__module__ = student_file.__name__
    monkeypatch.setitem(sys.modules, student_file.__name__, student_file)
    with pytest.raises(AssertionError, match="student_model.BANK 9,000"):
        check_architecture(WithTopLevelTensor())


# --- tampered artifacts -------------------------------------------------------------------------

@pytest.fixture
def claims():
    return copy.deepcopy(read_metrics(METRICS))


def test_gate_refuses_flipped_byte_in_weights(claims, tmp_path):
    blob = bytearray(WEIGHTS.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    tampered = tmp_path / "model.pt"
    tampered.write_bytes(blob)
    with pytest.raises(AssertionError, match="sha256"):
        load_weights(claims, tampered)


@pytest.mark.parametrize("index", [-1, -3], ids=["final-epoch", "earlier-epoch"])
def test_gate_refuses_claims_the_weights_do_not_deliver(claims, committed_scores, index):
    epoch = claims["history"][index]["epoch"]
    claims["history"][index]["test_accuracy"] = round(committed_scores[epoch] + 0.3, 2)
    with pytest.raises(AssertionError, match=f"epoch {epoch}: .* claims"):
        check_scores(claims, {epoch: committed_scores[epoch]})


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(epochs=20, history=m["history"] + m["history"][:5]), f"the limit is {MAX_EPOCHS}"),
    (lambda m: m["history"][-2].update(test_accuracy=99.0), "each must be"),
    (lambda m: m.update(params=m["params"] - 1), "params"),
    (lambda m: m.update(test_accuracy=99.99), "last epoch"),
    (lambda m: m.update(eval_split="val"), "not from a test-set run"),
], ids=["too-many-epochs", "dip-in-last-epochs", "params-mismatch", "accuracy-not-last-epoch",
        "holdout-run"])
def test_gate_refuses_tampered_metrics(claims, edit, message):
    edit(claims)
    with pytest.raises(AssertionError, match=message):
        check_metrics(claims, count_params(Net()))


def save_as_claimed(obj, path, claims):
    """torch.save(obj) and make `claims` name its sha256, so only the later checks can refuse it."""
    torch.save(obj, path)
    claims["checkpoint"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return path


def committed_checkpoint():
    return torch.load(WEIGHTS, map_location="cpu", weights_only=True)


def test_gate_needs_the_weights_of_each_of_the_last_epochs(claims, tmp_path):
    checkpoint = committed_checkpoint()
    del checkpoint["last_epochs"][min(checkpoint["last_epochs"])]
    with pytest.raises(AssertionError, match="the gate re-scores"):
        load_weights(claims, save_as_claimed(checkpoint, tmp_path / "model.pt", claims))


def test_saved_model_must_be_the_last_epochs(claims, tmp_path):
    checkpoint = committed_checkpoint()
    checkpoint["model"] = checkpoint["last_epochs"][min(checkpoint["last_epochs"])]
    with pytest.raises(AssertionError, match="not the last epoch's weights"):
        load_weights(claims, save_as_claimed(checkpoint, tmp_path / "model.pt", claims))


def test_gate_rescores_the_earlier_epochs_too(claims, tmp_path, test_set):
    """Weights of an untrained Net in place of an earlier epoch's: its claim no longer holds."""
    checkpoint = committed_checkpoint()
    epoch = min(checkpoint["last_epochs"])
    checkpoint["last_epochs"][epoch] = Net().state_dict()
    models = load_weights(claims, save_as_claimed(checkpoint, tmp_path / "model.pt", claims))
    with pytest.raises(AssertionError, match=f"epoch {epoch}: the weights score"):
        check_scores(claims, {epoch: score(models[epoch], test_set)})


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_load_refuses_pickled_code(claims, tmp_path):
    with pytest.raises(Exception, match="Weights only load failed"):
        load_weights(claims, save_as_claimed({"model": Payload()}, tmp_path / "model.pt", claims))


def test_weights_of_another_architecture_do_not_load(claims, tmp_path):
    state = Net().state_dict()
    key = next(k for k in state if k.endswith("weight"))
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])  # one more channel
    checkpoint = committed_checkpoint()
    checkpoint["last_epochs"] = {epoch: state for epoch in checkpoint["last_epochs"]}
    checkpoint["model"] = state
    with pytest.raises(AssertionError, match="do not fit model.py's Net .*size mismatch"):
        load_weights(claims, save_as_claimed(checkpoint, tmp_path / "model.pt", claims))


def test_gate_measures_with_its_own_tools():
    """model.py is the file a student edits: a count_params or layer walk taken from it could be
    edited to lie, so the gate takes only Net from there and measures it with summary.py."""
    import conftest

    for gate in (test_model, conftest):
        borrowed = [name for name, obj in vars(gate).items()
                    if getattr(obj, "__module__", None) == "model" and obj is not Net]
        assert borrowed == [], f"{gate.__name__} uses {borrowed} from model.py"


# --- broken artifacts: one message that names the file, what is wrong and what to run -------------

@pytest.mark.parametrize("content, message", [
    ("", r"metrics.json is not valid JSON \(Expecting value"),
    ("{'epochs': 15}", r"metrics.json is not valid JSON"),
    ("[1, 2]", r"metrics.json holds a list, not a JSON object"),
    ('{"eval_split": "test"}', r"metrics.json has no valid 'epochs' field"),
], ids=["empty", "not-json", "not-an-object", "fields-missing"])
def test_gate_names_a_broken_metrics_file(tmp_path, content, message):
    path = tmp_path / "metrics.json"
    path.write_text(content)
    with pytest.raises(AssertionError, match=message + ".*run `python train.py`"):
        read_metrics(path)


@pytest.mark.parametrize("field", ["history", "checkpoint", "test_accuracy"])
def test_gate_names_a_missing_metrics_field(claims, tmp_path, field):
    del claims[field]
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(claims))
    with pytest.raises(AssertionError, match=f"metrics.json has no valid '{field}' field.*run `python train.py`"):
        read_metrics(path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["history"][-1].pop("test_accuracy"), "each 'history' entry needs"),
    (lambda m: m["history"][-1].update(test_accuracy=float("nan")), "each 'history' entry needs"),
    (lambda m: m.update(test_accuracy=float("inf")), "no valid 'test_accuracy' field"),
    (lambda m: m.update(epochs=True), "no valid 'epochs' field"),
], ids=["accuracy-missing", "accuracy-nan", "accuracy-infinite", "epochs-not-a-number"])
def test_gate_names_a_bad_metrics_value(claims, tmp_path, edit, message):
    edit(claims)
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(claims))
    with pytest.raises(AssertionError, match=message + ".*run `python train.py`"):
        read_metrics(path)


@pytest.mark.parametrize("content", [b"", b"not a torch file"], ids=["empty", "garbage"])
def test_gate_names_an_unloadable_weights_file(claims, tmp_path, content):
    """Its sha256 is in metrics.json, so only the load itself can refuse it."""
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    claims["checkpoint"]["sha256"] = hashlib.sha256(content).hexdigest()
    with pytest.raises(AssertionError, match=r"model.pt could not be loaded \(\w+: .*run `python train.py`"):
        load_weights(claims, path)


@pytest.mark.parametrize("entry", ["model", "last_epochs", "config"])
def test_gate_names_a_missing_checkpoint_entry(claims, tmp_path, entry):
    checkpoint = committed_checkpoint()
    del checkpoint[entry]
    with pytest.raises(AssertionError, match=f"model.pt has no '{entry}' entry"):
        load_weights(claims, save_as_claimed(checkpoint, tmp_path / "model.pt", claims))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["config"].update(dropout=1.5), "no dropout rate in"),
    (lambda c: c["config"].pop("dropout"), "no dropout rate in"),
    (lambda c: c["last_epochs"].update({15: [1, 2]}), "must map epoch numbers to weights"),
], ids=["dropout-out-of-range", "dropout-missing", "epoch-weights-not-a-dict"])
def test_gate_names_a_bad_checkpoint_value(claims, tmp_path, edit, message):
    checkpoint = committed_checkpoint()
    edit(checkpoint)
    with pytest.raises(AssertionError, match=message + ".*run `python train.py`"):
        load_weights(claims, save_as_claimed(checkpoint, tmp_path / "model.pt", claims))


class GrowsSmall(Net):
    """Registers a small buffer in its first forward pass, as a lazily built layer would."""

    def forward(self, x):
        if not hasattr(self, "scale"):
            self.register_buffer("scale", torch.ones(10, device=x.device))
        return super().forward(x) * self.scale


def test_size_is_the_same_before_and_after_training():
    """train.py counts the trained model, the gate a fresh one: both must count what forward adds."""
    trained = GrowsSmall()
    trained(torch.zeros(2, 1, 28, 28))
    assert count_params(GrowsSmall()) == count_params(trained) == count_params(Net()) + 10


# --- bad input to train.py: a usage error, exit 2, no traceback --------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "must be > 0"),
    (["--epochs", "two"], "'two' is not an integer"),
    (["--batch-size", "-8"], "must be > 0"),
    (["--lr", "0"], "must be > 0"),
    (["--ema", "1"], "must be in [0, 1)"),
    (["--device", "tpu"], "invalid choice"),
    (["--device", "cuda"], "no CUDA GPU is available"),
    (["--device", "mps"], "Apple MPS is not available"),
    (["--holdout", "60000"], "--holdout must be in"),
    (["--out", "no/such/dir"], "is not a writable directory"),
    (["--out", __file__], "is not a writable directory"),
])
def test_train_rejects_bad_flags(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit:
        train.parse_args(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_flag_from_the_shell_is_one_usage_error():
    done = subprocess.run([sys.executable, "train.py", "--epochs", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == "train.py: error: argument --epochs: must be > 0, got 0"
    assert "Traceback" not in done.stderr


# --- missing or broken data: one line that names the fix, non-zero exit --------------------------

def run_main_expecting_exit(argv):
    with pytest.raises(SystemExit) as exit:
        train.main(argv)
    message = exit.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    return message


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(data.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # refused at once


def test_no_data_and_no_network_says_how_to_provide_it(tmp_path, offline):
    message = run_main_expecting_exit(["--data-dir", str(tmp_path), "--out", str(tmp_path)])
    raw = str(tmp_path / "MNIST" / "raw")
    for needed in [raw, "--data-dir", "MNIST_DATA_DIR", *data.ARCHIVES]:
        assert needed in message


def test_corrupt_archive_is_named(tmp_path, offline):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    good = gzip.compress(b"not mnist")
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(good[: len(good) // 2])
    message = run_main_expecting_exit(["--data-dir", str(tmp_path), "--out", str(tmp_path)])
    assert "t10k-labels-idx1-ubyte.gz is corrupt or truncated" in message


def test_holdout_run_may_not_replace_the_gated_artifacts(monkeypatch, tmp_path, offline):
    monkeypatch.chdir(ROOT)  # no data in tmp_path: without the check, the run stops at loading it
    message = run_main_expecting_exit(["--holdout", "10000", "--data-dir", str(tmp_path)])
    assert "--out DIR" in message


def test_truncated_extracted_file_is_reported(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.ARCHIVES:
        (raw / name.removesuffix(".gz")).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 12)
    with pytest.raises(data.DataError, match="could not read the extracted MNIST files"):
        data.load_mnist(str(tmp_path), train=False, device="cpu")


# --- an interrupted run keeps the previous artifacts ------------------------------------------------

ONE_EPOCH = {"epoch": 1, "train_loss": 0.1, "train_accuracy": 97.0, "test_loss": 0.05, "test_accuracy": 99.0}

@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_leaves_previous_artifacts_untouched(tmp_path, sig):
    before = {name: f"previous {name}".encode() for name in ("model.pt", "metrics.json", "curves.png")}
    for name, content in before.items():
        (tmp_path / name).write_bytes(content)
    proc = subprocess.Popen([sys.executable, "train.py", "--epochs", "3", "--out", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "epoch  1" in line:
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.strip().splitlines() == ["interrupted: nothing was written; earlier artifacts are untouched"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt, as train.main makes it, also where pytest runs as a
    background job, which starts with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupt_during_the_renames_lands_after_them(tmp_path, monkeypatch, ctrl_c_raises):
    """Ctrl-C while the staged files are renamed: it waits until the new set is complete."""
    rename = os.replace

    def rename_then_interrupt(src, dst):
        rename(src, dst)
        signal.raise_signal(signal.SIGINT)  # blocked: stays pending until the renames are done

    monkeypatch.setattr(os, "replace", rename_then_interrupt)
    monkeypatch.setattr(train, "saved", False)
    with pytest.raises(KeyboardInterrupt):
        train.save_artifacts(str(tmp_path), {1: Net().state_dict()}, {"history": [ONE_EPOCH]}, config={})
    assert train.saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.json", "model.pt"]


def test_interrupt_while_saving_keeps_the_previous_set(tmp_path, monkeypatch):
    """Ctrl-C after model.pt is staged but before the set is renamed into place."""
    import plots

    before = {name: f"previous {name}".encode() for name in ("model.pt", "metrics.json", "curves.png")}
    for name, content in before.items():
        (tmp_path / name).write_bytes(content)

    def interrupted(history, path, **options):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "save_curves", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.save_artifacts(str(tmp_path), {1: Net().state_dict()}, {"history": [ONE_EPOCH]}, config={})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
