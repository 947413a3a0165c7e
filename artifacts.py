"""The files a run leaves, and how they are written: their names, what model.pt holds, its sha256,
and one atomic write. train.py, the README writer, the gate and grade.py all use these.

A file is replaced all at once or not at all: its new bytes go to a temporary file beside it, which
is flushed to disk and then renamed over the old one. A run's three files are swapped in together,
and a Ctrl-C or SIGTERM that arrives during the renames waits until the set is complete.
"""
import contextlib
import hashlib
import io
import json
import os
import signal
import tempfile
from pathlib import Path

import rules

MODEL, METRICS, CURVES = "model.pt", "metrics.json", "curves.png"
SUBMITTED = ("model.py", MODEL, METRICS)  # all that grade.py takes from a student's submission
# The files that judge: the gate, what it imports, and the grader. Their sha256 together, the gate
# fingerprint, is in the gate's job summary and in grade.py's output, so a changed gate shows.
GATE_FILES = ("test_model.py", "checks.py", "traces.py", "measure.py", "rules.py", "data.py",
              "artifacts.py", "summary.py", "pyproject.toml", "grade.py")
# What model.pt holds: the final weights, the weights of each of the last epochs (which the gate
# re-scores), and the run's flags.
CHECKPOINT_ENTRIES = {"model": dict, "last_epochs": dict, "config": dict}
STOPS = (signal.SIGINT, signal.SIGTERM)


class StoppedAfterSaving(KeyboardInterrupt):
    """Ctrl-C or SIGTERM arrived while a set of files was being swapped in; it is complete."""


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def fingerprint_of(contents):
    """sha256 over the gate files' names and contents ({name: bytes}; an absent one counts as absent)."""
    lines = [f"{name}\0{sha256(contents[name]) if name in contents else '-'}\n" for name in GATE_FILES]
    return sha256("".join(lines).encode())


def fingerprint(folder):
    """The gate fingerprint of the gate files in folder."""
    paths = {name: os.path.join(folder, name) for name in GATE_FILES}
    return fingerprint_of({name: open(path, "rb").read() for name, path in paths.items() if os.path.isfile(path)})


def checkpoint_bytes(weights, config):
    """model.pt's bytes: weights is {epoch: state_dict} of the last epochs, the last one the final.

    Saved through a buffer: written to a file, torch.save names the archive's root folder after
    the file (a random temporary name here), so the same weights would give other bytes."""
    import torch  # here, not above: grade.py reads these names without loading torch

    buffer = io.BytesIO()
    torch.save({"model": weights[max(weights)], "last_epochs": weights, "config": config}, buffer)
    return buffer.getvalue()


def json_bytes(obj):
    return (json.dumps(obj, indent=2) + "\n").encode()


def _staged(path, data):
    """data written to a temporary file beside path, on disk; returns the temporary file's path."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a crash can't leave an empty file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; give it a normal file's mode
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


def write_atomic(path, data):
    """Replaces path with data (bytes or text) all at once: readers never see a half-written file."""
    os.replace(_staged(path, data), path)


@contextlib.contextmanager
def stops_handled_by(handler):
    """Ctrl-C and SIGTERM go to handler inside the block; the handlers before it come back after.
    Call from the main thread."""
    previous = {sig: signal.signal(sig, handler) for sig in STOPS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def save_set(files):
    """Writes {path: bytes} as one consistent set, or not at all: every file is staged first, then
    all are renamed into place. A stop during the staging leaves the old set as it was; one during
    the renames is held until they are done, then raised as StoppedAfterSaving.

    Python runs signal handlers in the main thread whichever thread receives the signal, so a
    handler that only takes note holds the stop for the whole process."""
    staged, held = {}, []
    try:
        for path, data in files.items():
            staged[path] = _staged(path, data)
        with stops_handled_by(lambda sig, frame: held.append(sig)):
            for path, tmp in staged.items():
                os.replace(tmp, path)
    finally:  # stopped before the renames: drop the staged files, keep the old set
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    if held:
        raise StoppedAfterSaving(f"stopped by signal {held[0]} after the files were saved")


# --- Reading a run back: what the gate checks before it scores anything --------------------------
# A broken, missing or stale file fails with one line that names the file and the fix.
RETRAIN = ("run `python train.py` (3 to 5 minutes on a laptop CPU) and commit model.pt, metrics.json and "
           "curves.png")


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


def load_checkpoint(metrics, path):
    """sha256 against metrics.json, then a safe load (tensors only): {epoch: weights} of the last
    LAST_EPOCHS epochs; the last one is the saved model. Builds no model."""
    import torch  # here, not above: grade.py reads this file's names without loading torch

    path = Path(path)
    assert path.exists(), f"{path.name} is missing: {RETRAIN}"
    digest = sha256(path.read_bytes())
    assert digest == metrics["checkpoint"]["sha256"], f"{path.name} does not match metrics.json's sha256: {RETRAIN}"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, not a torch file, or pickled code
        reason = (str(e).strip().splitlines() or [""])[0]
        raise AssertionError(f"{path.name} could not be loaded ({type(e).__name__}: {reason}): {RETRAIN}") from None
    for entry, kind in CHECKPOINT_ENTRIES.items():
        assert isinstance(checkpoint, dict) and isinstance(checkpoint.get(entry), kind), \
            f"{path.name} has no {entry!r} entry of type {kind.__name__}: {RETRAIN}"
    epochs = [h["epoch"] for h in metrics["history"][-rules.LAST_EPOCHS:]]
    kept = checkpoint["last_epochs"]
    assert all(isinstance(e, int) and isinstance(weights, dict) for e, weights in kept.items()), \
        f"{path.name}: 'last_epochs' must map epoch numbers to weights: {RETRAIN}"
    assert all(e in kept for e in epochs), \
        f"{path.name} keeps the weights of epochs {sorted(kept)}, the gate re-scores {epochs}: {RETRAIN}"
    final = kept[epochs[-1]]
    assert checkpoint["model"].keys() == final.keys() and all(
        isinstance(final[k], torch.Tensor) and torch.equal(checkpoint["model"][k], final[k]) for k in final), \
        f"{path.name}: the saved model is not the last epoch's weights: {RETRAIN}"
    return {epoch: kept[epoch] for epoch in epochs}
