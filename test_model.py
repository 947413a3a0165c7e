"""The gate: `pytest -q`. A number in metrics.json is a claim; the committed weights, re-scored
on the official 10,000-image test set, are the proof.

    pytest -q                                   # the gate: model.py's Net and the committed run
    pytest -q test_model.py::test_architecture  # model.py's Net alone against the rules: no training needed

The assignment's rules are set in rules.py.

model.py can change anything in the process that imports it (three lines can replace this file's
checks through sys.modules), so the pytest process never imports it. Each step that needs the
student's Net runs in a child process, `python test_model.py --architecture|--forward ...`, under a
time limit: the architecture child judges Net() with checks.py and counts its numbers; the forward
child gets the test images, without their labels, and returns the logits of each of the last
epochs' weights. This process compares the logits with the labels, reads the claims, and
cross-checks what it can without model.py: the numbers saved in model.pt, its sha256, the epochs.
A child that crashes, hangs or ends without its result fails the gate, and its traceback (the
student's own line) is shown above the failure.

Once every gate test has run, the gate writes its verdict once: to $GATE_REPORT as JSON, and under
GitHub Actions to the job summary ($GITHUB_STEP_SUMMARY) and as one ::error:: annotation. A run
that writes no report has not passed (the workflow and grade.py read the report, not the exit status).
"""
import contextlib
import functools
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import checks
from checks import buildable, student_net
from data import DEFAULT_DATA_DIR, DataError, load_mnist, to_float
from artifacts import RETRAIN, load_checkpoint, read_metrics, METRICS as METRICS_FILE, MODEL as MODEL_FILE, fingerprint, write_atomic
from grade import last_line, run_bounded
from summary import publish, required
from measure import BATCHNORM_STATISTICS
from rules import MAX_EPOCHS, MIN_ACCURACY, PARAMS_BELOW

CLAIM_TOLERANCE = 0.02   # points (2 test images) between a claim and the CPU re-score: GPU kernels round differently
CHILD_TIMEOUT_S = float(os.environ.get("GATE_CHILD_TIMEOUT", 600))  # per child; grade.py bounds the whole gate

ROOT = Path(__file__).parent
METRICS, WEIGHTS = ROOT / METRICS_FILE, ROOT / MODEL_FILE
MODEL = ("model", "Net")  # the student's Net: model.py beside this file
GATE_TESTS = ("test_architecture", "test_committed_run")  # the verdict needs every one of them


class ChildFailed(AssertionError):
    """The student's code could not be run to the end: it crashed, hung, or ended the process before
    writing its result. Not a rule's verdict: grade.py lists it as an error."""


# --- the children: the only processes that import model.py --------------------------------------

def new_model(net=None):
    """net() (default: model.py's Net), which must build with no arguments."""
    net = net or student_net()
    problem = buildable(net)
    assert problem is None, problem
    return net()


def findings(model):
    """([{rule, value, ok, reason}] for every rule, the count or None, the first refusal or None)."""
    found = {f.rule: f for f in checks.findings(model)}
    refusal = next((found[rule].reason for rule in checks.CHECK_ORDER if not found[rule].ok), None)
    count = found["parameters"].value.replace(",", "")
    return [vars(f) for f in found.values()], int(count) if count.isdigit() else None, refusal


def architecture_child(net, out):
    problem = buildable(net)
    if problem:
        result = {"rows": [], "params": None, "refusal": problem}
    else:
        rows, count, refusal = findings(net())  # an error in Net.__init__ is the student's: its traceback
        result = {"rows": rows, "params": count, "refusal": refusal}
    write_atomic(out, json.dumps(result))


def forward_child(net, metrics_path, weights_path, images_path, out):
    """The logits of each of the last epochs' weights on the test images (no labels here)."""
    try:
        models = load_weights(read_metrics(metrics_path), weights_path, net)
        images = torch.load(images_path, weights_only=True)
        result = {"logits": {epoch: predict(model, images) for epoch, model in models.items()}}
    except AssertionError as e:  # the weights do not fit this Net: a verdict, not a crash
        result = {"refusal": str(e)}
    torch.save(result, out)


def child_main(argv):
    """python test_model.py --architecture|--forward MODULE CLASS PATH ... OUT"""
    mode, module, name, path, *rest = argv
    if path:
        sys.path.insert(0, path)
    net = student_net() if (module, name) == MODEL else getattr(importlib.import_module(module), name)
    {"--architecture": architecture_child, "--forward": forward_child}[mode](net, *rest)


