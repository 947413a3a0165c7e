"""Trains model.py's Net once per seed and keeps what each seed scored. Run from the repository root:

    python -m research.seeds 1 2 3 --out runs                            # -> runs/seeds.json, seeds.png, a table
    python -m research.seeds $(seq 1 20) --out runs --holdout 10000 --device cpu

The seeds come first; every flag but --out is train.py's (`python train.py --help`), and --seed is
set per seed. seeds.json (no weights) and seeds.png are rewritten after each seed, so a run cut
short keeps the seeds it finished. `python -m research.figures a/seeds.json b/seeds.json` draws several records.
"""
import argparse
import itertools
import os
import signal
import statistics
import sys

import torch

import artifacts
import train
from checks import buildable, student_net
from data import DataError
from research.figures import lowest_last, seeds_png
from rules import LAST_EPOCHS, MIN_ACCURACY

RECORD, PICTURE = "seeds.json", "seeds.png"
# What a record says once about all its seeds (metrics.json's keys); each seed adds its own below.
SHARED = ("params", "epochs", "batch_size", "lr", "schedule", "ema", "augment", "clean_epochs", "device", "amp",
          "cuda_graph", "torch_version", "threads", "cpu_capability", "eval_split", "holdout")


def last_epochs(metrics):
    """A run's final evaluation accuracy and the lowest of its last LAST_EPOCHS epochs."""
    accuracies = [h[f"{metrics['eval_split']}_accuracy"] for h in metrics["history"]]
    return {"final": accuracies[-1], "lowest_last": min(accuracies[-LAST_EPOCHS:])}


def trained(args, device, data, net, params):
    """metrics.json's record of net() trained from scratch with args.seed for args.epochs."""
    run = train.start(args, device, data, net)
    train.train_epochs(run, args, data, args.epochs)
    return train.metrics_of(run, args, device, data[-1], params)


def spread(lows):
    """(mean, standard deviation, how many hold MIN_ACCURACY) of the seeds' lowest late epochs."""
    sd = statistics.stdev(lows) if len(lows) > 1 else 0.0
    return statistics.mean(lows), sd, sum(low >= MIN_ACCURACY for low in lows)


def parse_args(argv):
    """(seeds, train.py's args with --out set to ours)."""
    p = argparse.ArgumentParser(prog="python -m research.seeds", description=__doc__, allow_abbrev=False,
                                usage="%(prog)s SEED [SEED ...] --out DIR [train.py's flags]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=train.writable_dir, required=True, metavar="DIR",
                   help=f"directory for {RECORD} and {PICTURE}")
    seeds = list(itertools.takewhile(str.isdigit, argv))
    ours, rest = p.parse_known_args(argv[len(seeds):])
    if not seeds:
        p.error("give the seeds first: SEED [SEED ...]")
    if any(a.split("=")[0] == "--seed" for a in rest):
        p.error("--seed: the seeds are the numbers before the flags")
    return [int(s) for s in seeds], train.parse_args(rest + ["--out", ours.out])


def save(record, out):
    """seeds.json and seeds.png, swapped in together."""
    artifacts.save_set({os.path.join(out, RECORD): artifacts.json_bytes(record),
                        os.path.join(out, PICTURE): seeds_png([record])})


def report(record, out):
    """The table: each seed's final accuracy, the lowest of its last epochs and its seconds, then the mean."""
    rows, epochs = record["seeds"], record["epochs"]
    print(f"\n{record['eval_split']} accuracy per seed ({record['params']:,} numbers, "
          f"{epochs} epoch{'s' * (epochs != 1)}, {record['device']})")
    print(f"{'seed':>5}{'final':>8}{f'lowest of last {LAST_EPOCHS}':>20}{'seconds':>9}")
    for r in rows:
        print(f"{r['seed']:>5}{r['final']:>8.2f}{lowest_last(r):>20.2f}{r['seconds']:>9.1f}")
    mean, sd, held = spread([lowest_last(r) for r in rows])
    print(f"{'mean':>5}{statistics.mean(r['final'] for r in rows):>8.2f}{mean:>20.3f}  (sd {sd:.3f})")
    print(f"{held} of {len(rows)} seeds hold {MIN_ACCURACY:.2f} in each of the last {LAST_EPOCHS} epochs")
    print(f"wrote {os.path.join(out, RECORD)} and {os.path.join(out, PICTURE)}")


def main(argv=None):
    seeds, args = parse_args(sys.argv[1:] if argv is None else argv)
    net = student_net()
    if problem := buildable(net):
        sys.exit(f"error: {problem}")
    params, _ = train.preflight(net)
    device = train.pick_device(args.device)
    record = None
    with artifacts.stops_handled_by(signal.default_int_handler):  # SIGTERM stops like Ctrl-C
        try:
            data = train.load_splits(args.data_dir, device, args.holdout)
            for seed in seeds:
                print(f"== seed {seed}", flush=True)
                args.seed = seed
                metrics = trained(args, device, data, net, params)
                if record is None:
                    record = {k: metrics[k] for k in SHARED}
                    if device.type == "cuda":
                        record["device_name"] = torch.cuda.get_device_name(device)
                    record["seeds"] = []
                record["seeds"].append({"seed": seed, **last_epochs(metrics), "params": params,
                                        "seconds": metrics["seconds"], "history": metrics["history"]})
                save(record, args.out)
        except DataError as e:
            sys.exit(f"error: {e}")
        except KeyboardInterrupt:
            if record is None:
                sys.exit("interrupted before the first seed finished: nothing was written")
            report(record, args.out)
            done = len(record["seeds"])
            sys.exit(f"interrupted: {RECORD} and {PICTURE} hold the {done} seed{'s' * (done != 1)} finished")
    report(record, args.out)


if __name__ == "__main__":
    main()
