"""How a model and its run are shown: the layer and receptive-field tables, the training curves
(curves.png), the README's generated blocks (the rules, those tables, the run's last epochs) and
the gate's verdict as a job summary.

    python summary.py            # the layer and receptive-field tables of model.py's Net
    python summary.py --readme   # README.md's marked blocks, rewritten from the committed run
    python summary.py --check    # fails if those blocks differ from the committed run (CI)
"""
import argparse
import collections
import io
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn

import artifacts
import rules
import checks
from checks import student_net
from measure import count_numbers



@torch.no_grad()
def leaf_calls(model, x):
    """Runs model(x); returns ([(name, module, input shape, output)] per leaf module, in the order
    forward called them, and the model's output)."""
    names = {m: name for name, m in model.named_modules()}
    calls, hooks = [], []
    for m in model.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(
                lambda m, i, o: calls.append((names[m], m, tuple(i[0].shape), o))))
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls, out


def eval_leaf_calls(model, size=28):
    """leaf_calls on one blank size x size image in eval mode; the model's mode is left as it was."""
    was_training = model.training
    calls, _ = leaf_calls(model.eval(), torch.zeros(1, 1, size, size))
    model.train(was_training)
    return calls


def layer_table(model, size=28):
    """Rows of (name, type, output shape, params) for each leaf module run, like torchsummary."""
    return [(name, type(m).__name__, tuple(o.shape[1:]), sum(p.numel() for p in m.parameters()))
            for name, m, _, o in eval_leaf_calls(model, size)]


def receptive_field_table(model, size=28):
    """Rows of (name, kernel, padding, stride, n_in, n_out, jump, rf) for each conv and pool, in the
    order forward runs them.

    rf_out = rf_in + (kernel - 1) * jump_in;  jump_out = jump_in * stride.
    A dilated kernel counts its span; the global average pool's row uses the whole map as its kernel.
    """
    rows, rf, jump = [], 1, 1
    for name, m, in_shape, out in eval_leaf_calls(model, size):
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, p, s = (int(v) if not isinstance(v, (tuple, list)) else int(v[0])
                       for v in (m.kernel_size, m.padding, m.stride or m.kernel_size))
            d = getattr(m, "dilation", 1)
            k = (d if isinstance(d, int) else d[0]) * (k - 1) + 1
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            k, p, s = in_shape[-1], 0, 1
        else:
            continue
        rf, jump_in = rf + (k - 1) * jump, jump
        jump *= s
        rows.append((name, k, p, s, in_shape[-1], out.shape[-1], jump_in, rf))
    return rows


def tables(model):
    """The layer table and the receptive-field table as JSON-ready rows: what `python summary.py`
    prints, and what train.py keeps in metrics.json as the trained model's."""
    return {"layers": [[name, kind, str(list(shape)), params] for name, kind, shape, params in layer_table(model)],
            "receptive_field": [list(row) for row in receptive_field_table(model)]}


