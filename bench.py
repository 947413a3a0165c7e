"""Whole-process time for one epoch: train.py's on-device pipeline vs. a standard DataLoader one.

    python bench.py                 # both pipelines, alternating, 2 rounds; prints a table
    python bench.py --rounds 3 --batch-size 128

Each side is a fresh process that loads MNIST, trains the same Net for one epoch with the same
batch size, optimizer, schedule and augmentation ranges, scores the test set and writes its
weights and metrics. The DataLoader side is the pytorch/examples recipe: torchvision transforms
per sample (RandomAffine, ToTensor), batches from a DataLoader.
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

import train
from data import DEFAULT_DATA_DIR, DataError, load_mnist
from model import Net


def dataloader_epoch(args):
    """The baseline, run in its own process by main()."""
    torch.manual_seed(train.SEED)
    a = train.AUGMENT
    augment = transforms.Compose([
        transforms.RandomAffine(a["degrees"], translate=(a["translate"],) * 2,
                                scale=(1 - a["scale"], 1 + a["scale"])),
        transforms.ToTensor(),
    ])
    train_loader = DataLoader(MNIST(args.data_dir, train=True, transform=augment),
                              batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    test_loader = DataLoader(MNIST(args.data_dir, train=False, transform=transforms.ToTensor()),
                             batch_size=train.EVAL_BATCH_SIZE, num_workers=args.workers)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=train.LR, momentum=train.MOMENTUM,
                                nesterov=True, weight_decay=train.WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train.LR, epochs=1,
                                                    steps_per_epoch=len(train_loader))
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
    torch.save(model.state_dict(), os.path.join(args.out, "model.pt"))
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"test_accuracy": 100 * correct / len(test_loader.dataset)}, f)


def timed(cmd):
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=train.positive(int), default=2, help="alternating rounds; the table shows medians")
    p.add_argument("--batch-size", type=train.positive(int), default=train.BATCH_SIZE, help="same for both sides")
    p.add_argument("--workers", type=train.number(int, lambda v: v >= 0, ">= 0"), default=0,
                   help="DataLoader worker processes")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="MNIST root (holds MNIST/raw/)")
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)  # one baseline epoch
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline:
        return dataloader_epoch(args)
    try:
        load_mnist(args.data_dir, train=False, device="cpu")  # one clear line if the data is missing
    except DataError as e:
        sys.exit(f"error: {e}")

    sides = {"train.py (data on device)": [], f"DataLoader ({args.workers} workers)": []}
    with tempfile.TemporaryDirectory() as out:
        commands = [
            [sys.executable, train.__file__, "--epochs", "1", "--device", "cpu", "--out", out,
             "--batch-size", str(args.batch_size), "--data-dir", args.data_dir],
            [sys.executable, __file__, "--baseline", "--out", out, "--batch-size", str(args.batch_size),
             "--workers", str(args.workers), "--data-dir", args.data_dir],
        ]
        for r in range(args.rounds):
            for times, cmd in zip(sides.values(), commands):
                times.append(timed(cmd))
                print(f"round {r + 1}: {times[-1]:.1f}s  {cmd[1]}", file=sys.stderr)
    ours, baseline = (statistics.median(t) for t in sides.values())
    print(f"\none epoch, whole process (load, train, test, write); batch {args.batch_size}, CPU, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}\n")
    print(f"| pipeline | seconds (median of {args.rounds}) | rounds |\n|---|---:|---|")
    for name, times in sides.items():
        print(f"| {name} | {statistics.median(times):.1f} | {', '.join(f'{t:.1f}' for t in times)} |")
    print(f"\nspeed-up: {baseline / ours:.1f}x")


if __name__ == "__main__":
    main()
