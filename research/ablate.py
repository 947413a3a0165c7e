"""Ablations and frontier rows on a held-out split of the training set: each row changes one thing
from the defaults, the recipe's or the net's. Run from the repository root:

    python -m research.ablate --out DIR           # the recipe's rows, seed 1 -> DIR/ablation.json and a table
    python -m research.ablate --seeds 1 2 --rows default no-augment --out DIR --record rows.json

Every run trains on the first 50,000 training images and is scored on the last 10,000 (`--holdout`),
half of them from writers the first 50,000 hardly show, so the test set plays no part in these
choices. Two runs go at a time, one CPU thread each: on a small net that gets more done per second
than one run on two threads. The record is rewritten as each run finishes.
"""
import argparse
import copy
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

import torch
import torch.nn as nn

import artifacts
import train
from data import DEFAULT_DATA_DIR
from research.nets import params, plain, separable
from research.seeds import last_epochs, trained
from rules import LAST_EPOCHS, MAX_EPOCHS

HOLDOUT = 10_000
DEFAULT = plain((8, 8), (12, 12, 12), "3x3")  # model.py's Net, layer for layer (5,288 parameters)
SEP24 = separable((8, 8), (24,) * 4, "1x1")  # 3,752 parameters: the net the search under 4,000 centres on


def replace_modules(model, kind, make):
    """Swaps each submodule of type `kind` for make(old), in place, and returns model. A replacement
    is not searched again, so it may wrap the module it replaces."""
    for name, child in model.named_children():
        if isinstance(child, kind):
            setattr(model, name, make(child))
        else:
            replace_modules(child, kind, make)
    return model


def swapped(kind, make):
    """The default net with each `kind` module replaced by make(old): same places, same initial weights."""
    return lambda: replace_modules(DEFAULT(), kind, make)


def sized(description, build):
    return f"{description}, {params(build):,} parameters"


# key: (what changes, extra train.py flags, zero-argument net builder)
ROWS = {
    "default": ("nothing (the defaults)", [], DEFAULT),
    "relu": ("ReLU instead of SiLU", [], swapped(nn.SiLU, lambda _: nn.ReLU())),
    "no-ema": ("raw weights instead of their moving average", ["--ema", "0"], DEFAULT),
    "no-augment": ("no augmentation", ["--no-augment"], DEFAULT),
    "dropout-0.10": ("dropout 0.10", [], swapped(nn.Dropout, lambda _: nn.Dropout(0.10))),
    "dropout2d": ("channel dropout (Dropout2d), same places", [], swapped(nn.Dropout, lambda d: nn.Dropout2d(d.p))),
    "step": ("step schedule (x0.1 at 50% and 75%)", ["--schedule", "step"], DEFAULT),
    "batch-x2": (f"batch {train.BATCH_SIZE * 2}", ["--batch-size", str(train.BATCH_SIZE * 2)], DEFAULT),
    "batch-x4": (f"batch {train.BATCH_SIZE * 4}", ["--batch-size", str(train.BATCH_SIZE * 4)], DEFAULT),
}
# The size frontier's rows (research/README.md): other nets, same recipe unless the flags say otherwise.
FRONTIER = {
    "width-13": ("8-8 / pool / 13-13-13, 3x3 head", [], plain((8, 8), (13, 13, 13), "3x3")),
    "width-12": ("8-8 / pool / 12-12-12, 3x3 head (the default)", [], DEFAULT),
    "width-12-b64": ("8-8 / pool / 12-12-12, 3x3 head (the default), batch 64", ["--batch-size", "64"], DEFAULT),
    "depth-4x10": ("8-8 / pool / 10-10-10-10, 3x3 head", [], plain((8, 8), (10, 10, 10, 10), "3x3")),
    "first-4-8": ("4-8 / pool / 12-12-12, 3x3 head", [], plain((4, 8), (12, 12, 12), "3x3")),
    "c11-1x1-b64": ("8-8 / pool / 11-11-11, 1x1 head, batch 64", ["--batch-size", "64"],
                    plain((8, 8), (11, 11, 11), "1x1")),
    "sep-24x4-1x1": ("8-8 / pool / separable 24-24-24-24, 1x1 head", [], SEP24),
    "sep-24x4-1x1-b64": ("8-8 / pool / separable 24-24-24-24, 1x1 head, batch 64", ["--batch-size", "64"], SEP24),
    "sep-24x4-1x1-b32": ("8-8 / pool / separable 24-24-24-24, 1x1 head, batch 32", ["--batch-size", "32"], SEP24),
    "sep-20x5-1x1-b64": ("8-8 / pool / separable 20-20-20-20-20, 1x1 head, batch 64", ["--batch-size", "64"],
                         separable((8, 8), (20,) * 5, "1x1")),
    "sep-25x4-1x1-b64": ("8-8 / pool / separable 25-25-25-25, 1x1 head, batch 64", ["--batch-size", "64"],
                         separable((8, 8), (25,) * 4, "1x1")),
    "sep-24x4-1x1-b64-lr0.05": ("8-8 / pool / separable 24-24-24-24, 1x1 head, batch 64, peak learning rate 0.05",
                                ["--batch-size", "64", "--lr", "0.05"], SEP24),
    "sep-24x4-1x1-b64-lr0.2": ("8-8 / pool / separable 24-24-24-24, 1x1 head, batch 64, peak learning rate 0.2",
                               ["--batch-size", "64", "--lr", "0.2"], SEP24),
    "sep-24x4-1x1-b64-ema": ("8-8 / pool / separable 24-24-24-24, 1x1 head, batch 64, weight average 0.9975",
                             ["--batch-size", "64", "--ema", "0.9975"], SEP24),
    "sep-24x4-pad-pool-b64": ("8-8 / pool / separable 24-24, padded / pool / separable 24-24, padded, 1x1 head, "
                              "batch 64", ["--batch-size", "64"],
                              separable((8, 8), (24, 24, "pool", 24, 24), "1x1", padding=1)),
    "sep-28x3-sep3x3": ("8-8 / pool / separable 28-28-28, separable 3x3 head", [],
                        separable((8, 8), (28,) * 3, "sep3x3")),
    "sep-20x3-sep3x3": ("8-8 / pool / separable 20-20-20, separable 3x3 head", [],
                        separable((8, 8), (20,) * 3, "sep3x3")),
    "sep-32x3-sep3x3": ("8-8 / pool / separable 32-32-32, separable 3x3 head", [],
                        separable((8, 8), (32,) * 3, "sep3x3")),
}
RECIPE_ROWS = list(ROWS)  # what a plain `python -m research.ablate` runs; the frontier rows take hours
ROWS.update({name: (sized(what, build), flags, build) for name, (what, flags, build) in FRONTIER.items()})