def spec_of(net):
    """(module, class, folder to import it from) for a class; model.py's Net for None."""
    if net is None:
        return (*MODEL, "")
    return net.__module__, net.__qualname__, str(Path(sys.modules[net.__module__].__file__).parent)


def run_child(mode, net, *args, load):
    """`python test_model.py MODE ...` in a process of its own, under CHILD_TIMEOUT_S; load(path)
    reads its result. Its output passes through (pytest shows it with a failure)."""
    what, step = "model.py" if net is None else spec_of(net)[1], mode[2:]
    with tempfile.TemporaryDirectory(prefix="gate-") as tmp:
        out = Path(tmp) / "result"
        argv = [sys.executable, str(Path(__file__).resolve()), mode, *spec_of(net), *map(str, args), str(out)]
        # Not the child's to write, nor to read: the report, the summary, and where the labels are.
        env = {k: v for k, v in os.environ.items() if k not in ("GATE_REPORT", "GITHUB_STEP_SUMMARY", "MNIST_DATA_DIR")}
        status, output = run_bounded(argv, ROOT, env, CHILD_TIMEOUT_S, own_group=False)  # dies with the gate
        sys.stderr.write(output)
        if status is None:
            raise ChildFailed(f"{what} did not finish within {CHILD_TIMEOUT_S:g} s ({step} step): "
                              "a loop that never ends, or far too slow a forward")
        if status != 0:
            status = f"signal {-status}" if status < 0 else f"exit status {status}"
            raise ChildFailed(f"{what} crashed in the {step} step ({status}): "
                              f"{last_line(output) or 'no message'} (the traceback above shows where)")
        if not out.exists():
            raise ChildFailed(f"{what}'s process ended ({step} step, exit status 0) before writing its result: "
                              "code in model.py ended it early")
        return load(out)


_architectures = {}


def architecture(net=None):
    """The architecture child's result for net, run once per net and process."""
    key = spec_of(net)
    if key not in _architectures:
        try:
            _architectures[key] = run_child("--architecture", net, load=lambda p: json.loads(p.read_text()))
        except ChildFailed as e:
            _architectures[key] = e
    if isinstance(_architectures[key], ChildFailed):
        raise _architectures[key]
    return _architectures[key]


# --- the checks this process makes -----------------------------------------------------------------

def check_metrics(metrics, params):
    """metrics.json (read_metrics has checked its fields) against the model and the bar."""
    assert metrics["params"] == params, \
        f"metrics.json is from another model ({metrics['params']:,} numbers; model.py's Net carries {params:,}): " \
        f"model.py changed after the run: {RETRAIN}"
    history = metrics["history"]
    assert metrics["epochs"] == len(history) <= MAX_EPOCHS, \
        f"{metrics['epochs']} epochs claimed, {len(history)} recorded; the limit is {MAX_EPOCHS}"
    numbers = [h["epoch"] for h in history]
    assert numbers == list(range(1, len(history) + 1)), \
        f"metrics.json's history holds epochs {numbers[0]} to {numbers[-1]}, not 1 to {len(history)}: a run's " \
        f"history starts at its first epoch: {RETRAIN}"
    assert metrics["test_accuracy"] == history[-1]["test_accuracy"], "test_accuracy is not the last epoch's"
    missed = checks.shortfall([h["test_accuracy"] for h in history])
    assert missed is None, missed


def load_weights(metrics, path, net=None):
    """load_checkpoint, each epoch's weights loaded into net() (default: model.py's Net): {epoch:
    model in eval mode}. Runs the student's code: the forward child calls it, never the gate."""
    models = {}
    for epoch, weights in load_checkpoint(metrics, path).items():
        models[epoch] = new_model(net)
        try:
            models[epoch].load_state_dict(weights)
        except RuntimeError as e:
            raise AssertionError(f"{Path(path).name}: the weights of epoch {epoch} do not fit model.py's Net "
                                 f"({' '.join(str(e).split())[:300]}): model.py changed after the run: "
                                 f"{RETRAIN}") from None
        models[epoch].eval()
    return models


def saved_numbers(weights):
    """The numbers model.pt saves for a model: every tensor but BatchNorm's running statistics,
    a tensor that two names share counted once."""
    seen = {}
    for key, t in weights.items():
        if key.rsplit(".", 1)[-1] not in BATCHNORM_STATISTICS:
            seen[(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape)] = t.numel()
    return sum(seen.values())


