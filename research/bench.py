"""Side-by-side timings of two ways to train, each a fresh process, alternating, medians reported.

    python -m research.bench                        # on a CUDA GPU: eager (--no-cuda-graph) vs captured steps
    python -m research.bench --compare dataloader   # the default off CUDA: one CPU epoch vs a DataLoader
    python -m research.bench --rounds 3

graph: the full default run (15 epochs, the test set scored after each) with train.py's eager step
loop against the same run with each step replayed from a CUDA graph (steps.py's GraphedSteps).
dataloader: one epoch of train.py's pipeline (data on the device, batched augmentation) against the
pytorch/examples recipe: torchvision transforms per sample (RandomAffine, ToTensor) and a DataLoader.
Both sides train model.py's Net with the same batch size, optimizer, schedule and augmentation ranges.
Each side reports the whole process (start, load MNIST, train, score, write) and its training time
(the `seconds` its metrics.json records: training and the per-epoch evaluation).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import MNIST

import steps
import train
from checks import student_net
from data import DEFAULT_DATA_DIR, DataError, load_mnist
from rules import MAX_EPOCHS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # research.bench runs from here


def dataloader_epoch(args):
    """The baseline, run in its own process by main()."""
    torch.manual_seed(train.SEED)
    a = steps.AUGMENT
    augment = transforms.Compose([
        transforms.RandomAffine(a["degrees"], translate=(a["translate"],) * 2,
                                scale=(1 - a["scale"], 1 + a["scale"])),
        transforms.ToTensor(),
    ])
    train_loader = DataLoader(MNIST(args.data_dir, train=True, transform=augment),
                              batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    test_loader = DataLoader(MNIST(args.data_dir, train=False, transform=transforms.ToTensor()),
                             batch_size=train.EVAL_BATCH_SIZE, num_workers=args.workers)
    model = student_net()()
    recipe = argparse.Namespace(lr=train.LR, schedule="onecycle", epochs=1)  # train.py's, for one epoch
    optimizer, scheduler = steps.make_optimizer(model.parameters(), recipe, len(train_loader))
    start = time.perf_counter()
    model.train()
    for x, y in train_loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test_loader)
    seconds = time.perf_counter() - start
    torch.save(model.state_dict(), os.path.join(args.out, "model.pt"))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"test_accuracy": 100 * correct / len(test_loader.dataset), "seconds": seconds}, f)


def timed(cmd, out):
    """(whole-process seconds, training seconds from the metrics.json it wrote)."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    whole = time.perf_counter() - start
    with open(os.path.join(out, "metrics.json")) as f:
        return whole, json.load(f)["seconds"]


def sides(args, out):
    """{name: command} for the two sides being compared."""
    common = ["--out", out, "--batch-size", str(args.batch_size), "--data-dir", args.data_dir]
    if args.compare == "graph":
        cuda = [sys.executable, train.__file__, "--device", "cuda", *common]
        return {"eager steps (--no-cuda-graph)": cuda + ["--no-cuda-graph"],
                "captured steps (the default)": cuda + ["--cuda-graph"]}
    # --clean-epochs 0: the one epoch augmented, as the DataLoader's is (by default a run's last epochs are not)
    one_epoch = [sys.executable, train.__file__, "--epochs", "1", "--clean-epochs", "0", "--device", "cpu", *common]
    return {"train.py (data on device)": one_epoch,
            f"DataLoader ({args.workers} workers)": [sys.executable, "-m", "research.bench", "--baseline", *common,
                                                      "--workers", str(args.workers)]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--compare", choices=["graph", "dataloader"],
                   default="graph" if torch.cuda.is_available() else "dataloader",
                   help="graph: eager vs captured steps on CUDA; dataloader: one CPU epoch vs a DataLoader")
    positive = train.number(int, lambda v: v > 0, "> 0")
    p.add_argument("--rounds", type=positive, default=2, help="alternating rounds; the table shows medians")
    p.add_argument("--batch-size", type=positive, default=train.BATCH_SIZE, help="same for both sides")
    p.add_argument("--workers", type=train.number(int, lambda v: v >= 0, ">= 0"), default=0,
                   help="DataLoader worker processes")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="MNIST root (holds MNIST/raw/)")
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)  # one baseline epoch
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline:
        return dataloader_epoch(args)
    if args.compare == "graph" and not torch.cuda.is_available():
        p.error("--compare graph needs a CUDA GPU")
    try:
        load_mnist(args.data_dir, train=False, device="cpu")  # one clear line if the data is missing
    except DataError as e:
        sys.exit(f"error: {e}")

    with tempfile.TemporaryDirectory() as out:
        commands = sides(args, out)
        times = {name: [] for name in commands}
        for r in range(args.rounds):
            for name, cmd in commands.items():
                times[name].append(timed(cmd, out))
                print(f"round {r + 1}: {name}: {times[name][-1][0]:.1f} s whole, {times[name][-1][1]:.1f} s training",
                      file=sys.stderr)
    if args.compare == "graph":
        where = f"{torch.cuda.get_device_name()}, the full default run ({MAX_EPOCHS} epochs)"
    else:
        where = (f"CPU, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
                 "one epoch")
    print(f"\n{where}; batch {args.batch_size}; torch {torch.__version__}; medians of {args.rounds} rounds\n")
    print("| path | whole process (s) | training (s) | rounds: whole / training |\n|---|---:|---:|---|")
    medians = {}
    for name, runs in times.items():
        medians[name] = [statistics.median(column) for column in zip(*runs)]
        print(f"| {name} | {medians[name][0]:.1f} | {medians[name][1]:.1f} | "
              f"{', '.join(f'{w:.1f} / {t:.1f}' for w, t in runs)} |")
    (first, a), (second, b) = medians.items()
    print(f"\n{second} / {first}: {b[0] / a[0]:.2f}x the whole process, {b[1] / a[1]:.2f}x the training time")


if __name__ == "__main__":
    main()
