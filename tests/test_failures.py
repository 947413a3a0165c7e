"""The gate must refuse what breaks a promise: tampered artifacts, bad command-line input, missing
or corrupt data, interrupted saves. Each case runs the gate's own checks on tests/run/, a run of the
reference net, never on the committed run or model.py. (Models that break the assignment's rules
are in test_rules.py.)

Training-based cases (an interrupted run) are marked slow: `pytest -q -m slow`.
"""
import ast
import copy
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn as nn

import artifacts
import data
import train
from conftest import ROOT, RUN, train_command, train_run
from reference import Reference
from rules import LAST_EPOCHS, MAX_EPOCHS
from measure import count_numbers
from test_model import check_metrics, check_scores, load_weights, read_metrics, score

METRICS, WEIGHTS = RUN / "metrics.json", RUN / "model.pt"


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
        load_weights(claims, tampered, Reference)


@pytest.mark.parametrize("index", [-1, -LAST_EPOCHS], ids=["final-epoch", "earlier-epoch"])
def test_gate_refuses_claims_the_weights_do_not_deliver(claims, run_scores, index):
    epoch = claims["history"][index]["epoch"]
    claims["history"][index]["test_accuracy"] = round(run_scores[epoch] + 0.3, 2)
    with pytest.raises(AssertionError, match=f"epoch {epoch}: .* claims"):
        check_scores(claims, {epoch: run_scores[epoch]})


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(epochs=MAX_EPOCHS + 1, history=m["history"] + m["history"][:MAX_EPOCHS + 1 - len(m["history"])]),
     f"the limit is {MAX_EPOCHS}"),
    (lambda m: m["history"][-2].update(test_accuracy=99.0), r"epoch \d+ \(99.00\) below"),
    (lambda m: m.update(params=m["params"] - 1), "metrics.json is from another model"),
    (lambda m: m.update(test_accuracy=99.99), "last epoch"),
    (lambda m: m.update(epochs=1, history=m["history"][:1], test_accuracy=m["history"][0]["test_accuracy"]),
     f"the run holds 1 epoch; the rule judges the last {LAST_EPOCHS}"),
], ids=["too-many-epochs", "dip-in-last-epochs", "params-mismatch", "accuracy-not-last-epoch", "a-short-run"])
def test_gate_refuses_tampered_metrics(claims, edit, message):
    edit(claims)
    with pytest.raises(AssertionError, match=message):
        check_metrics(claims, count_numbers(Reference()))


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
        load_weights(claims, save_as_claimed(checkpoint, tmp_path / "model.pt", claims), Reference)


def test_saved_model_must_be_the_last_epochs(claims, tmp_path):
    checkpoint = committed_checkpoint()
    checkpoint["model"] = checkpoint["last_epochs"][min(checkpoint["last_epochs"])]
    with pytest.raises(AssertionError, match="not the last epoch's weights"):
        load_weights(claims, save_as_claimed(checkpoint, tmp_path / "model.pt", claims), Reference)


def test_gate_rescores_the_earlier_epochs_too(claims, tmp_path, test_set):
    """Weights of an untrained Net in place of an earlier epoch's: its claim no longer holds."""
    checkpoint = committed_checkpoint()
    epoch = min(checkpoint["last_epochs"])
    checkpoint["last_epochs"][epoch] = Reference().state_dict()
    models = load_weights(claims, save_as_claimed(checkpoint, tmp_path / "model.pt", claims), Reference)
    with pytest.raises(AssertionError, match=f"epoch {epoch}: the weights score"):
        check_scores(claims, {epoch: score(models[epoch], test_set)})


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_load_refuses_pickled_code(claims, tmp_path):
    with pytest.raises(Exception, match="Weights only load failed"):
        load_weights(claims, save_as_claimed({"model": Payload()}, tmp_path / "model.pt", claims), Reference)


