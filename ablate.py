"""Ablations on a held-out split of the training set: each row changes one thing from the defaults.

    python ablate.py --out DIR                # every row, seed 1 -> DIR/ablation.json and a table
    python ablate.py --seeds 1 2 --rows default no-augment --out DIR

Every run trains on the first 50,000 training images and is scored on the last 10,000 (`--holdout`),
half of them from writers the first 50,000 hardly show, so the test set plays no part in these
choices. Two runs go at a time, one CPU thread each: on a small net that gets more done per second
than one run on two threads.
"""
import argparse
import copy
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
import torch.nn as nn

import train
from cli import positive, writable_dir
from model import DROPOUT, Net, conv_block

HOLDOUT = 10_000


def replace_modules(model, kind, make):
    """Swaps each submodule of type `kind` for make(old), in place, and returns model. A replacement
    is not searched again, so it may wrap the module it replaces."""
    for name, child in model.named_children():
        if isinstance(child, kind):
            setattr(model, name, make(child))
        else:
            replace_modules(child, kind, make)
    return model


def channel_dropout_net(args):
    """Same places, but Dropout2d: each draw drops a whole feature map instead of single pixels."""
    return replace_modules(Net(), nn.Dropout, lambda d: nn.Dropout2d(d.p))


def relu_net(args):
    """Same net and initial weights (ReLU has no parameters), with ReLU in place of SiLU."""
    return replace_modules(Net(), nn.SiLU, lambda _: nn.ReLU())


def frontier_net(before, after):
    """Net with other widths: `before` gives the two convs before the pool, `after` the convs after
    it (any number), and a 3x3 head follows the last. A point of the size frontier between its GPU
    rows (DESIGN.md). Its initial weights come from another stretch of the random stream than a
    standalone class draws."""
    def build(args):
        net = Net()
        net.conv1, net.conv2 = conv_block(1, before[0]), conv_block(*before)
        blocks = [conv_block(c_in, c_out, DROPOUT) for c_in, c_out in zip((before[-1], *after), after)]
        net.conv3, net.conv4, net.conv5 = blocks[0], blocks[1], nn.Sequential(*blocks[2:])
        net.head = nn.Conv2d(after[-1], 10, 3, bias=False)
        return net
    return build


def dropout_net(p):
    """Same net and initial weights, dropout p in the same places."""
    return lambda args: replace_modules(Net(), nn.Dropout, lambda _: nn.Dropout(p))


# key: (what changes, extra train.py flags, model builder or None for the default Net)
ROWS = {
    "default": ("nothing (the defaults)", [], None),
    "relu": ("ReLU instead of SiLU", [], relu_net),
    "no-ema": ("raw weights instead of their moving average", ["--ema", "0"], None),
    "no-augment": ("no augmentation", ["--no-augment"], None),
    "dropout-0.10": ("dropout 0.10", [], dropout_net(0.10)),
    "dropout2d": ("channel dropout (Dropout2d), same places", [], channel_dropout_net),
    "step": ("step schedule (x0.1 at 50% and 75%)", ["--schedule", "step"], None),
    "batch-x2": (f"batch {train.BATCH_SIZE * 2}", ["--batch-size", str(train.BATCH_SIZE * 2)], None),
    "batch-x4": (f"batch {train.BATCH_SIZE * 4}", ["--batch-size", str(train.BATCH_SIZE * 4)], None),
    "width-13": ("13 channels after the pool, 5,906 parameters (the default before)", [],
                 frontier_net((8, 8), (13, 13, 13))),
    "depth-4x10": ("4 convolutions of 10 channels after the pool, 5,080 parameters", [],
                   frontier_net((8, 8), (10, 10, 10, 10))),
    "first-4-8": ("4 then 8 channels before the pool, 4,956 parameters", [], frontier_net((4, 8), (12, 12, 12))),
}


