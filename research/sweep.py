"""The size frontier on the held-out split: many candidate nets, many seeds each, on one GPU.

    python -m research.sweep --seeds 32 --out DIR        # every candidate -> DIR/sweep-NAME.json each
    python -m research.sweep --candidates c11-1x1 --seeds 2 --epochs 1 --device cpu --out /tmp   # a dry run

A tiny net leaves a GPU idle between kernel launches, so N seeds of one candidate train as one
network: every conv is grouped, one group per seed, and BatchNorm, SiLU, Dropout, the SGD step and
the weight average all act per channel or per element. Seed k's slice sees only its own images
(its own shuffle and augmentation) and gets only its own gradient, so the N slices are N
independent runs of train.py's recipe (SGD with Nesterov momentum, one-cycle to lr 0.1, batch 128,
augmentation but in the last 3 epochs, the weight average), with other random streams than
train.py's. Each candidate runs in its own process; the held-out split is train.py's --holdout.
"""
import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch
import torch.nn as nn
import torch.nn.functional as F

import artifacts
import steps
import train
from data import DEFAULT_DATA_DIR, DataError, augment, to_float
from research.figures import lowest_last
from research.nets import DROPOUT, MNIST_MEAN, MNIST_STD, params
from research.seeds import spread
from rules import LAST_EPOCHS, MAX_EPOCHS, MIN_ACCURACY

HOLDOUT = 10_000

# name: (channels before the pool, channels after it, head): "3x3" is a 3x3 conv to 10 maps before
# the average pool, "1x1" a 1x1 conv to 10 after it (the same as a bias-free nn.Linear there).
CANDIDATES = {
    "c13-3x3": ((8, 8), (13, 13, 13), "3x3"),   # 5,906: the model before this sweep
    "c13-1x1": ((8, 8), (13, 13, 13), "1x1"),   # 4,866
    "c11-3x3": ((8, 8), (11, 11, 11), "3x3"),   # 4,706
    "c12-1x1": ((8, 8), (12, 12, 12), "1x1"),   # 4,328
    "c10x4-1x1": ((8, 8), (10, 10, 10, 10), "1x1"),  # 4,280, the last conv on a 4x4 map
    "c4-8-12-1x1": ((4, 8), (12, 12, 12), "1x1"),  # 3,996
    "c11-1x1": ((8, 8), (11, 11, 11), "1x1"),   # 3,826
    "c10-1x1": ((8, 8), (10, 10, 10), "1x1"),   # 3,360
    "c9-1x1": ((8, 8), (9, 9, 9), "1x1"),       # 2,930
}


def block(n, c_in, c_out, dropout):
    layers = [nn.Conv2d(n * c_in, n * c_out, 3, groups=n, bias=False), nn.BatchNorm2d(n * c_out), nn.SiLU()]
    return layers + ([nn.Dropout(dropout)] if dropout else [])


class Grouped(nn.Module):
    """n copies of one candidate side by side. Input (B, n, 28, 28): seed k's images in channel k.
    Output (B, n, 10) logits."""

    def __init__(self, n, before, after, head, dropout=DROPOUT):
        super().__init__()
        self.n = n
        layers, c = [], 1
        for width in before:
            layers += block(n, c, width, 0)
            c = width
        layers.append(nn.MaxPool2d(2))
        for width in after:
            layers += block(n, c, width, dropout)
            c = width
        if head == "3x3":
            layers += [nn.Conv2d(n * c, n * 10, 3, groups=n, bias=False), nn.AdaptiveAvgPool2d(1)]
        else:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Conv2d(n * c, n * 10, 1, groups=n, bias=False)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers((x - MNIST_MEAN) / MNIST_STD).view(len(x), self.n, 10)


def params_per_seed(name):
    return params(lambda: Grouped(1, *CANDIDATES[name]))