# Rows that change only the last epochs. Each forks from the default run at the first epoch where
# they differ, with the same weights, optimizer state and random numbers: the epochs before are the
# same run, trained once, and the comparison is paired.
TAIL_ROWS = {
    "augment-all": (f"augmentation in every epoch, the last {train.CLEAN_EPOCHS} too", ["--clean-epochs", "0"]),
}


def row_args(flags, seed, data_dir, epochs):
    return train.parse_args(flags + ["--holdout", str(HOLDOUT), "--seed", str(seed), "--device", "cpu",
                                     "--data-dir", data_dir, "--epochs", str(epochs)])


def result(name, seed, flags, metrics):
    return {"row": name, "seed": seed, "flags": flags, **last_epochs(metrics), "seconds": metrics["seconds"]}


def run_row(name, seed, data_dir, epochs):
    torch.set_num_threads(1)
    _, flags, build = ROWS[name]
    args = row_args(flags, seed, data_dir, epochs)
    device = torch.device("cpu")
    data = train.load_splits(args.data_dir, device, args.holdout)
    return [result(name, seed, flags, trained(args, device, data, build, params(build)))]


def run_forked(names, seed, data_dir, epochs):
    """The default row and the tail rows `names` on one seed: one run up to the fork, then each row
    continues from its own copy, with the random number generator reset to the fork's state."""
    torch.set_num_threads(1)
    flags = {"default": ROWS["default"][1], **{name: TAIL_ROWS[name][1] for name in names}}
    variants = {name: row_args(f, seed, data_dir, epochs) for name, f in flags.items()}
    base = variants["default"]
    fork = min(a.epochs - a.clean_epochs for a in variants.values())
    device = torch.device("cpu")
    data = train.load_splits(base.data_dir, device, base.holdout)
    state = train.start(base, device, data, DEFAULT)
    train.train_epochs(state, base, data, fork)
    rng, count = torch.get_rng_state(), params(DEFAULT)
    results = []
    for name, args in variants.items():
        torch.set_rng_state(rng)
        branch = copy.deepcopy(state)
        train.train_epochs(branch, args, data, args.epochs)
        results.append(result(name, seed, flags[name], train.metrics_of(branch, args, device, data[-1], count)))
    return results


def main():
    p = argparse.ArgumentParser(description="Ablations and frontier rows on a held-out split.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=[*ROWS, *TAIL_ROWS], default=[*RECIPE_ROWS, *TAIL_ROWS], metavar="ROW",
                   help=f"rows to run: {', '.join([*ROWS, *TAIL_ROWS])}")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="seeds per row")
    positive = train.number(int, lambda v: v > 0, "> 0")
    p.add_argument("--epochs", type=positive, default=MAX_EPOCHS, help="epochs a run (fewer: a dry run)")
    p.add_argument("--jobs", type=positive, default=2, help="runs at a time")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="MNIST root (holds MNIST/raw/)")
    p.add_argument("--out", type=train.writable_dir, required=True, help="directory for the record")
    p.add_argument("--record", default="ablation.json", help="the record's file name in --out")
    args = p.parse_args()

    tails = [row for row in args.rows if row in TAIL_ROWS]
    path = os.path.join(args.out, args.record)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_forked, tails, seed, args.data_dir, args.epochs) for seed in args.seeds
                   if "default" in args.rows or tails]
        futures += [pool.submit(run_row, row, seed, args.data_dir, args.epochs) for row in args.rows
                    if row in ROWS and row != "default" for seed in args.seeds]
        results = []
        for future in as_completed(futures):
            results += future.result()
            record = {"holdout": HOLDOUT, "device": "cpu", "threads_per_run": 1, "torch_version": torch.__version__,
                      "runs": results}
            artifacts.write_atomic(path, artifacts.json_bytes(record))

    print(f"\n| change from the defaults | held-out accuracy, final | lowest of last {LAST_EPOCHS} | s/run |")
    print("|---|---:|---:|---:|")
    for row in dict.fromkeys(["default", *args.rows] if tails else args.rows):
        runs = [r for r in results if r["row"] == row]
        final, low, seconds = (sum(r[key] for r in runs) / len(runs) for key in ("final", "lowest_last", "seconds"))
        print(f"| {({**ROWS, **TAIL_ROWS})[row][0]} | {final:.2f} | {low:.2f} | {seconds:.0f} |")
    print(f"\nwrote {path} ({len(args.seeds)} seed(s) per row, {HOLDOUT:,} held-out images)")


if __name__ == "__main__":
    main()
