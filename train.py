"""Train model.py's Net on MNIST and write model.pt, metrics.json and curves.png.

    python train.py                              # the course's full run -> model.pt, metrics.json, curves.png
    python train.py --epochs 1                   # a quick look; the gate judges only a full run
    python train.py --holdout 10000 --out /tmp   # score the last 10k training images instead of the test set

It trains whatever `Net()` model.py defines, built with no arguments, on CUDA, Apple MPS or the CPU.
The whole dataset sits on the device as one uint8 tensor; each step slices a shuffled batch and
augments it there (data.py), and the step itself is steps.py's (on CUDA, replayed from a captured
graph). What is evaluated after each epoch and saved is a moving average of the weights.
"""
import argparse
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

import artifacts
import steps
from checks import Refusal, Unusable, buildable, check_architecture, shortfall, student_net
from data import DEFAULT_DATA_DIR, DataError, load_mnist, to_float
from measure import count_numbers
from rules import LAST_EPOCHS, MAX_EPOCHS, MIN_ACCURACY, PARAMS_BELOW
from summary import curves_png, tables, write_readme

# The recipe. Each is a flag below; momentum, weight decay and the augmentation's ranges are steps.py's.
BATCH_SIZE = 128
LR = 0.1             # peak learning rate of the one-cycle schedule (SGD, Nesterov momentum)
CLEAN_EPOCHS = 3     # the last 3 epochs train on the images as they are, without augmentation
EMA = 0.995          # decay of the weight average that is evaluated and saved (0: the raw weights)
SEED = 1
EVAL_BATCH_SIZE = 2000
PROGRESS_EVERY_S = 10  # without a terminal, one progress line per 10 s
HERE = os.path.dirname(os.path.abspath(__file__))  # where the gate reads model.pt and metrics.json


@dataclass
class Run:
    """A run in progress: the model, its weight average, the steps that train it, what has happened."""
    model: torch.nn.Module
    average: steps.WeightAverage | None
    steps: steps.EagerSteps | steps.GraphedSteps
    epoch: int = 0
    history: list = field(default_factory=list)
    weights: dict = field(default_factory=dict)  # {epoch: CPU state_dict} of the last LAST_EPOCHS epochs

    @property
    def scored(self):  # what is evaluated and saved
        return self.average.model if self.average is not None else self.model


def start(args, device, data, net):
    """A fresh run of net(), seeded with args.seed, before its first epoch. A run forks by deepcopy
    with the RNG state (research/ablate.py does); a captured CUDA graph cannot be copied."""
    torch.manual_seed(args.seed)  # before the model exists: the seed fixes its initial weights too
    model = net().to(device)
    first_forward(model, device)
    average = steps.WeightAverage(model, args.ema) if args.ema else None
    amp_dtype = torch.bfloat16 if args.amp == "on" else None
    try:
        return Run(model, average, steps.make_steps(model, average, data[0], data[1], args, amp_dtype))
    except steps.CaptureError as e:  # forward reads a value back to the host, say: start again, eagerly
        print(f"warning: {e}; training with the eager loop instead (--no-cuda-graph skips the attempt)",
              file=sys.stderr)
        return start(argparse.Namespace(**{**vars(args), "cuda_graph": False}), device, data, net)


def first_forward(model, device):
    """A lazy layer (nn.LazyLinear) makes its weights in its first forward pass, and the optimizer
    and the weight average must hold them: one pass in eval mode (BatchNorm's statistics stay), on
    a forked random stream (the run draws the same numbers as without it)."""
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        model.eval()(torch.zeros(2, 1, 28, 28, device=device))
    model.train()


def progress(batches, desc):
    """A progress bar over an epoch's batches; without a terminal (Colab, a CI log) a line every
    PROGRESS_EVERY_S seconds, since a small machine's epoch takes minutes and silence looks like a hang."""
    terminal = sys.stderr.isatty()
    return tqdm(batches, desc=desc, leave=False, unit="batch", ascii=not terminal,
                mininterval=0.1 if terminal else PROGRESS_EVERY_S)


def train_epochs(run, args, data, until):
    """Trains run on to epoch `until`, evaluating what is saved after each epoch."""
    _, _, eval_x, eval_y, split = data
    for epoch in range(run.epoch + 1, until + 1):
        began, lr = time.perf_counter(), run.steps.lr()
        augmented = args.augment and epoch <= args.epochs - args.clean_epochs
        train_loss, train_acc = run.steps.epoch(augmented, lambda batches: progress(batches, f"epoch {epoch}/{args.epochs}"))
        eval_loss, eval_acc = evaluate(run.scored, eval_x, eval_y)
        seconds = time.perf_counter() - began
        run.history.append({"epoch": epoch, "lr": round(lr, 6), "augmented": augmented,
                            "train_loss": round(train_loss, 4), "train_accuracy": round(train_acc, 2),
                            f"{split}_loss": round(eval_loss, 4), f"{split}_accuracy": round(eval_acc, 2),
                            "seconds": round(seconds, 2)})
        left = sum(h["seconds"] for h in run.history) / len(run.history) * (args.epochs - epoch)
        print(f"epoch {epoch:2d}/{args.epochs}  lr {lr:.4f}  train loss {train_loss:.4f} acc {train_acc:.2f}  "
              f"{split} loss {eval_loss:.4f} acc {eval_acc:.2f}  {seconds:.1f}s, about {left:.0f}s left", flush=True)
        run.weights[epoch] = {k: v.detach().to("cpu", copy=True) for k, v in run.scored.state_dict().items()}
        run.weights.pop(epoch - LAST_EPOCHS, None)
        run.epoch = epoch