# Rows that change only the last epochs. Each forks from the default run at the first epoch where
# they differ, with the same weights, optimizer state and random numbers: the epochs before are the
# same run, trained once, and the comparison is paired.
TAIL_ROWS = {
    "augment-all": ("augmentation in every epoch, the last 3 too", ["--clean-epochs", "0"]),
}


def row_args(flags, seed, data_dir):
    return train.parse_args(flags + ["--holdout", str(HOLDOUT), "--seed", str(seed), "--device", "cpu",
                                     "--data-dir", data_dir])


def result(name, seed, flags, metrics):
    return {"row": name, "seed": seed, "flags": flags, **train.last_epochs(metrics), "seconds": metrics["seconds"]}


def run_row(name, seed, data_dir):
    torch.set_num_threads(1)
    _, flags, build = ROWS[name]
    args = row_args(flags, seed, data_dir)
    device = torch.device("cpu")
    data = train.load_splits(args.data_dir, device, args.holdout)
    _, metrics = train.run(args, device, data, build)
    return [result(name, seed, flags, metrics)]


def run_forked(names, seed, data_dir):
    """The default row and the tail rows `names` on one seed: one run up to the fork, then each row
    continues from its own copy, with the random number generator reset to the fork's state."""
    torch.set_num_threads(1)
    flags = {"default": ROWS["default"][1], **{name: TAIL_ROWS[name][1] for name in names}}
    variants = {name: row_args(f, seed, data_dir) for name, f in flags.items()}
    base = variants["default"]
    fork = min(a.epochs - a.clean_epochs for a in variants.values())
    device = torch.device("cpu")
    data = train.load_splits(base.data_dir, device, base.holdout)
    state = train.start(base, device, data)
    train.train_epochs(state, base, data, fork)
    rng = torch.get_rng_state()
    results = []
    for name, args in variants.items():
        torch.set_rng_state(rng)
        branch = copy.deepcopy(state)
        train.train_epochs(branch, args, data, args.epochs)
        results.append(result(name, seed, flags[name], train.metrics_of(branch, args, device, data[-1])))
    return results


def main():
    p = argparse.ArgumentParser(description="Ablations on a held-out split.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=[*ROWS, *TAIL_ROWS], default=[*ROWS, *TAIL_ROWS], metavar="ROW",
                   help=f"rows to run: {', '.join([*ROWS, *TAIL_ROWS])}")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="seeds per row")
    p.add_argument("--jobs", type=positive(int), default=2, help="runs at a time")
    p.add_argument("--data-dir", default=train.DEFAULT_DATA_DIR, help="MNIST root (holds MNIST/raw/)")
    p.add_argument("--out", type=writable_dir, required=True,
                   help="directory for ablation.json (the committed one records an older recipe)")
    args = p.parse_args()

    tails = [row for row in args.rows if row in TAIL_ROWS]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_forked, tails, seed, args.data_dir) for seed in args.seeds
                   if "default" in args.rows or tails]
        futures += [pool.submit(run_row, row, seed, args.data_dir) for row in args.rows
                    if row in ROWS and row != "default" for seed in args.seeds]
        results = [r for f in futures for r in f.result()]
    path = os.path.join(args.out, "ablation.json")
    train.save_json({"holdout": HOLDOUT, "device": "cpu", "threads_per_run": 1, "torch_version": torch.__version__,
                     "runs": results}, path)

    print("\n| change from the defaults | held-out accuracy, final | min of last 3 | s/run |")
    print("|---|---:|---:|---:|")
    for row in dict.fromkeys(["default", *args.rows] if tails else args.rows):
        runs = [r for r in results if r["row"] == row]
        final, low, seconds = (sum(r[key] for r in runs) / len(runs) for key in ("final", "min_last_3", "seconds"))
        print(f"| {({**ROWS, **TAIL_ROWS})[row][0]} | {final:.2f} | {low:.2f} | {seconds:.0f} |")
    print(f"\nwrote {path} ({len(args.seeds)} seed(s) per row, {HOLDOUT:,} held-out images)")


if __name__ == "__main__":
    main()
