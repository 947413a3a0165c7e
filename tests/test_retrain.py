"""Retraining from scratch, with the reference net (model.py's default layers): the recipe holds
the bar, and the same command gives the same run. Minutes on a CPU: `pytest -q -m slow tests`."""
import hashlib
import json
import subprocess

import pytest

from conftest import ROOT, train_command
from reference import Reference
from test_model import check_run


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_reproduce_from_scratch(tmp_path, test_set):
    """Retrain with the committed defaults and hold the fresh run to the same gate."""
    subprocess.run(train_command("--out", str(tmp_path)), cwd=ROOT, check=True)
    check_run(tmp_path / "metrics.json", tmp_path / "model.pt", test_set, Reference)


@pytest.mark.slow
def test_same_command_twice_gives_same_metrics_and_weights_file(tmp_path):
    """Seeded on the CPU: two identical one-epoch runs agree on every recorded number, and their
    model.pt files are the same bytes."""
    histories, digests = [], []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        subprocess.run(train_command("--epochs", "1", "--device", "cpu", "--out", str(tmp_path / run)),
                       cwd=ROOT, check=True, capture_output=True)
        history = json.loads((tmp_path / run / "metrics.json").read_text())["history"]
        histories.append([{k: v for k, v in h.items() if k != "seconds"} for h in history])
        digests.append(hashlib.sha256((tmp_path / run / "model.pt").read_bytes()).hexdigest())
    assert histories[0] == histories[1]
    assert digests[0] == digests[1]