def format_table(header, rows, align):
    """Plain-text columns, each as wide as its widest entry; align: "<" or ">" per column."""
    cells = [header] + [[f"{v:,}" if isinstance(v, int) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if a == "<" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()
                     for row in cells)


def format_tables(t):
    """tables(model)'s two tables as text."""
    layers = format_table(["layer", "type", "output shape", "params"], t["layers"] + [["total", "", "", t["params"]]],
                          "<<>>")
    rows = t["receptive_field"]
    fields = format_table(["layer", "k", "p", "s", "n_in", "n_out", "j_in", "RF"], rows, "<>>>>>>>")
    if not rows or rows[-1][5] != 1 or any(a[5] != b[4] for a, b in zip(rows, rows[1:])):
        fields += ("\nincomplete: forward changes the map between these modules with functions (F.max_pool2d, "
                   "x.mean, ...),\nwhich this table does not see; the gate checks by value that every logit sees "
                   "every pixel")
    return layers, fields


# --- The training curves: curves.png ------------------------------------------------------------------

ERROR_TICKS = [90, 50, 20, 10, 5, 2, 1, 0.5, 0.3, 0.2, 0.1]  # accuracy 10, 50, 80, ... 99.9


def pyplot():
    """matplotlib's pyplot, drawing to files only; loaded when a figure is drawn, not by the gate."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    return plt


def png(fig):
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return buffer.getvalue()


def curves_png(history, averaged=True):
    """Loss and accuracy per epoch: the weights being trained, on the batches as they saw them
    (dropout on), against the evaluated model, by default the weight average. Epochs trained
    without augmentation are shaded."""
    split = "test" if "test_accuracy" in history[0] else "val"
    scored = f"{split} (weight average)" if averaged else split
    epochs = [h["epoch"] for h in history]
    clean = [h["epoch"] for h in history if not h.get("augmented", True)]
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    # Accuracy is drawn as its error, 100 - accuracy, on a log scale labelled in accuracy: the late
    # epochs near the bar stand apart, and a weak model's first epochs (or dropout's 84 % in epoch 1)
    # stay on the chart.
    for ax, metric, value in ((ax_loss, "loss", lambda v: v), (ax_acc, "accuracy", lambda v: max(100 - v, 0.01))):
        if clean:
            ax.axvspan(min(clean) - 0.5, max(clean) + 0.5, color="gray", alpha=0.12, label="no augmentation")
        ax.plot(epochs, [value(h[f"train_{metric}"]) for h in history], "o-", label="train (as trained, dropout on)")
        ax.plot(epochs, [value(h[f"{split}_{metric}"]) for h in history], "o-", label=scored)
    ax_loss.set(title="loss", xlabel="epoch", yscale="log")
    ax_acc.axhline(100 - rules.MIN_ACCURACY, color="gray", linestyle="--", linewidth=1, label=f"{rules.MIN_ACCURACY:.2f}% bar")
    ax_acc.set(title="accuracy (%), on a log scale of the error", xlabel="epoch", yscale="log")
    ax_acc.invert_yaxis()  # higher accuracy up
    ax_acc.yaxis.set_major_locator(FixedLocator(ERROR_TICKS))
    ax_acc.yaxis.set_major_formatter(FuncFormatter(lambda error, _: f"{100 - error:g}"))
    ax_acc.yaxis.set_minor_formatter(NullFormatter())
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return png(fig)



# --- The README's generated blocks: `python summary.py --readme` ------------------------------------
# A block sits between two marker lines, and the command rewrites what is between them, nothing else:
#   <!-- begin layers: python summary.py --readme -->
#   <!-- end layers -->
# Every figure of the course's rules and of the trained model in the README lives in such a block,
# so that another course's rules.py, or a student's retrained model, never leaves a stale sentence.
BLOCK = re.compile(r"(<!-- begin (?P<name>[a-z-]+): python summary\.py --readme -->\n)(?P<body>.*?)(<!-- end (?P=name) -->)",
                   re.S)
BLOCK_NAMES = ("title", "rules", "forms", "refusals", "model", "layers", "receptive-field", "last-epochs")
HERE = Path(__file__).parent


def rules_table(metrics, last):
    """The course's rules (rules.py) beside this model's figures."""
    fc = {"after-gap": "optional: one, classifying the pooled vector" if rules.REQUIRE_GAP else
          "optional: one classifier, after the pool where there is one", "anywhere": "allowed anywhere",
          "nowhere": "not allowed"}[rules.FULLY_CONNECTED]
    required = lambda flag: "required" if flag else "optional"
    return "\n".join([
        "| rule | this course | this model |", "|---|---|---|",
        f"| numbers carried (parameters and any other table) | fewer than {rules.PARAMS_BELOW:,} | {metrics['params']:,} |",
        f"| test accuracy | ≥ {rules.MIN_ACCURACY:.2f} % in each of the last {rules.LAST_EPOCHS} epochs | "
        f"{', '.join(f'{a:.2f}' for a in last)} |",
        f"| epochs | ≤ {rules.MAX_EPOCHS} | {metrics['epochs']} |",
        f"| BatchNorm, Dropout, global average pooling | {required(rules.REQUIRE_BATCHNORM)}, "
        f"{required(rules.REQUIRE_DROPOUT)}, {required(rules.REQUIRE_GAP)} | `pytest -q` checks them |",
        f"| a fully-connected layer | {fc} | `pytest -q` checks it |"])


def last_epochs_table(history):
    """The run's last epochs, the ones the rule judges in bold."""
    judged = history[-rules.LAST_EPOCHS:]
    rows = ["| epoch | lr | augmented | train loss | train acc % | test loss | test acc % |",
            "|---:|---:|:---:|---:|---:|---:|---:|"]
    for h in history[-(rules.LAST_EPOCHS + 2):]:
        accuracy = f"**{h['test_accuracy']:.2f}**" if h in judged else f"{h['test_accuracy']:.2f}"
        rows.append(f"| {h['epoch']} | {h['lr']:.4f} | {'yes' if h['augmented'] else 'no'} | {h['train_loss']:.4f} | "
                    f"{h['train_accuracy']:.2f} | {h['test_loss']:.4f} | {accuracy} |")
    return "\n".join(rows) + (f"\n\nThe saved model is the last epoch's ({judged[-1]['test_accuracy']:.2f} %). "
                              f"[Every epoch](metrics.json); the curves:\n\n![training curves](curves.png)")


def readme_blocks(metrics):
    """{block name: markdown} from a run's metrics.json and rules.py."""
    history = metrics["history"]
    last = [h["test_accuracy"] for h in history[-rules.LAST_EPOCHS:]]
    layers, fields = format_tables(metrics)
    kinds = collections.Counter(kind for _, kind, _, _ in metrics["layers"])
    return {
        "title": f"# MNIST in {metrics['params']:,} numbers, with a gate that checks the claim",
        "rules": rules_table(metrics, last),
        "model": (f"The model in `model.py` carries {metrics['params']:,} numbers; its modules: "
                  f"{', '.join(f'{n} {kind}' for kind, n in kinds.most_common())}. The committed run trained it "
                  f"on {metrics['device']}, epochs 1 to {metrics['epochs']} (seed {metrics['seed']}, torch "
                  f"{metrics['torch_version']}); {'its last epoch' if len(last) == 1 else f'its last {len(last)} epochs'} "
                  f"scored {', '.join(f'{a:.2f}' for a in last)} % on the test set."),
        "forms": "\n".join(checks.FORMS),  # what the gate accepts and refuses, from its own catalogue
        "refusals": "\n".join(checks.refusal_table()),
        "layers": f"```\n{layers}\n```",
        "receptive-field": f"```\n{fields}\n```",
        "last-epochs": last_epochs_table(history),
    }


def refresh_readme(text, blocks):
    """text with each marked block's body replaced by blocks[name]; unknown names are left alone."""
    def fill(block):
        return block.group(0) if block["name"] not in blocks else block.group(1) + blocks[block["name"]] + "\n" + block.group(4)
    return BLOCK.sub(fill, text)


def stale_blocks(text, metrics):
    """The names of text's marked blocks that differ from what write_readme would write for this run."""
    return [m["name"] for m in BLOCK.finditer(refresh_readme(text, readme_blocks(metrics)))
            if m.group(0) not in text]


def read_run(metrics_path):
    """(metrics, readme_blocks(metrics)) of the run in metrics_path. Raises ValueError with a
    one-line reason when the file is missing or is not a run of the current train.py."""
    try:
        metrics = json.loads(metrics_path.read_text())
        return metrics, readme_blocks(metrics)
    except FileNotFoundError:
        raise ValueError(f"{metrics_path.name} is missing: run `python train.py` first") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{metrics_path.name} is not a run of the current train.py ({type(e).__name__}: {e}): "
                         "run `python train.py` first") from None