def test_weights_of_another_architecture_do_not_load(claims, tmp_path):
    state = Reference().state_dict()
    key = next(k for k in state if k.endswith("weight"))
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])  # one more channel
    checkpoint = committed_checkpoint()
    checkpoint["last_epochs"] = {epoch: state for epoch in checkpoint["last_epochs"]}
    checkpoint["model"] = state
    with pytest.raises(AssertionError, match="do not fit model.py's Net .*size mismatch"):
        load_weights(claims, save_as_claimed(checkpoint, tmp_path / "model.pt", claims), Reference)


def test_gate_measures_with_its_own_tools():
    """model.py is the file a student edits: a count_params or layer walk taken from it could be
    edited to lie, so the gate's files take only Net from there and measure it with their own tools."""
    for path in sorted(set(ROOT.glob("*.py")) - {ROOT / "model.py"}):
        gate = path.name
        tree = ast.parse(path.read_text())
        taken = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "model"
                 for alias in node.names]
        whole_module = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Import)
                        and any(alias.name == "model" for alias in node.names)]
        assert taken in ([], ["Net"]) and not whole_module, f"{gate} takes {taken or 'the module'} from model.py"


@pytest.mark.parametrize("folder", ["tests", "research"])
def test_own_tests_and_research_never_import_model_py(folder):
    """A student's rewrite of model.py must not break the project's tests or research scripts."""
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert "model" not in names, f"{folder}/{path.name}:{node.lineno} imports model.py"


def test_training_imports_no_test_file_and_no_pytest():
    """The rules live in rules.py, so renaming the checker cannot break training."""
    for path in sorted(set(ROOT.glob("*.py")) - {ROOT / "test_model.py"}):
        name = path.name
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not {"pytest", "test_model", "conftest"} & set(names), f"{name}:{node.lineno} imports {names}"


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


def test_gate_names_the_files_of_a_holdout_run(claims, tmp_path):
    """A --holdout run scores the held-out images, so its fields say val_, not test_: every gate
    test reads metrics.json through read_metrics and fails with this line, not a KeyError."""
    claims.update(eval_split="val", val_accuracy=claims.pop("test_accuracy"))
    for h in claims["history"]:
        h["val_accuracy"] = h.pop("test_accuracy")
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(claims))
    with pytest.raises(AssertionError, match=r"metrics.json is not from a test-set run \(eval_split 'val'.*"
                                             r"run `python train.py`"):
        read_metrics(path)


@pytest.mark.parametrize("content", [b"", b"not a torch file"], ids=["empty", "garbage"])
def test_gate_names_an_unloadable_weights_file(claims, tmp_path, content):
    """Its sha256 is in metrics.json, so only the load itself can refuse it."""
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    claims["checkpoint"]["sha256"] = hashlib.sha256(content).hexdigest()
    with pytest.raises(AssertionError, match=r"model.pt could not be loaded \(\w+: .*run `python train.py`"):
        load_weights(claims, path, Reference)


@pytest.mark.parametrize("entry", ["model", "last_epochs", "config"])
def test_gate_names_a_missing_checkpoint_entry(claims, tmp_path, entry):
    checkpoint = committed_checkpoint()
    del checkpoint[entry]
    with pytest.raises(AssertionError, match=f"model.pt has no '{entry}' entry"):
        load_weights(claims, save_as_claimed(checkpoint, tmp_path / "model.pt", claims), Reference)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["last_epochs"].update({15: [1, 2]}), "must map epoch numbers to weights"),
], ids=["epoch-weights-not-a-dict"])
def test_gate_names_a_bad_checkpoint_value(claims, tmp_path, edit, message):
    checkpoint = committed_checkpoint()
    edit(checkpoint)
    with pytest.raises(AssertionError, match=message + ".*run `python train.py`"):
        load_weights(claims, save_as_claimed(checkpoint, tmp_path / "model.pt", claims), Reference)


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
    (["--holdout", "60000"], "must be in [0, 60000)"),
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
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == "train.py: error: argument --epochs: must be > 0, got 0"
    assert "Traceback" not in done.stderr


