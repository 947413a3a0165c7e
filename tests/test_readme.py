"""`python summary.py --readme` keeps the README's tables and figures true to the committed run, and
`python train.py` runs it when it saves beside the README. The command's blocks come from
metrics.json, which keeps the trained model's tables, so none of this reads model.py (but
write_readme's check that the run is model.py's Net, which these tests point at the reference net).
Whether this repository's own README is current is a question about its committed run, so CI asks
it (`python summary.py --check` in .ci/run), not these tests: a fork's retrained run is its own."""
import json
import shutil

import pytest
import torch

import rules
import summary
import train
from conftest import RUN
from reference import Reference

OUTSIDE = "# A student's submission\n\nTheir own words, which the command never touches.\n"


@pytest.fixture
def fork(tmp_path, monkeypatch):
    """A README with every block, empty, between a student's own text, and a run of the reference
    net whose metrics.json keeps its tables as train.py writes them."""
    monkeypatch.setattr(summary, "student_net", lambda: Reference)
    metrics = json.loads((RUN / "metrics.json").read_text())
    metrics.update({k: v for k, v in summary.tables(Reference()).items() if k != "params"})
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    blocks = "".join(f"<!-- begin {name}: python summary.py --readme -->\n<!-- end {name} -->\n{OUTSIDE}"
                     for name in summary.BLOCK_NAMES)
    (tmp_path / "README.md").write_text(OUTSIDE + blocks)
    return tmp_path


def write(folder):
    return summary.write_readme(folder / "README.md", folder / "metrics.json")


def test_the_command_fills_every_block_and_nothing_else(fork):
    before = (fork / "README.md").read_text()
    assert write(fork) == f"rewrote README.md's blocks: {', '.join(summary.BLOCK_NAMES)}"
    after = (fork / "README.md").read_text()
    assert summary.BLOCK.sub("", after) == summary.BLOCK.sub("", before)  # outside the markers: the same
    assert f"| fewer than {rules.PARAMS_BELOW:,} | 5,288 |" in after and "# MNIST in 5,288 numbers" in after
    assert "conv5.0  Conv2d" in after and "head     3  0  1     6      4     2  22" in after
    assert "| 15 | 0.0022 | no |" in after and "**99.47**" in after and "![training curves](curves.png)" in after
    assert write(fork) == "README.md is up to date"  # idempotent
    assert (fork / "README.md").read_text() == after


def test_a_hand_edit_inside_a_block_is_stale_until_the_command_runs(fork):
    write(fork)
    metrics = json.loads((fork / "metrics.json").read_text())
    edited = (fork / "README.md").read_text().replace("| 5,288 |", "| 4,999 |")
    assert summary.stale_blocks(edited, metrics) == ["rules"]
    (fork / "README.md").write_text(edited)
    write(fork)
    assert summary.stale_blocks((fork / "README.md").read_text(), metrics) == []


def test_a_readme_without_markers_is_left_alone(fork):
    (fork / "README.md").write_text(OUTSIDE)
    assert "has no generated blocks, so it was left alone" in write(fork)
    assert (fork / "README.md").read_text() == OUTSIDE


def test_a_run_of_another_model_is_refused(fork, monkeypatch):
    class Wider(Reference):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Parameter(torch.zeros(10))

    monkeypatch.setattr(summary, "student_net", lambda: Wider)
    before = (fork / "README.md").read_text()
    with pytest.raises(ValueError, match=r"model.py's Net carries 5,298 numbers, the committed run's model 5,288: "
                                         r"run `python train.py` first"):
        write(fork)
    assert (fork / "README.md").read_text() == before


def test_a_run_without_tables_names_the_fix(fork):
    shutil.copy(RUN / "metrics.json", fork / "metrics.json")  # written before runs kept their tables
    with pytest.raises(ValueError, match=r"metrics.json is not a run of the current train.py \(KeyError: 'layers'\)"):
        write(fork)


def test_a_run_saved_beside_the_readme_refreshes_its_blocks(fork, monkeypatch, test_tensors, capsys):
    images, labels = test_tensors
    monkeypatch.setattr(train, "HERE", str(fork))
    monkeypatch.setattr(train, "load_splits", lambda *_: (images[:256], labels[:256], images[256:512], labels[256:512], "test"))
    train.main(["--epochs", "1", "--out", str(fork)], Reference)
    metrics = json.loads((fork / "metrics.json").read_text())
    assert metrics["history"][-1]["epoch"] == 1
    out = capsys.readouterr().out
    assert f"rewrote README.md's blocks: {', '.join(summary.BLOCK_NAMES)}" in out
    verdict = out.strip().splitlines()[-1]  # a run ends with its verdict: one epoch of 256 images misses the bar
    assert verdict.startswith("verdict: misses the bar: ")
    assert rules.LAST_EPOCHS == 1 or verdict.endswith(f"the run holds 1 epoch; the rule judges the last {rules.LAST_EPOCHS}")
    assert summary.stale_blocks((fork / "README.md").read_text(), metrics) == []