def check_saved_size(weights, counted):
    """What this process can count without model.py: the saved tensors are under the limit, and the
    architecture child's count is not below them."""
    saved = saved_numbers(weights)
    assert saved < PARAMS_BELOW, f"model.pt's weights hold {saved:,} numbers; the rule is fewer than {PARAMS_BELOW:,}"
    assert counted is None or counted >= saved, \
        f"model.pt's weights hold {saved:,} numbers, more than the {counted:,} the architecture check counted"
    return saved


@torch.no_grad()
def predict(model, images):
    """Logits of float images in [0, 1], as ToTensor gives, in the batches checks.py judges scoring at."""
    return torch.cat([model(to_float(x) if x.dtype == torch.uint8 else x) for x in images.split(checks.SCORING_BATCH)])


def accuracy(logits, labels):
    """Percent of labels that are the argmax of their logits; a malformed output scores nothing."""
    assert isinstance(logits, torch.Tensor) and logits.shape == (len(labels), 10), \
        f"the model's output on the test set is {getattr(logits, 'shape', type(logits).__name__)}, not " \
        f"({len(labels)}, 10)"
    return 100 * (logits.argmax(1) == labels).sum().item() / len(labels)


def score(model, test_set):
    """Accuracy in percent of model (in this process: the project's tests' own nets only)."""
    images, labels = test_set
    return accuracy(predict(model, images), labels)


def check_scores(metrics, scores):
    """scores: {epoch: test accuracy of that epoch's saved weights, re-scored here}."""
    claimed = {h["epoch"]: h["test_accuracy"] for h in metrics["history"]}
    for epoch, accuracy in scores.items():
        assert abs(accuracy - claimed[epoch]) <= CLAIM_TOLERANCE + 1e-9, \
            f"epoch {epoch}: the weights score {accuracy:.2f}% but metrics.json claims {claimed[epoch]:.2f}%: {RETRAIN}"
        assert accuracy >= MIN_ACCURACY, f"epoch {epoch}: the weights score {accuracy:.2f}%, below {MIN_ACCURACY}%"


def mnist_test_set(root=DEFAULT_DATA_DIR):
    """The official test set: (uint8 images (N, 1, 28, 28), labels). Downloads it (data.load_mnist),
    or fails with one line that says how to get the files."""
    try:
        return load_mnist(root, train=False, device="cpu")
    except DataError as e:
        pytest.fail(str(e), pytrace=False)


def rescore(weights_path, metrics_path, test_set, net):
    """{epoch: accuracy}: the forward child's logits of the test images, compared here with the labels.
    The child gets the images in a secret random order, so that labels read from disk in model.py's
    process do not line up with them (matching each image against the test file's would still do:
    see the README's "what grading does not guarantee")."""
    images, labels = test_set
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big")))
    with tempfile.TemporaryDirectory(prefix="gate-") as tmp:
        torch.save(images[order], Path(tmp) / "images.pt")
        result = run_child("--forward", net, metrics_path, weights_path, Path(tmp) / "images.pt",
                           load=lambda p: torch.load(p, weights_only=True))
    assert isinstance(result, dict) and ("refusal" in result or isinstance(result.get("logits"), dict)), \
        "the forward step returned no logits"
    assert "refusal" not in result, result.get("refusal")
    return {epoch: accuracy(logits, labels[order]) for epoch, logits in result["logits"].items()}


def check_run(metrics_path, weights_path, test_set, net=None, report=None):
    """A committed run: its claims against the model and the bar, then its weights re-scored."""
    row = report.row if report else lambda *a: None
    metrics = read_metrics(metrics_path)
    counted = architecture(net)["params"]
    row("epochs", f"≤ {MAX_EPOCHS}", f"{metrics['epochs']}", metrics["epochs"] == len(metrics["history"]) <= MAX_EPOCHS)
    assert counted is not None, "model.py's Net could not be counted: see test_architecture"
    check_metrics(metrics, counted)
    weights = load_checkpoint(metrics, weights_path)
    saved = check_saved_size(weights[max(weights)], counted)
    row("saved weights", f"< {PARAMS_BELOW:,} numbers, sha256 in metrics.json", f"{saved:,}", True)
    scores = rescore(weights_path, metrics_path, test_set, net)
    claimed = {h["epoch"]: h["test_accuracy"] for h in metrics["history"]}
    for epoch, got in sorted(scores.items()):
        row(f"epoch {epoch}", f"≥ {MIN_ACCURACY:.2f} %", f"{got:.2f} %", got >= MIN_ACCURACY)
    if report:
        report.scores = scores
    worst = max(abs(got - claimed[epoch]) for epoch, got in scores.items())
    row("re-score", f"claims within {CLAIM_TOLERANCE:.2f}", f"off by {worst:.2f} at most",
        worst <= CLAIM_TOLERANCE + 1e-9)
    check_scores(metrics, scores)
    return scores