@torch.no_grad()
def evaluate(model, images, labels):
    """Returns (mean loss, accuracy %) over the whole set, in float32."""
    model.eval()
    loss_sum = torch.zeros((), device=labels.device)
    correct = torch.zeros((), device=labels.device, dtype=torch.long)
    for x, y in zip(images.split(EVAL_BATCH_SIZE), labels.split(EVAL_BATCH_SIZE)):
        logits = model(to_float(x))
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / len(labels), 100 * correct.item() / len(labels)


def load_splits(data_dir, device, holdout):
    """(train images, train labels, eval images, eval labels, eval split name). The held-out images
    are the last `holdout` of the training file: half of them from writers the rest hardly shows, as
    the test set's writers are all new (research/README.md: held-out writers)."""
    images, labels = load_mnist(data_dir, train=True, device=device)
    if not holdout:
        return (images, labels, *load_mnist(data_dir, train=False, device=device), "test")
    fit = len(labels) - holdout
    return images[:fit], labels[:fit], images[fit:], labels[fit:], "val"


def metrics_of(run, args, device, split, params):
    """The metrics.json record of a finished run."""
    keys = ("epochs", "seed", "batch_size", "lr", "schedule", "ema", "clean_epochs", "amp", "holdout")
    return {"params": params, **{k: getattr(args, k) for k in keys},
            "augment": steps.AUGMENT if args.augment else None, "device": str(device),
            "cuda_graph": isinstance(run.steps, steps.GraphedSteps),
            "torch_version": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "eval_split": split, "history": run.history,
            f"{split}_accuracy": run.history[-1][f"{split}_accuracy"],
            "seconds": round(sum(h["seconds"] for h in run.history), 1)}


def verdict(metrics, refusal):
    """The run's verdict in one line: the gate's rules, applied to what the run measured."""
    split = metrics["eval_split"]
    accuracies = [h[f"{split}_accuracy"] for h in metrics["history"]]
    where = "" if split == "test" else " (on held-out images; the gate judges a test-set run)"
    if refusal:
        return f"verdict{where}: misses the bar: the gate would refuse the architecture: {refusal}"
    missed = shortfall(accuracies)
    if missed:
        return f"verdict{where}: misses the bar: {missed}"
    return (f"verdict{where}: meets the bar: {', '.join(f'{a:.2f}' for a in accuracies[-LAST_EPOCHS:])} >= "
            f"{MIN_ACCURACY:.2f} in each of the last {LAST_EPOCHS} of {len(accuracies)} epochs, "
            f"{metrics['params']:,} numbers < {PARAMS_BELOW:,}")


def preflight(net):
    """Before any data loads, the gate's verdict on the architecture: what can go wrong with a model
    shows in seconds. Returns (numbers carried, refusal or None). A model that cannot be trained or
    scored stops here, after the traceback of its own error; a refused one still trains, so that a
    student sees what it scores (`pytest -q` fails on it with the same message)."""
    with torch.random.fork_rng(devices=[]):  # the run's random stream starts where it would have
        model = net()
        try:
            count = check_architecture(model)
            print(f"gate: the architecture passes ({count:,} numbers carried)", flush=True)
            return count, None
        except Unusable as e:
            if e.__cause__ is not None:  # raised in forward: its traceback points at the line to fix
                traceback.print_exception(e.__cause__)
            sys.exit(f"error: {e}")
        except Refusal as e:
            print(f"gate: the architecture would be refused: {e}\n(training it anyway; `pytest -q` will fail on it)",
                  flush=True)
            return count_numbers(model), str(e)