# --- missing or broken data: one line that names the fix, non-zero exit --------------------------

def run_main_expecting_exit(argv, net=Reference):
    """train.main(argv) must exit with one line, and leave the caller's signal handlers as they were."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SystemExit) as exit:
        train.main(argv, net)
    message = exit.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    return message


class NeedsAnArgument(nn.Module):
    def __init__(self, width):
        super().__init__()


def test_a_net_that_needs_arguments_is_one_line():
    message = run_main_expecting_exit(["--epochs", "1"], net=NeedsAnArgument)
    assert "model.py's Net() must build with no arguments (missing a required argument: 'width')" in message


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        raise ValueError("a bug in the student's own code")


def test_an_error_inside_net_keeps_its_traceback(test_tensors):
    images, labels = test_tensors
    data = (images[:64], labels[:64], images[64:128], labels[64:128], "val")
    with pytest.raises(ValueError, match="a bug in the student's own code") as error:
        train_run(train.parse_args(["--epochs", "1"]), torch.device("cpu"), data, Broken)
    assert error.traceback[-1].name == "__init__" and error.traceback[-1].path.name == "test_failures.py"


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

THREE = (artifacts.MODEL, artifacts.METRICS, artifacts.CURVES)


def three_files(folder):
    return {os.path.join(folder, name): b"new " + name.encode() for name in THREE}

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_leaves_previous_artifacts_untouched(tmp_path, sig):
    before = {name: f"previous {name}".encode() for name in ("model.pt", "metrics.json", "curves.png")}
    for name, content in before.items():
        (tmp_path / name).write_bytes(content)
    proc = subprocess.Popen(train_command("--epochs", "3", "--out", str(tmp_path)),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "epoch  1/3" in line:
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # Above it, stderr holds only progress lines (tqdm writes there): one line, and no traceback.
    assert err.strip().splitlines()[-1] == "interrupted: nothing was written; earlier artifacts are untouched"
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.fixture
def stops_raise():
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, as train.main makes them, also where pytest runs
    as a background job, which starts with SIGINT ignored; the previous handlers come back after."""
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_during_the_renames_lands_after_them(tmp_path, monkeypatch, stops_raise, sig):
    """A stop sent to the process, as Ctrl-C or `kill` sends it, after the first of the three
    renames: it is acted on only once the new set is complete. Another thread is running, as torch's
    threads are in a real run, so the kernel may hand the signal to any of them."""
    rename, busy = os.replace, threading.Event()
    other = threading.Thread(target=busy.wait, daemon=True)
    other.start()

    def rename_then_interrupt(src, dst):
        rename(src, dst)
        if not (tmp_path / "sent").exists():
            (tmp_path / "sent").touch()
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # time enough for the signal to be delivered and acted on, if it is let through

    monkeypatch.setattr(os, "replace", rename_then_interrupt)
    try:
        with pytest.raises(artifacts.StoppedAfterSaving):
            artifacts.save_set(three_files(tmp_path))
    finally:
        busy.set()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "sent") == ["curves.png", "metrics.json", "model.pt"]
    assert all((tmp_path / name).read_bytes() == b"new " + name.encode() for name in THREE)


def test_interrupt_while_saving_keeps_the_previous_set(tmp_path, monkeypatch):
    """Ctrl-C after the first file is staged but before the set is renamed into place."""
    before = {name: f"previous {name}".encode() for name in THREE}
    for name, content in before.items():
        (tmp_path / name).write_bytes(content)
    stage = artifacts._staged

    def interrupted_at_the_second(path, data):
        if os.path.basename(path) != THREE[0]:
            raise KeyboardInterrupt
        return stage(path, data)

    monkeypatch.setattr(artifacts, "_staged", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        artifacts.save_set(three_files(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no staged file is left either