def write_readme(readme=HERE / "README.md", metrics_path=HERE / artifacts.METRICS, params=None):
    """Rewrites readme's marked blocks from the committed run; returns the message to print.
    params: what model.py's Net carries, if known (else counted here). Raises ValueError with a
    one-line reason when the run cannot describe model.py's Net."""
    readme, metrics_path = Path(readme), Path(metrics_path)
    text = readme.read_text()
    if not BLOCK.search(text):
        return (f"{readme.name} has no generated blocks, so it was left alone. To add one, put the two lines "
                "`<!-- begin layers: python summary.py --readme -->` and `<!-- end layers -->` where the table "
                f"goes (blocks: {', '.join(BLOCK_NAMES)})")
    metrics, blocks = read_run(metrics_path)
    params = count_numbers(student_net()()) if params is None else params
    if params != metrics["params"]:
        raise ValueError(f"model.py's Net carries {params:,} numbers, the committed run's model {metrics['params']:,}: "
                         "run `python train.py` first, then this command")
    new = refresh_readme(text, blocks)
    if new == text:
        return f"{readme.name} is up to date"
    artifacts.write_atomic(readme, new)
    changed = [m["name"] for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(new)) if m["body"] != n["body"]]
    return f"rewrote {readme.name}'s blocks: {', '.join(changed)}"