def save(args, run, metrics, net):
    """model.pt, metrics.json and curves.png as one set; the README beside the gated run is refreshed."""
    checkpoint = artifacts.checkpoint_bytes(run.weights, {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")})
    metrics["checkpoint"] = {"file": artifacts.MODEL, "sha256": artifacts.sha256(checkpoint)}
    metrics.update(tables(net()))  # the model's layer and receptive-field tables, for the README
    out = args.out
    artifacts.save_set({os.path.join(out, artifacts.MODEL): checkpoint,
                        os.path.join(out, artifacts.CURVES): curves_png(run.history, averaged=bool(args.ema)),
                        os.path.join(out, artifacts.METRICS): artifacts.json_bytes(metrics)})
    print(f"wrote {artifacts.MODEL}, {artifacts.METRICS}, {artifacts.CURVES} to {out}")
    if os.path.samefile(out, HERE):
        try:
            print(write_readme(os.path.join(out, "README.md"), os.path.join(out, artifacts.METRICS), metrics["params"]))
        except (OSError, ValueError) as e:
            print(f"README.md's tables were not refreshed ({e})")


def main(argv=None, net=None):
    """Parses argv and trains net() (default: model.py's Net; the project's tests pass their own)."""
    args = parse_args(argv)
    net = net or student_net()
    if problem := buildable(net):
        sys.exit(f"error: {problem}")
    if args.holdout and os.path.samefile(args.out, HERE):
        sys.exit("error: --holdout would replace the test-set run the gate checks here; pass --out DIR")
    if args.epochs > MAX_EPOCHS:
        print(f"warning: {args.epochs} epochs; the rule allows at most {MAX_EPOCHS}, so the gate will refuse this run")
    params, refusal = preflight(net)
    device = pick_device(args.device)
    # SIGTERM stops like Ctrl-C, and Ctrl-C stops even where the parent ignored it (a background job).
    with artifacts.stops_handled_by(signal.default_int_handler):
        try:
            data = load_splits(args.data_dir, device, args.holdout)
            run = start(args, device, data, net)
            train_epochs(run, args, data, args.epochs)
            metrics = metrics_of(run, args, device, data[-1], params)
            save(args, run, metrics, net)
        except DataError as e:
            sys.exit(f"error: {e}")
        except artifacts.StoppedAfterSaving:
            sys.exit(f"interrupted after saving: the three files in {args.out} are complete")
        except KeyboardInterrupt:
            sys.exit("interrupted: nothing was written; earlier artifacts are untouched")
    print(verdict(metrics, refusal))


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def number(kind, accept, rule):  # an argparse type: a bad flag is one usage line, not a traceback
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


def writable_dir(text):  # an argparse type, checked before any work
    if not os.path.isdir(text) or not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not a writable directory")
    return text


def parse_args(argv=None):
    positive = lambda kind: number(kind, lambda v: v > 0, "> 0")
    p = argparse.ArgumentParser(description="Train model.py's Net on MNIST.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=positive(int), default=MAX_EPOCHS, help="training epochs (rules.MAX_EPOCHS)")
    p.add_argument("--batch-size", type=positive(int), default=BATCH_SIZE, help="training batch size")
    p.add_argument("--lr", type=positive(float), default=LR, help="peak learning rate (one-cycle), or the first (step)")
    p.add_argument("--schedule", choices=["onecycle", "step"], default="onecycle",
                   help="learning-rate schedule: one-cycle, or x0.1 steps at 50%% and 75%% of the run")
    p.add_argument("--ema", type=number(float, lambda v: 0 <= v < 1, "in [0, 1)"), default=EMA, metavar="DECAY",
                   help="evaluate and save a moving average of the weights with this decay; 0: the raw weights")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help=f"random rotation, shift and zoom of each training batch: {steps.AUGMENT}")
    p.add_argument("--clean-epochs", type=number(int, lambda v: v >= 0, ">= 0"), default=CLEAN_EPOCHS, metavar="N",
                   help="train the last N epochs on the images as they are, without augmentation")
    p.add_argument("--seed", type=int, default=SEED, help="random seed")
    p.add_argument("--holdout", type=number(int, lambda v: 0 <= v < 60_000, "in [0, 60000)"), default=0, metavar="N",
                   help="evaluate on the last N training images instead of the test set (needs another --out)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto: CUDA, then Apple MPS, then CPU")
    p.add_argument("--amp", choices=["on", "off"], default="off", help="bf16 autocast")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each training step from a captured CUDA graph (steps.py); default: on with CUDA"
                        "%(default).0s")  # prints nothing: keeps argparse from adding "(default: None)"
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="MNIST root (holds MNIST/raw/); the MNIST_DATA_DIR variable sets the default")
    p.add_argument("--out", type=writable_dir, default=HERE,
                   help="directory for model.pt, metrics.json, curves.png (the gate reads the ones beside train.py)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available")
    if args.device == "mps" and not torch.backends.mps.is_available():
        p.error("--device mps: Apple MPS is not available")
    if args.cuda_graph and (args.device not in ("auto", "cuda") or not torch.cuda.is_available()):
        p.error("--cuda-graph needs a CUDA GPU")
    if args.cuda_graph is None:
        args.cuda_graph = pick_device(args.device).type == "cuda"
    if args.augment and args.epochs <= args.clean_epochs:
        print(f"note: the last {args.clean_epochs} epochs train without augmentation, so all {args.epochs} do "
              "(--clean-epochs sets how many)", flush=True)
    return args


if __name__ == "__main__":
    main()
