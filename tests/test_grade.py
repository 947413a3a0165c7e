"""grade.py and the gate's report: a class graded with this repository's gate, whatever the
students' own gate files say. Submissions are built in a temporary folder from tests/run (a real
run of the reference net, with tests/reference.py as its model.py), so no rewrite of model.py can
change these tests. Each gate run takes 10-30 s on a CPU: most of these are marked slow.
"""
import copy
import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import artifacts
import grade
from conftest import HERE, ROOT, RUN, train_command
from data import DEFAULT_DATA_DIR
from rules import LAST_EPOCHS
from summary import publish, summary_markdown
from test_model import Report

# What this branch's gate replaced: a test_model.py that imported model.py into its own process.
GATE_BEFORE_ISSUE_34 = "facc385"
# A gate run in another folder reads this repository's MNIST, wherever the tests found it.
WITH_DATA = {**os.environ, "MNIST_DATA_DIR": DEFAULT_DATA_DIR}
PATCH = ('import sys\ngate = sys.modules.get("test_model")\n'
         'if gate: gate.check_metrics = gate.check_scores = lambda *a, **k: None\n')


def reference_model(prefix=""):
    """model.py for tests/run: the reference net as Net, with prefix lines at the top."""
    return prefix + (HERE / "reference.py").read_text() + "\nNet = Reference\n"


def claims_of(target=None):
    """tests/run's metrics.json, its last epochs (and test_accuracy) raised to target when given."""
    metrics = json.loads((RUN / "metrics.json").read_text())
    if target is not None:
        for h in metrics["history"][-LAST_EPOCHS:]:
            h["test_accuracy"] = target
        metrics["test_accuracy"] = target
    return json.dumps(metrics, indent=1)


def submission(folder, model=None, metrics=None, gate=True, edits=None):
    """A fork in folder: the three files, and (gate) this repository's gate files as they are now."""
    files = {name: (ROOT / name).read_bytes() for name in grade.WATCHED if gate and (ROOT / name).is_file()}
    files.update({"model.py": (model or reference_model()).encode(), "model.pt": (RUN / "model.pt").read_bytes(),
                  "metrics.json": (metrics or claims_of()).encode()})
    for name, edit in (edits or {}).items():
        files[name] = edit(files[name].decode()).encode()
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def commit_all(folder):
    git = ["git", "-C", str(folder), "-c", "user.name=student", "-c", "user.email=s@example.org"]
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "submission"], check=True)
    return folder