def rule_figures_in_prose(text):
    """The course's figures (rules.py) that text states outside its generated blocks: written there,
    they go stale when a course changes its rules."""
    prose = BLOCK.sub("", text)
    figures = [f"{rules.PARAMS_BELOW:,}", f"{rules.MIN_ACCURACY:.2f}", f"{rules.MAX_EPOCHS} epochs",
               f"last {rules.LAST_EPOCHS} epochs"]
    return [figure for figure in figures if figure in prose]


def check_readme():
    """CI's question: are this README's blocks the committed run's, and does its prose leave the
    course's figures to the blocks? A one-line answer either way."""
    try:
        text = (HERE / "README.md").read_text()
        stale = stale_blocks(text, read_run(HERE / artifacts.METRICS)[0])
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if stale:
        sys.exit(f"error: README.md's blocks {stale} differ from the committed run: run `python summary.py --readme`")
    if figures := rule_figures_in_prose(text):
        sys.exit(f"error: README.md states {figures} outside its generated blocks: rules.py sets them")
    return "README.md's blocks match the committed run and rules.py"


# --- The gate's verdict, shown where people look: the job summary and $GATE_REPORT ---------------------
# test_model.py collects the report once every gate test has run; these render and write it.

def required(rule):
    """The assignment's figure for one of the architecture's rules."""
    need = {True: "required", False: "optional"}
    return {"runs": "(N, 10) out", "parameters": f"< {rules.PARAMS_BELOW:,}", "BatchNorm": need[rules.REQUIRE_BATCHNORM],
            "Dropout": need[rules.REQUIRE_DROPOUT], "global average pool": need[rules.REQUIRE_GAP],
            "fully-connected": {"after-gap": "after the pool only"}.get(rules.FULLY_CONNECTED, rules.FULLY_CONNECTED),
            "whole image": "all 784 pixels"}.get(rule, "the rules")


MARKS = {True: "✔", False: "✘", None: "–"}


def summary_markdown(report):
    """The job summary: the rules, this model's figures, the one-line reason, and which gate judged."""
    head = "✔ passed" if report["passed"] else f"✘ {'failed' if report['verdict'] == 'fail' else 'error'}"
    lines = [f"### MNIST gate: {head}", "", "| rule | assignment | this model | |", "|---|---|---|---|"]
    lines += [f"| {r['rule']} | {r['required']} | {r['value']} | {MARKS[r['ok']]} |" for r in report["rows"]]
    if not report["passed"]:
        lines += ["", f"**Why:** {report['reason']}"]
    lines += ["", f"Judged by {report['gate']}, gate fingerprint `{report['fingerprint'][:16]}`.", ""]
    return "\n".join(lines)


def publish(report, say):
    """$GATE_REPORT, the job summary and the annotation; say(line) prints past pytest's capture."""
    if os.environ.get("GATE_REPORT"):
        artifacts.write_atomic(os.environ["GATE_REPORT"], json.dumps(report, indent=1))
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as summary:
            summary.write(summary_markdown(report) + "\n")
    if not report["passed"] and os.environ.get("GITHUB_ACTIONS"):
        say(f"::error title=MNIST gate::{' '.join(report['reason'].split())}")
    scores = " ".join(f"{s:.2f}" for s in report["last_epochs"].values())
    say(f"gate: {report['verdict']} ({report['params'] or '?'} numbers; last epochs {scores or '?'}) "
        f"fingerprint {report['fingerprint'][:16]}" + (f": {report['reason']}" if report["reason"] else ""))



if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The tables of model.py's Net, and the README's generated blocks.")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--readme", action="store_true", help="rewrite README.md's blocks from the committed run")
    action.add_argument("--check", action="store_true", help="fail if README.md's blocks differ from the committed run")
    options = parser.parse_args()
    if options.readme:
        try:
            print(write_readme())
        except ValueError as e:
            sys.exit(f"error: {e}")
    elif options.check:
        print(check_readme())
    else:
        model = student_net()()
        print("\n\n".join(format_tables({**tables(model), "params": count_numbers(model)})))
