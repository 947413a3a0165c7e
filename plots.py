"""The figures: training curves from a metrics history, and each seed's worst late epoch.

    python plots.py seeds.json [more seeds files ...]   # redraws seeds.png from one or more records
"""
import io
import json
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from artifacts import write_atomic
from rules import LAST_EPOCHS, MIN_ACCURACY as BAR  # the course's bar, set once in rules.py

ERROR_TICKS = [90, 50, 20, 10, 5, 2, 1, 0.5, 0.3, 0.2, 0.1]  # accuracy 10, 50, 80, ... 99.9


def png(fig):
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def curves_png(history, averaged=True):
    """Loss and accuracy per epoch: the weights being trained, on the batches as they saw them
    (dropout on), against the evaluated model, by default the weight average. Epochs trained
    without augmentation are shaded."""
    split = "test" if "test_accuracy" in history[0] else "val"
    scored = f"{split} (weight average)" if averaged else split
    epochs = [h["epoch"] for h in history]
    clean = [h["epoch"] for h in history if not h.get("augmented", True)]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    # Accuracy is drawn as its error, 100 - accuracy, on a log scale labelled in accuracy: the late
    # epochs near the bar stand apart, and a weak model's first epochs (or dropout's 84 % in epoch 1)
    # stay on the chart.
    for ax, metric, value in ((ax_loss, "loss", lambda v: v), (ax_acc, "accuracy", lambda v: max(100 - v, 0.01))):
        if clean:
            ax.axvspan(min(clean) - 0.5, max(clean) + 0.5, color="gray", alpha=0.12, label="no augmentation")
        ax.plot(epochs, [value(h[f"train_{metric}"]) for h in history], "o-", label="train (as trained, dropout on)")
        ax.plot(epochs, [value(h[f"{split}_{metric}"]) for h in history], "o-", label=scored)
    ax_loss.set(title="loss", xlabel="epoch", yscale="log")
    ax_acc.axhline(100 - BAR, color="gray", linestyle="--", linewidth=1, label=f"{BAR:.2f}% bar")
    ax_acc.set(title="accuracy (%), on a log scale of the error", xlabel="epoch", yscale="log")
    ax_acc.invert_yaxis()  # higher accuracy up
    ax_acc.yaxis.set_major_locator(FixedLocator(ERROR_TICKS))
    ax_acc.yaxis.set_major_formatter(FuncFormatter(lambda error, _: f"{100 - error:g}"))
    ax_acc.yaxis.set_minor_formatter(NullFormatter())
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return png(fig)


def seeds_label(record):
    """"CPU, 10 seeds" or "NVIDIA H200, captured, 17 seeds": on CUDA the step path is named, so that
    records of the captured and the eager path on the same GPU tell apart."""
    path = ""
    if record["device"].startswith("cuda") and "cuda_graph" in record:
        path = ", captured" if record["cuda_graph"] else ", eager"
    return f"{record.get('device_name') or record['device'].upper()}{path}, {len(record['seeds'])} seeds"


def lowest_last(seed):
    """The lowest accuracy of a seed's last epochs (records before LAST_EPOCHS was a rule: min_last_3)."""
    return seed["lowest_last"] if "lowest_last" in seed else seed["min_last_3"]


def seeds_png(records):
    """One dot per seed: the lowest accuracy of its last LAST_EPOCHS epochs, against the bar. One row per
    record (a seeds.json), labelled with its device and seed count; equal values stack upwards."""
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.9 * len(records)))
    lows_all = []
    for row, record in enumerate(records):
        lows = [lowest_last(s) for s in record["seeds"]]
        lows_all += lows
        stacked = [row + 0.1 * lows[:i].count(low) for i, low in enumerate(lows)]
        ax.scatter(lows, stacked, s=30, c=["tab:blue" if low >= BAR else "tab:red" for low in lows])
        held = sum(low >= BAR for low in lows)
        ax.text(1.01, row, f"{held} of {len(lows)} hold", transform=ax.get_yaxis_transform(), va="center")
    ax.axvline(BAR, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(records)), [seeds_label(r) for r in records])
    ax.set_ylim(-0.4, len(records) - 0.2)
    ax.set_xlim(min(lows_all + [BAR]) - 0.03, max(lows_all + [BAR]) + 0.03)
    ax.set_xlabel(f"lowest {records[0]['eval_split']} accuracy (%) of the last {LAST_EPOCHS} epochs; "
                  f"dashed: the {BAR:.2f} bar")
    ax.grid(axis="x", alpha=0.3)
    return png(fig)


def main(paths):
    """Draws seeds.png from seeds records."""
    records = []
    for path in paths:
        try:
            with open(path) as f:
                records.append(json.load(f))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            sys.exit(f"error: {path}: {e}")
    try:
        picture = seeds_png(records)
    except (KeyError, TypeError, IndexError, ValueError, ZeroDivisionError, AttributeError) as e:
        sys.exit(f"error: not a seeds record from `python -m research.seeds` ({type(e).__name__}: {e})")
    write_atomic("seeds.png", picture)
    print(f"wrote seeds.png from {', '.join(paths)}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python plots.py seeds.json [more seeds files ...]")
    main(sys.argv[1:])