def run_grade(*argv, cwd):
    return subprocess.run([sys.executable, str(ROOT / "grade.py"), *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=1800)


def gradebook(path):
    return {row["submission"]: row for row in csv.DictReader(open(path))}


# --- fast: no gate run -------------------------------------------------------------------------------

def test_model_py_is_read_before_it_runs():
    assert grade.read_flags(reference_model()) == []
    assert grade.read_flags(reference_model(PATCH)) == ["line 1: import sys", "line 2: sys.modules"]
    risky = ("import torch\nimport torch.nn.functional as F\nimport subprocess\nF.relu = abs\n"
             "w = torch.load('w.pt')\nx = open('labels')\ny = getattr(torch, 'save')\n")
    assert grade.read_flags(risky) == [
        "line 3: import subprocess", "line 4: F.relu replaced (patches an imported module)",
        "line 5: torch.load (file access)", "line 6: open", "line 7: getattr(torch, ...) on a module"]


@pytest.mark.parametrize("argv, message", [
    (["no/such/folder", "--out", "g.csv"], "no/such/folder: no such folder, and not a git URL"),
    ([".", "--deadline", "March", "--out", "g.csv"], "--deadline 'March' is not a date"),
    ([".", "--out", "no/such/dir/g.csv"], "not a file in a writable folder"),
    (["--list", "missing.txt", "--out", "g.csv"], "--list missing.txt: No such file"),
    ([".", "--jobs", "0", "--out", "g.csv"], "--jobs must be >= 1"),
])
def test_bad_input_is_one_line(tmp_path, argv, message):
    done = run_grade(*argv, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and message in done.stderr
    assert not (tmp_path / "g.csv").exists()


def test_fingerprint_changes_with_any_gate_file(tmp_path):
    for name in artifacts.GATE_FILES:
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    assert artifacts.fingerprint(tmp_path) == artifacts.fingerprint(ROOT)
    (tmp_path / "rules.py").write_text((ROOT / "rules.py").read_text() + "\n")
    assert artifacts.fingerprint(tmp_path) != artifacts.fingerprint(ROOT)


def test_job_summary_of_a_failure(tmp_path, monkeypatch, capsys):
    report = Report()
    report.row("parameters", "< 8,000", "5,288", True)
    report.row("epoch 15", "≥ 99.40 %", "99.47 %", True)
    report.outcomes = {"test_architecture": ("pass", ""), "test_committed_run": ("fail", "epoch 13: the weights "
                                                                                 "score 99.50% but metrics.json claims 99.90%")}
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GATE_REPORT", str(tmp_path / "report.json"))
    said = []
    publish(report.as_json("course/mnist@v2", "ab" * 32), said.append)
    summary = (tmp_path / "summary.md").read_text()
    assert "| parameters | < 8,000 | 5,288 | ✔ |" in summary and "✘ failed" in summary
    assert "**Why:** epoch 13: the weights score 99.50% but metrics.json claims 99.90%" in summary
    assert "Judged by course/mnist@v2, gate fingerprint `abababababababab`" in summary
    assert [line for line in said if line.startswith("::error")] == \
        ["::error title=MNIST gate::epoch 13: the weights score 99.50% but metrics.json claims 99.90%"]
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is False


def test_a_retrain_is_exact_only_under_the_same_cpu_numerics():
    claims = {**json.loads(claims_of()), "device": "cpu", "threads": 2, "cpu_capability": "AVX2"}
    same = copy.deepcopy(claims)
    assert grade.compare_runs(claims, same, 0.02, LAST_EPOCHS) == "matches exactly (the same CPU numerics)"
    same["history"][-1]["train_loss"] += 1e-4  # a different thread count changes the bits, if not the accuracies
    assert grade.compare_runs(claims, same, 0.02, LAST_EPOCHS).endswith(
        "the accuracies agree, the other recorded numbers do not")
    other = {**same, "threads": 1}
    assert grade.compare_runs(claims, other, 0.02, LAST_EPOCHS) == "matches within 0.02 (other numerics: threads)"
    other["history"][-1]["test_accuracy"] -= 0.05
    assert grade.compare_runs(claims, other, 0.02, LAST_EPOCHS).startswith(
        "retrain does not match within 0.02 (other numerics: threads)")


def test_a_gate_that_ran_only_some_tests_has_not_passed():
    report = Report()
    report.outcomes = {"test_architecture": ("pass", "")}
    assert report.verdict() == ("fail", "test_committed_run did not run: the gate passes only when all its tests run")


# --- slow: each runs the gate ---------------------------------------------------------------------------

@pytest.mark.slow
def test_five_submissions(tmp_path):
    """Issue 34's gradebook: two honest submissions pass; three cheap cheats fail, each turning its
    own gate green, and the gradebook names what they changed and what model.py does."""
    raised = claims_of(99.9)
    honest = commit_all(submission(tmp_path / "honest"))
    folder = submission(tmp_path / "folder", gate=False)
    lowered = commit_all(submission(tmp_path / "lowered", metrics=raised, edits={
        "rules.py": lambda s: s.replace("MIN_ACCURACY = ", "MIN_ACCURACY = 90.0  # ")}))
    skipping = commit_all(submission(tmp_path / "skipping", metrics=raised, edits={
        "test_model.py": lambda s: s.replace("\nimport pytest\n", "\nimport pytest\npytestmark = pytest.mark.skip\n")}))
    patching = submission(tmp_path / "patching", model=reference_model(PATCH), metrics=raised)
    own_gate_passes(patching)
    commit_all(patching)
    done = run_grade(honest, folder, lowered, patching, skipping, "--jobs", 2, "--out", tmp_path / "g.csv",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = gradebook(tmp_path / "g.csv")
    assert {name: row["verdict"] for name, row in rows.items()} == {
        str(honest): "pass", str(folder): "pass", str(lowered): "fail", str(patching): "fail", str(skipping): "fail"}
    assert rows[str(honest)]["changed"] == rows[str(folder)]["changed"] == ""
    assert rows[str(lowered)]["changed"] == "rules.py" and rows[str(skipping)]["changed"] == "test_model.py"
    assert "sys.modules" in rows[str(patching)]["flags"]
    assert all("claims 99.90%" in rows[str(s)]["reason"] for s in (lowered, patching, skipping))
    assert rows[str(honest)]["params"] == "5288" and len(rows[str(honest)]["last_epochs"].split()) == 3


def own_gate_passes(patching):
    """The patching model.py turns a gate that imports it green: the gate before issue 34, from this
    repository's history (absent from a shallow clone: then only the grader's verdict is shown)."""
    names = ["test_model.py", "checks.py", "measure.py", "rules.py", "data.py", "pyproject.toml"]
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", GATE_BEFORE_ISSUE_34, *names], capture_output=True)
    if archive.returncode:
        warnings.warn(f"commit {GATE_BEFORE_ISSUE_34} is not in this clone's history (a shallow clone?): the "
                      "patching model.py was not shown to pass its own gate; the grader's verdict is still checked")
        return
    own = patching.parent / "own-gate"
    own.mkdir()
    subprocess.run(["tar", "-x", "-C", str(own)], input=archive.stdout, check=True)
    for name in grade.SUBMITTED:
        (own / name).write_bytes((patching / name).read_bytes())
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=own, env=WITH_DATA,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("prefix, reason", [
    ("import os\nos._exit(0)\n", "ended (architecture step, exit status 0) before writing its result"),
    ("raise ValueError('a bug in the student code')\n", "crashed in the architecture step (exit status 1): "
                                                         "ValueError: a bug in the student code"),
], ids=["exits-early-with-0", "raises"])
def test_code_that_ends_the_gate_early_does_not_pass(tmp_path, prefix, reason):
    folder = submission(tmp_path / "s", model=reference_model(prefix), gate=False)
    done = run_grade(folder, "--out", tmp_path / "g.csv", cwd=tmp_path)
    row = gradebook(tmp_path / "g.csv")[str(folder)]
    assert (row["verdict"], done.returncode) == ("error", 0) and reason in row["reason"], row


def graders_children():
    """The gate's child processes still running from a grade.py staging folder (Linux's /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if any(b"/grade-" in a and a.endswith(b"test_model.py") for a in argv):
            found.append(b" ".join(argv).decode(errors="replace"))
    return found


@pytest.mark.slow
def test_a_hanging_model_is_an_error_row_and_the_rest_still_grade(tmp_path):
    hangs = submission(tmp_path / "hangs", model=reference_model("while True:\n    pass\n"), gate=False)
    missing = tmp_path / "empty"
    missing.mkdir()
    done = run_grade(hangs, missing, "--timeout", 15, "--jobs", 2, "--out", tmp_path / "g.csv", cwd=tmp_path)
    rows = gradebook(tmp_path / "g.csv")
    assert done.returncode == 0
    assert (rows[str(hangs)]["verdict"], rows[str(hangs)]["reason"]) == ("error", "the gate did not finish within 15 s")
    assert not graders_children(), "the hanging model's process outlived the grade"
    assert rows[str(missing)]["reason"] == "model.py, model.pt, metrics.json missing from the submission"


@pytest.mark.slow
def test_the_gate_report_and_summary_of_a_passing_run(tmp_path):
    folder = submission(tmp_path / "s")
    env = {**WITH_DATA, "GATE_REPORT": str(tmp_path / "report.json"),
           "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"), "GATE_SOURCE": "course/mnist@v2"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "report.json").read_text())
    assert done.returncode == 0 and report["passed"] and report["fingerprint"] == artifacts.fingerprint(ROOT)
    summary = (tmp_path / "summary.md").read_text()
    assert summary == summary_markdown(report) + "\n" and "✘" not in summary
    assert {row["rule"] for row in report["rows"]} >= {"parameters", "BatchNorm", "Dropout", "global average pool",
                                                       "epochs", "re-score", "epoch 15"}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_retrain_finds_a_history_cut_to_ten_epochs(tmp_path):
    """Nothing in model.pt ties the epoch count to the weights: retraining the recorded config does."""
    metrics = json.loads(claims_of())
    metrics.update(history=metrics["history"][-10:], epochs=10)
    cut = commit_all(submission(tmp_path / "cut", metrics=json.dumps(metrics)))
    done = run_grade(cut, "--retrain", 1, "--seed", 0, "--out", tmp_path / "g.csv", cwd=tmp_path)
    row = gradebook(tmp_path / "g.csv")[str(cut)]
    assert done.returncode == 0 and row["retrain"].startswith("retrain does not match"), row


@pytest.mark.slow
def test_an_honest_run_retrains_exactly_whatever_the_graders_threads(tmp_path):
    """A run trained on 2 threads, graded where OMP_NUM_THREADS is 1: the retrain takes the run's own
    thread count from metrics.json, so a CPU run with the same torch reproduces to the last digit."""
    run = tmp_path / "run"
    run.mkdir()
    subprocess.run(train_command("--epochs", "1", "--device", "cpu", "--out", str(run)), cwd=ROOT, check=True,
                   capture_output=True, env={**WITH_DATA, "OMP_NUM_THREADS": "2"})
    folder = submission(tmp_path / "s", metrics=(run / "metrics.json").read_text())
    (folder / "model.pt").write_bytes((run / "model.pt").read_bytes())
    commit_all(folder)
    done = subprocess.run([sys.executable, str(ROOT / "grade.py"), str(folder), "--retrain", "1", "--out",
                           str(tmp_path / "g.csv")], cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                          env={**WITH_DATA, "OMP_NUM_THREADS": "1"})
    row = gradebook(tmp_path / "g.csv")[str(folder)]
    assert done.returncode == 0 and row["retrain"] == "matches exactly (the same CPU numerics)", row
