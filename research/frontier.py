"""The size frontier, every family: one screening table and one picture from the records. Run from
the repository root:

    python -m research.frontier        # prints the table; writes research/records/frontier.png

Rows come from the GPU sweep (records/frontier.json, research.sweep: 24 seeds a candidate on an
H200) and from research.ablate's CPU records (records/*.json with "runs"), one row per row name and
record. All are scored on the held-out split. Each row is compared, unpaired, with the reference
of its device: on the CPU the default (width-12, 5,288 parameters), on the GPU the 5,906-parameter
net the sweep was run against (no GPU record of the default exists).
"""
import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import StrMethodFormatter

from artifacts import write_atomic
from research.figures import lowest_last
from summary import png
from research.ablate import ROWS
from research.nets import params
from research.seeds import spread
from rules import LAST_EPOCHS, MIN_ACCURACY

RECORDS = Path(__file__).parent / "records"
SWEEP = "frontier.json"
# Which CPU row belongs to which family; clean-epochs.json's "clean-3" row is the 13-channel net.
FAMILY = {
    "width-13": "plain, 3×3 head", "clean-3": "plain, 3×3 head", "width-12": "plain, 3×3 head",
    "width-12-b64": "plain, 3×3 head, batch 64",
    "depth-4x10": "plain, 3×3 head", "first-4-8": "plain, 3×3 head",
    "c11-1x1-b64": "plain, 1×1 head, batch 64",
    "sep-24x4-1x1": "separable, 1×1 head", "sep-24x4-1x1-b64": "separable, 1×1 head, batch 64",
    "sep-28x3-sep3x3": "separable, separable 3×3 head", "sep-20x3-sep3x3": "separable, separable 3×3 head",
    "sep-32x3-sep3x3": "separable, separable 3×3 head",
    "sep-24x4-1x1-b32": "separable, 1×1 head, batch 32",
    "sep-20x5-1x1-b64": "separable, 1×1 head, batch 64",
    "sep-25x4-1x1-b64": "separable, 1×1 head, batch 64",
    "sep-24x4-1x1-b64-lr0.05": "separable, 1×1 head, batch 64, peak lr 0.05",
    "sep-24x4-1x1-b64-lr0.2": "separable, 1×1 head, batch 64, peak lr 0.2",
    "sep-24x4-1x1-b64-ema": "separable, 1×1 head, batch 64, average 0.9975",
    "sep-24x4-pad-pool-b64": "separable, padded, two pools, 1×1 head, batch 64",
}
SAME_NET = {"clean-3": "width-13"}
REFERENCE = {"CPU": "width-12", "H200": "c13-3x3"}


def summarise(name, family, device, net_params, lows):
    mean, sd, hold = spread(lows)
    return {"candidate": name, "family": family, "device": device, "params": net_params, "seeds": len(lows),
            "mean": mean, "sd": sd, "hold": hold}


def rows():
    """Every candidate of every record, summarised."""
    found = []
    sweep = json.loads((RECORDS / SWEEP).read_text())
    for c in sweep["candidates"]:
        family = f"plain, {c['head'].replace('x', '×')} head"
        lows = [lowest_last(r) for r in c["runs"]] if c.get("runs") else None
        row = summarise(c["candidate"], family, "H200", c["params"], lows or [c["mean_min_last_3"]])
        if not lows:  # only the summary came back from the GPU machine
            row.update(seeds=c["seeds"], sd=c["sd_min_last_3"], hold=c["hold"])
        found.append(row)
    lows, records = {}, {}  # a row's seeds may sit in several records (runs split over processes)
    for path in sorted(RECORDS.glob("*.json")):
        record = json.loads(path.read_text())
        if path.name == SWEEP or "runs" not in record:
            continue
        for run in record["runs"]:
            if run["row"] in FAMILY:  # not an ablation of the recipe
                lows.setdefault(run["row"], []).append(lowest_last(run))
                records.setdefault(run["row"], {})[path.name] = None
    for name, values in lows.items():
        net = SAME_NET.get(name, name)
        found.append(summarise(net, FAMILY[name], "CPU", params(ROWS[net][2]), values) |
                     {"record": ", ".join(records[name])})
    return found


def compared(found):
    """Each row with its difference from its device's reference and that difference's standard error."""
    for row in found:
        ref = next(r for r in found if r["device"] == row["device"] and r["candidate"] == REFERENCE[row["device"]])
        row["diff"] = row["mean"] - ref["mean"]
        row["se"] = math.sqrt(row["sd"] ** 2 / row["seeds"] + ref["sd"] ** 2 / ref["seeds"]) if row is not ref else 0.0
    return found


def table(found):
    lines = [f"| candidate | family | params | device, record | seeds | min of last {LAST_EPOCHS}, mean (sd) | hold | "
             "against the reference |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in sorted(found, key=lambda r: (r["device"], -r["params"])):
        spread = f"{r['sd']:.3f}" if r["seeds"] > 1 else "–"
        versus = "reference" if r["se"] == 0 else f"{r['diff']:+.3f}" + (f" ± {r['se']:.3f}" if r["seeds"] > 1 else
                                                                          " (one seed, no spread)")
        lines.append(f"| {r['candidate']} | {r['family']} | {r['params']:,} | {r['device']}, {r.get('record', SWEEP)} | {r['seeds']} | "
                     f"{r['mean']:.3f} ({spread}) | {r['hold']} | {versus} |")
    return "\n".join(lines)


def draw(found, path):
    """Per family and device, a line over parameter counts: the share of seeds that hold the bar,
    and the mean min of the last LAST_EPOCHS epochs with one standard error."""
    fig, (ax_hold, ax_mean) = plt.subplots(1, 2, figsize=(13, 5))
    groups = {}
    for r in found:
        groups.setdefault((r["family"], r["device"]), []).append(r)
    for (family, device), group in sorted(groups.items()):
        group = sorted(group, key=lambda r: r["params"])
        x = [r["params"] for r in group]
        style = dict(linestyle="--" if device == "H200" else "-", marker="o" if device == "H200" else "s",
                     label=f"{family} ({device})")
        (line,) = ax_hold.plot(x, [100 * r["hold"] / r["seeds"] for r in group], **style)
        ax_mean.errorbar(x, [r["mean"] for r in group], yerr=[r["sd"] / math.sqrt(r["seeds"]) for r in group],
                         capsize=3, color=line.get_color(), **style)
    ax_hold.set(title=f"seeds holding {MIN_ACCURACY:.2f} in each of the last {LAST_EPOCHS} epochs (%)", ylim=(-5, 105))
    ax_mean.axhline(MIN_ACCURACY, color="gray", linewidth=1, linestyle=":")
    ax_mean.set(title=f"mean min of the last {LAST_EPOCHS} epochs (%), ± 1 standard error")
    for ax in (ax_hold, ax_mean):
        ax.axvline(4000, color="gray", linewidth=1, linestyle=":")
        ax.set_xlabel("parameters")
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        ax.grid(alpha=0.3)
    ax_mean.legend(fontsize=8, loc="lower right")
    fig.suptitle("The size frontier on the held-out split (CPU rows: research.ablate, one thread a run; "
                 "H200 rows: research.sweep, 24 seeds each)", fontsize=10)
    write_atomic(path, png(fig))


def main():
    argparse.ArgumentParser(description="The size frontier of every family, from the records in research/records: "
                                        "a screening table, and records/frontier.png.").parse_args()
    found = compared(rows())
    print(table(found))
    draw(found, RECORDS / "frontier.png")
    print(f"\nwrote {RECORDS / 'frontier.png'}")


if __name__ == "__main__":
    main()
