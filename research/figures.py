"""The seeds figure: each seed's lowest accuracy over the last epochs, against the bar.

    python -m research.figures seeds.json [more seeds files ...]   # redraws seeds.png from records
"""
import json
import sys

from artifacts import write_atomic
from rules import LAST_EPOCHS, MIN_ACCURACY as BAR  # the course's bar, set once in rules.py
from summary import png, pyplot


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
    fig, ax = pyplot().subplots(figsize=(8, 1.4 + 0.9 * len(records)))
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
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit("usage: python -m research.figures seeds.json [more seeds files ...]")
    main(sys.argv[1:])