def run_candidate(name, seeds, epochs, device, data_dir, out):
    """Trains `seeds` seeds of one candidate at once; returns its record, which it also writes to
    out/sweep-NAME.json after every epoch (a run cut short keeps the epochs it finished)."""
    torch.set_num_threads(1)
    torch.backends.cudnn.benchmark = True
    device = torch.device(device)
    args = train.parse_args(["--holdout", str(HOLDOUT), "--epochs", str(epochs), "--device", "cpu",
                             "--data-dir", data_dir])
    train_x, train_y, eval_x, eval_y, _ = train.load_splits(data_dir, device, HOLDOUT)
    torch.manual_seed(0)
    n, batch = seeds, args.batch_size
    model = Grouped(n, *CANDIDATES[name]).to(device)
    average = steps.WeightAverage(model, args.ema)
    optimizer, scheduler = steps.make_optimizer(model.parameters(), args, -(-len(train_y) // batch))
    history, start = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        augmented = epoch <= epochs - args.clean_epochs
        order = torch.argsort(torch.rand(n, len(train_y), device=device), dim=1)  # (n, N): each seed its own
        for idx in order.split(batch, dim=1):                                    # (n, b)
            x = to_float(train_x[idx.reshape(-1)])                                # (n*b, 1, 28, 28)
            if augmented:
                x = augment(x, **steps.AUGMENT)
            x = x.view(n, -1, 28, 28).transpose(0, 1)                             # (b, n, 28, 28)
            y = train_y[idx].transpose(0, 1)                                      # (b, n)
            # The sum over seeds of each seed's mean loss: each slice gets its own run's gradient.
            loss = F.cross_entropy(model(x).reshape(-1, 10), y.reshape(-1)) * n
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            average.update()
        average.model.eval()
        correct = torch.zeros(n, device=device)
        with torch.no_grad():
            for x, y in zip(eval_x.split(train.EVAL_BATCH_SIZE), eval_y.split(train.EVAL_BATCH_SIZE)):
                logits = average.model(to_float(x).expand(-1, n, -1, -1))
                correct += (logits.argmax(2) == y[:, None]).sum(0)
        history.append((100 * correct / len(eval_y)).tolist())
        print(f"{name} epoch {epoch} mean {sum(history[-1]) / n:.3f} {time.perf_counter() - start:.0f}s",
              flush=True)
        record = {"candidate": name, "before_pool": CANDIDATES[name][0], "after_pool": CANDIDATES[name][1],
                  "head": CANDIDATES[name][2], "params": params_per_seed(name), "seeds": n, "epochs": epochs,
                  "split": "val", "holdout": HOLDOUT, "device": torch.cuda.get_device_name(device)
                  if device.type == "cuda" else "cpu", "torch_version": torch.__version__,
                  "seconds": round(time.perf_counter() - start, 1),
                  "runs": [{"val_accuracy": [round(a, 2) for a in accs], "final": round(accs[-1], 2),
                            "lowest_last": round(min(accs[-LAST_EPOCHS:]), 2)} for accs in zip(*history)]}
        artifacts.write_atomic(os.path.join(out, f"sweep-{name}.json"), artifacts.json_bytes(record))
    return record


def summary_row(record):
    finals = [r["final"] for r in record["runs"]]
    mean, sd, held = spread([lowest_last(r) for r in record["runs"]])
    return (f"| {record['candidate']} | {record['params']:,} | {len(finals)} | {sum(finals) / len(finals):.3f} | "
            f"{mean:.3f} | {sd:.3f} | {held} | {record['seconds']:.0f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    positive = train.number(int, lambda v: v > 0, "> 0")
    p.add_argument("--seeds", type=positive, default=32, help="seeds per candidate, trained as one net")
    p.add_argument("--epochs", type=positive, default=MAX_EPOCHS)
    p.add_argument("--jobs", type=positive, default=len(CANDIDATES), help="candidates at a time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--out", type=train.writable_dir, required=True)
    args = p.parse_args()
    try:  # once here, so that the processes find the files extracted, or one line says what is missing
        train.load_splits(args.data_dir, "cpu", HOLDOUT)
    except DataError as e:
        sys.exit(f"error: {e}")
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {name: pool.submit(run_candidate, name, args.seeds, args.epochs, args.device, args.data_dir,
                                     args.out) for name in args.candidates}
        records = []
        for name, future in futures.items():
            try:
                records.append(future.result())
            except Exception as e:  # one failed candidate does not lose the others
                print(f"{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"\n| candidate | params | seeds | final | lowest of last {LAST_EPOCHS} | sd | ≥ {MIN_ACCURACY:.2f} "
          "| seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for record in sorted(records, key=lambda r: -r["params"]):
        print(summary_row(record))


if __name__ == "__main__":
    main()