# --- the verdict, written once -------------------------------------------------------------------

class Report:
    """What the gate tests found: rows for the summary, and each test's outcome."""

    def __init__(self):
        self.rows, self.outcomes, self.scores, self.params = [], {}, {}, None

    def row(self, rule, need, value, ok):
        self.rows.append({"rule": rule, "required": need, "value": value, "ok": ok})

    def verdict(self):
        """(pass|fail|error, the one line): passed only when every gate test ran and passed."""
        for test in GATE_TESTS:
            verdict, reason = self.outcomes.get(test, ("fail", f"{test} did not run: the gate passes only "
                                                               "when all its tests run"))
            if verdict != "pass":
                return verdict, reason
        return "pass", ""

    def as_json(self, gate, fingerprint):
        verdict, reason = self.verdict()
        return {"passed": verdict == "pass", "verdict": verdict, "reason": reason, "rows": self.rows,
                "params": self.params, "last_epochs": self.scores, "tests": self.outcomes,
                "tolerance": CLAIM_TOLERANCE, "gate": gate, "fingerprint": fingerprint}


REPORT = Report()


@pytest.fixture(scope="module", autouse=True)
def gate_report(request):
    """After every gate test: the verdict, written once. A session that selects only some of them
    (`pytest -q test_model.py::test_architecture`) reports those, and that it gives no verdict."""
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    selected = {item.name for item in request.session.items}
    if not set(GATE_TESTS) <= selected:
        outcomes = ", ".join(f"{test} {REPORT.outcomes[test][0]}" for test in GATE_TESTS if test in REPORT.outcomes)
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\ngate: {outcomes}; the gate's verdict needs all its tests: `pytest -q`", flush=True)
        return
    report = REPORT.as_json(os.environ.get("GATE_SOURCE", "this repository"), fingerprint(ROOT))

    def say(line):
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\n{line}", flush=True)  # at the start of a line, where an annotation must be
    publish(report, say)


def recorded(test):
    """Runs a gate test and records its outcome in REPORT; a failure is its one line (the
    student's traceback, when their code raised, is in the captured output above it)."""
    @functools.wraps(test)
    def run():
        try:
            test()
        except AssertionError as e:  # ChildFailed too: the student's code did not run to the end
            reason = last_line(str(e).split("\n", 1)[0]) or "an assertion failed"  # not pytest's rewritten detail
            REPORT.outcomes[test.__name__] = ("error" if isinstance(e, ChildFailed) else "fail", reason)
        except BaseException as e:  # pytest.fail (no MNIST), an error of the gate's own
            REPORT.outcomes[test.__name__] = ("error", getattr(e, "msg", None) or f"{type(e).__name__}: {e}")
            raise
        else:
            REPORT.outcomes[test.__name__] = ("pass", "")
        verdict, reason = REPORT.outcomes[test.__name__]
        if verdict != "pass":  # outside the except block: the one line, without the assertion's chain
            pytest.fail(reason, pytrace=False)
    return run


@recorded
def test_architecture():
    """model.py's Net against the assignment's rules; needs no training and no artifacts."""
    result = architecture()
    REPORT.params = result["params"]
    for r in result["rows"]:
        REPORT.row(r["rule"], required(r["rule"]), r["value"], r["ok"])
    assert result["refusal"] is None, result["refusal"]


@recorded
def test_committed_run():
    """The committed model.pt and metrics.json: from this model.py's Net, at the bar, and the
    weights of each of the last epochs re-scored on the test set to what metrics.json claims."""
    check_run(METRICS, WEIGHTS, mnist_test_set(), report=REPORT)


if __name__ == "__main__":
    child_main(sys.argv[1:])
