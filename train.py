"""Train the MNIST Net and write its artifacts.

    python train.py                              # 15 epochs -> model.pt, metrics.json, curves.png
    python train.py --seeds 1 2 3 --out runs     # one run per seed -> runs/seeds.json, seeds.png and a table
    python train.py --holdout 10000 --out /tmp   # score the last 10k training images instead

The whole dataset sits on the training device as one uint8 tensor; each step slices a shuffled
batch, augments it there and trains on it. That is what a DataLoader does, minus the per-sample
Python work and the host-to-device copies (research/bench.py measures the difference). The step loop never
reads a value back to the host, so a GPU is never made to wait; on CUDA each step is replayed from a
captured graph (graphed.py; --no-cuda-graph runs the eager loop). What is evaluated and saved is a
moving average of the weights (WeightAverage), not the weights of the last step.

It trains whatever `Net()` model.py defines, built with no arguments.
"""
import argparse
import contextlib
import copy
import hashlib
import io
import json
import os
import pathlib
import signal
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F
from tqdm import tqdm

import graphed
from checks import Refusal, Unusable, check_architecture, check_runs
from data import DEFAULT_DATA_DIR, DataError, augment, load_mnist, to_float
from rules import LAST_EPOCHS  # model.pt keeps the weights of the epochs the gate re-scores
from checks import buildable, student_net
from measure import count_numbers
from summary import tables, write_readme

# Defaults. Each but the recipe's constants (momentum, weight decay, augmentation ranges) is a flag below.
EPOCHS = 15
BATCH_SIZE = 128
LR = 0.1             # peak learning rate of the one-cycle schedule (SGD, Nesterov momentum)
MOMENTUM = 0.9       # the step schedule's; the one-cycle schedule cycles it 0.95 -> 0.85 -> 0.95 instead
WEIGHT_DECAY = 1e-4
AUGMENT = dict(degrees=7.0, translate=0.05, scale=0.05)  # random rotation (deg), shift and zoom (fractions)
CLEAN_EPOCHS = 3     # the last 3 epochs train on the images as they are, without augmentation
EMA = 0.995          # decay of the weight average that is evaluated and saved (0: the raw weights)
SEED = 1
EVAL_BATCH_SIZE = 2000
PROGRESS_EVERY_S = 10  # without a terminal, one progress line per 10 s
HERE = os.path.dirname(os.path.abspath(__file__))  # where the gate reads model.pt and metrics.json


# --- argparse types: a bad flag is one usage line and exit code 2, never a traceback mid-run ---

def number(kind, accept, rule):
    """An argparse type: `kind` parsed from text, then held to `rule` (e.g. "> 0")."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


def positive(kind):
    return number(kind, lambda v: v > 0, "> 0")


def nonnegative(kind):
    return number(kind, lambda v: v >= 0, ">= 0")


probability = number(float, lambda v: 0 <= v < 1, "in [0, 1)")


def writable_dir(text):
    """An argparse type: a directory that exists and can be written to, checked before any work."""
    if not os.path.isdir(text) or not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not a writable directory")
    return text


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def pick_amp_dtype(amp):
    """bf16 autocast (on) or float32 (off, returned as None). Off by default everywhere: on an H100
    bf16 trained this small net slower than float32 (39.6 s against 31.4 s) and no more accurately."""
    return torch.bfloat16 if amp == "on" else None


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, updated after
    every step. It smooths out the step-to-step noise that makes the last epochs' scores wobble.

    The decay warms up as min(decay, (1 + t) / (10 + t)) at step t, so the early average is not
    dragged back toward the random initial weights. (torch.optim.swa_utils.AveragedModel reads a
    counter back from the device at every step, which would stall a GPU.)"""

    def __init__(self, model, decay):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.steps = decay, 0
        # keep_vars: the tensors themselves, so a deepcopy of (model, average) keeps them paired
        pairs = list(zip(self.model.state_dict(keep_vars=True).values(), model.state_dict(keep_vars=True).values()))
        self.averages = [a for a, _ in pairs if a.is_floating_point()]
        self.currents = [c for a, c in pairs if a.is_floating_point()]
        self.copied = [(a, c) for a, c in pairs if not a.is_floating_point()]  # BatchNorm's batch counter

    def decay_at(self, step):
        """The decay at step 1, 2, ...: it warms up to self.decay."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, decay=None):
        """decay: this step's as a device tensor (graphed.py); by default decay_at the next step."""
        self.steps += 1
        if decay is None:
            decay = self.decay_at(self.steps)
        if self.averages and isinstance(decay, torch.Tensor):  # read on the device at each replay of a graph
            steps = torch._foreach_sub(self.currents, self.averages)
            torch._foreach_mul_(steps, 1 - decay)
            torch._foreach_add_(self.averages, steps)
        elif self.averages:  # one multi-tensor kernel on a GPU; on a CPU the same arithmetic as lerp_ tensor by tensor
            torch._foreach_lerp_(self.averages, self.currents, 1 - decay)
        for average, current in self.copied:
            average.copy_(current)


def progress(batches, desc):
    """A progress bar over one epoch's batches. In a terminal it redraws ten times a second. Without
    one (Colab's `!python train.py`, a CI log, output piped to a file) it writes a line every
    PROGRESS_EVERY_S seconds: a small machine's epoch takes minutes, and silence looks like a hang."""
    terminal = sys.stderr.isatty()
    return tqdm(batches, desc=desc, leave=False, unit="batch", mininterval=0.1 if terminal else PROGRESS_EVERY_S,
                ascii=not terminal)


def train_one_epoch(model, optimizer, scheduler, images, labels, batch_size, amp_dtype, augmented, average, desc):
    """One pass over the data in a fresh random order, updating `average` (if any) after each step.

    Returns (mean loss, accuracy %) of the model being trained, on the batches as it saw them."""
    model.train()
    n = len(labels)
    loss_sum = torch.zeros((), device=labels.device)
    correct = torch.zeros((), device=labels.device, dtype=torch.long)
    order = torch.randperm(n, device=labels.device)
    for idx in progress(order.split(batch_size), desc):
        x, y = to_float(images[idx]), labels[idx]
        if augmented:
            x = augment(x, **AUGMENT)
        with torch.autocast(labels.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
            logits = model(x)
            # One loss for logits and log-probabilities alike: cross_entropy applies log_softmax, which
            # leaves log-probabilities as they are, so on a log_softmax output it equals F.nll_loss.
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item() / n, 100 * correct.item() / n


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
    """(train images, train labels, eval images, eval labels, eval split name).

    The held-out images are the last `holdout` of the training file. At the file's odd positions each
    writer's digits come in a run, so the odd half of the tail comes from writers the rest hardly
    shows, as all the test set's writers are new; the even positions are shuffled. A random slice
    would share all its writers with the images trained on (research/README.md: held-out writers)."""
    images, labels = load_mnist(data_dir, train=True, device=device)
    if not holdout:
        return (images, labels, *load_mnist(data_dir, train=False, device=device), "test")
    fit = len(labels) - holdout
    return images[:fit], labels[:fit], images[fit:], labels[fit:], "val"


def make_optimizer(params, args, steps_per_epoch):
    """SGD with Nesterov momentum and its learning-rate schedule, stepped once per batch."""
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    if args.schedule == "onecycle":  # also cycles momentum from 0.95 to 0.85 and back, against the lr
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                        steps_per_epoch=steps_per_epoch)
    else:  # classic step decay: x0.1 at half and at three quarters of the run
        total = steps_per_epoch * args.epochs
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[total // 2, total * 3 // 4],
                                                         gamma=0.1)
    return optimizer, scheduler


def first_forward(model, device):
    """One forward pass before training: a lazy layer (nn.LazyLinear) makes its weights in its first
    one, and the optimizer and the weight average must hold them. In eval mode, so that BatchNorm's
    statistics stay as they are, and on a forked random stream, so that the run draws the same
    numbers after it as without it (a lazy layer's weights come from the seeded stream all the same)."""
    was_training = model.training
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        model.eval()(torch.zeros(2, 1, 28, 28, device=device))
    model.train(was_training)


def preflight(net):
    """Before any data loads: builds net(), runs it on one image and on several, in eval and training
    mode, counts what the gate counts and prints the gate's verdict on its architecture, so that what
    can go wrong with a model shows in seconds, not after the last epoch.

    A model that cannot be trained, counted or scored as it is (forward raises, or the output is not
    (N, 10) for every N, one image included) stops here with one line, after the traceback of its
    own error if it raised one. A model the gate refuses still trains, after the refusal is printed:
    a student may want to see what an 8,500-parameter net scores; its artifacts are written as
    usual, and `pytest -q` fails on it with the same message."""
    with torch.random.fork_rng(devices=[]):  # the run's random stream starts where it would have
        model = net()
        try:
            check_runs(model)
            count = count_numbers(model)
        except Unusable as e:
            if e.__cause__ is not None:  # raised in forward: its traceback points at the line to fix
                traceback.print_exception(e.__cause__)
            sys.exit(f"error: {e}")
        except Exception as e:
            sys.exit(f"error: the numbers the model carries could not be counted ({type(e).__name__}: {e})")
        try:
            check_architecture(model)
            print(f"gate: the architecture passes ({count:,} numbers carried)", flush=True)
        except Refusal as e:
            print(f"gate: the architecture would be refused: {e}\n(training it anyway; `pytest -q` will fail on it)",
                  flush=True)


def start(args, device, data, net=None):
    """A fresh run seeded with args.seed, before its first epoch, of net() (default: model.py's
    Net). train_epochs advances it; a deepcopy of it, with the RNG state, forks it (an
    eager run only: a captured CUDA graph cannot be copied)."""
    torch.manual_seed(args.seed)  # before the model exists: the seed fixes its initial weights too
    train_x, train_y = data[:2]
    model = (net or student_net())().to(device)
    first_forward(model, device)
    average = WeightAverage(model, args.ema) if args.ema else None
    steps = -(-len(train_y) // args.batch_size)
    state = argparse.Namespace(model=model, average=average, optimizer=None, scheduler=None, graphed=None,
                               steps_per_epoch=steps, epoch=0, history=[], weights={})
    if not args.cuda_graph:
        state.optimizer, state.scheduler = make_optimizer(model.parameters(), args, steps)
        return state
    total = steps * args.epochs
    lrs, momenta = graphed.schedule(*make_optimizer([torch.zeros(1, requires_grad=True)], args, steps), total)
    decays = [average.decay_at(t) for t in range(1, total + 1)] if average else None
    state.graphed = graphed.GraphedSteps(model, average, train_x, train_y, args.batch_size, lrs, momenta, decays,
                                         WEIGHT_DECAY, lambda x: augment(x, **AUGMENT), pick_amp_dtype(args.amp),
                                         capture=torch.device(device).type == "cuda")
    return state


def train_epochs(state, args, data, until):
    """Trains `state` on to epoch `until`, evaluating the saved model after each epoch."""
    train_x, train_y, eval_x, eval_y, split = data
    scored = state.average.model if state.average else state.model  # what is evaluated and saved
    amp_dtype = pick_amp_dtype(args.amp)
    for epoch in range(state.epoch + 1, until + 1):
        start_time = time.perf_counter()
        augmented = args.augment and epoch <= args.epochs - args.clean_epochs
        desc = f"seed {args.seed} epoch {epoch}/{args.epochs}"
        if state.graphed:
            lr = state.graphed.lrs[(epoch - 1) * state.steps_per_epoch].item()
            train_loss, train_acc = state.graphed.epoch(augmented, lambda batches: progress(batches, desc))
        else:
            lr = state.optimizer.param_groups[0]["lr"]
            train_loss, train_acc = train_one_epoch(state.model, state.optimizer, state.scheduler, train_x, train_y,
                                                    args.batch_size, amp_dtype, augmented, state.average, desc)
        eval_loss, eval_acc = evaluate(scored, eval_x, eval_y)
        state.history.append({"epoch": epoch, "lr": round(lr, 6), "augmented": augmented,
                              "train_loss": round(train_loss, 4), "train_accuracy": round(train_acc, 2),
                              f"{split}_loss": round(eval_loss, 4), f"{split}_accuracy": round(eval_acc, 2),
                              "seconds": round(time.perf_counter() - start_time, 2)})
        print(f"seed {args.seed} epoch {epoch:2d}  lr {lr:.4f}  train loss {train_loss:.4f} "
              f"acc {train_acc:.2f}  {split} loss {eval_loss:.4f} acc {eval_acc:.2f}  "
              f"{state.history[-1]['seconds']:.1f}s", flush=True)
        state.weights[epoch] = {k: v.detach().to("cpu", copy=True) for k, v in scored.state_dict().items()}
        state.weights.pop(epoch - LAST_EPOCHS, None)
        state.epoch = epoch


def metrics_of(state, args, device, split):
    """The metrics.json record of a finished run."""
    history = state.history
    return {
        "params": count_numbers(state.model), "epochs": args.epochs, "seed": args.seed,
        "batch_size": args.batch_size, "lr": args.lr, "schedule": args.schedule,
        "ema": args.ema, "augment": AUGMENT if args.augment else None,
        "clean_epochs": args.clean_epochs, "device": str(device), "amp": args.amp, "cuda_graph": args.cuda_graph,
        "torch_version": torch.__version__, "eval_split": split,
        "holdout": args.holdout, "history": history,
        f"{split}_accuracy": history[-1][f"{split}_accuracy"],
        "seconds": round(sum(h["seconds"] for h in history), 1),
    }


def run(args, device, data, net=None):
    """Trains net() (default: model.py's Net) from scratch with args.seed.

    Returns ({epoch: CPU state_dict} for the last LAST_EPOCHS epochs, metrics dict). A model whose
    step cannot be captured as a CUDA graph (it reads a value back to the host, say) is trained
    again from the start, eagerly."""
    try:
        state = start(args, device, data, net)
        train_epochs(state, args, data, args.epochs)
    except graphed.CaptureError as e:
        print(f"warning: {e}; training with the eager loop instead (--no-cuda-graph skips the attempt)",
              file=sys.stderr)
        state = None  # outside the except block, so that the failed run's memory can go
    if state is None:
        args.cuda_graph = False
        state = start(args, device, data, net)
        train_epochs(state, args, data, args.epochs)
    return state.weights, metrics_of(state, args, device, data[-1])


def last_epochs(metrics):
    """The final evaluation accuracy and the lowest of the last LAST_EPOCHS epochs."""
    accuracies = [h[f"{metrics['eval_split']}_accuracy"] for h in metrics["history"]]
    return {"final": accuracies[-1], "min_last_3": min(accuracies[-LAST_EPOCHS:])}


def stage(path, write):
    """Calls write(tmp) on a temp file beside `path` and returns tmp.

    os.replace(tmp, path) then swaps it in at once: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".",
                               suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; give it a normal file's mode
    try:
        write(tmp)
        with open(tmp, "r+b") as f:  # Windows can only fsync a file opened for writing
            os.fsync(f.fileno())  # on disk before the rename, so a crash can't leave an empty file
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


saved = False  # set by save_artifacts once the new set is in place
STOPS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stops_handled_by(handler):
    """Ctrl-C and SIGTERM go to handler inside the block; the handlers before it come back after.
    Call from the main thread."""
    previous = {sig: signal.signal(sig, handler) for sig in STOPS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM that arrive inside are held, then acted on as the block ends.

    Python runs every signal handler in the main thread, whichever thread the kernel hands the
    signal to, so handlers that only take note hold it for the whole process (pthread_sigmask would
    hold it for the calling thread alone)."""
    held = []
    try:
        with stops_handled_by(lambda sig, frame: held.append(sig)):
            yield
    finally:
        if held:
            signal.raise_signal(held[0])  # now handled as it would have been: KeyboardInterrupt under main


def write_json(obj, path):
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def replace_with(path, write):
    """Replaces `path` with what write(tmp) writes, atomically."""
    os.replace(stage(path, write), path)


def save_json(obj, path):
    """Replaces `path` with obj as JSON, atomically."""
    replace_with(path, lambda p: write_json(obj, p))


def save_artifacts(out, weights, metrics, config):
    """Writes model.pt, metrics.json and curves.png as one consistent set, or not at all.

    model.pt holds the final weights ("model"), the weights of each of the last epochs
    ("last_epochs", which the gate re-scores) and the run's flags ("config")."""
    from plots import save_curves  # matplotlib only when artifacts are written

    global saved
    paths = {name: os.path.join(out, name) for name in ("model.pt", "curves.png", "metrics.json")}
    staged = {}
    try:
        # Saved through a buffer: written to a file, torch.save names the archive's root folder after the
        # file (a random temp name here), so the same weights would give other bytes and another sha256.
        buffer = io.BytesIO()
        torch.save({"model": weights[max(weights)], "last_epochs": weights, "config": config}, buffer)
        staged["model.pt"] = stage(paths["model.pt"], lambda p: pathlib.Path(p).write_bytes(buffer.getvalue()))
        metrics["checkpoint"] = {"file": "model.pt", "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()}
        staged["curves.png"] = stage(paths["curves.png"], lambda p: save_curves(metrics["history"], p,
                                                                                 averaged=bool(metrics.get("ema"))))
        staged["metrics.json"] = stage(paths["metrics.json"], lambda p: write_json(metrics, p))
        with signals_held():  # the renames are the commit point: a stop waits until all three are done
            for name, tmp in staged.items():
                os.replace(tmp, paths[name])
            saved = True
    finally:  # interrupted before the renames: drop the staged files, keep the old set
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the MNIST Net.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=positive(int), default=EPOCHS, help="training epochs")
    p.add_argument("--batch-size", type=positive(int), default=BATCH_SIZE, help="training batch size")
    p.add_argument("--lr", type=positive(float), default=LR,
                   help="peak learning rate (one-cycle), or the starting one (step)")
    p.add_argument("--schedule", choices=["onecycle", "step"], default="onecycle",
                   help="learning-rate schedule: one-cycle, or x0.1 steps at 50%% and 75%% of the run")
    p.add_argument("--ema", type=probability, default=EMA, metavar="DECAY",
                   help="evaluate and save a moving average of the weights with this decay; 0: the raw weights")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help=f"random rotation, shift and zoom of each training batch: {AUGMENT}")
    p.add_argument("--clean-epochs", type=nonnegative(int), default=CLEAN_EPOCHS,
                   metavar="N", help="train the last N epochs on the images as they are, without augmentation")
    p.add_argument("--seed", type=int, default=SEED, help="random seed")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="train once per seed; write seeds.json and seeds.png after each seed, then print a table "
                        "(no weights saved)")
    p.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="hold out the last N training images (half of them from writers the rest hardly shows) and "
                        "evaluate on them instead of the test set; needs an --out other than train.py's folder")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto: CUDA, then Apple MPS, then CPU")
    p.add_argument("--amp", choices=["on", "off"], default="off", help="bf16 autocast")
    # None: on when the device is CUDA. "%(default).0s" prints nothing; it keeps argparse from adding
    # "(default: None)" to a help text that says the default itself.
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each training step from a captured CUDA graph (graphed.py): far fewer kernel launches "
                        "than the eager loop (research/README.md, Speed); --no-cuda-graph runs the eager loop "
                        "(default: on with CUDA)"
                        "%(default).0s")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="MNIST root (holds MNIST/raw/); the MNIST_DATA_DIR variable sets the default")
    p.add_argument("--out", type=writable_dir, default=HERE,
                   help="directory for model.pt, metrics.json, curves.png (the gate reads the ones beside train.py)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available")
    if args.cuda_graph and (args.device not in ("auto", "cuda") or not torch.cuda.is_available()):
        p.error("--cuda-graph needs a CUDA GPU")
    if args.cuda_graph is None:
        args.cuda_graph = pick_device(args.device).type == "cuda"
    if args.device == "mps" and not torch.backends.mps.is_available():
        p.error("--device mps: Apple MPS is not available")
    if not 0 <= args.holdout < 60_000:
        p.error(f"--holdout must be in [0, 60000), got {args.holdout}")
    return args


def run_seeds(args, device, data, net=None):
    """Trains once per seed; rewrites seeds.json (no weights) and seeds.png after each seed, so a
    run cut short keeps the seeds it finished, and prints a table."""
    from plots import BAR, save_seeds  # matplotlib only when artifacts are written

    paths = {name: os.path.join(args.out, name) for name in ("seeds.json", "seeds.png")}
    record = None
    for seed in args.seeds:
        args.seed = seed
        _, metrics = run(args, device, data, net)
        if record is None:
            record = {k: metrics[k] for k in ("params", "epochs", "batch_size", "lr", "schedule", "ema",
                                              "augment", "clean_epochs", "device", "amp", "cuda_graph",
                                              "torch_version", "eval_split", "holdout")}
            if device.type == "cuda":
                record["device_name"] = torch.cuda.get_device_name(device)
            record["seeds"] = []
        record["seeds"].append({"seed": seed, **last_epochs(metrics), "params": metrics["params"],
                                "seconds": metrics["seconds"], "history": metrics["history"]})
        save_json(record, paths["seeds.json"])
        replace_with(paths["seeds.png"], lambda p: save_seeds([record], p))
    rows = record["seeds"]
    print(f"\n{metrics['eval_split']} accuracy per seed ({metrics['params']} params, {args.epochs} epochs, {device})")
    print(f"{'seed':>5}{'final':>8}{'min last 3':>12}{'seconds':>9}")
    for r in rows:
        print(f"{r['seed']:>5}{r['final']:>8.2f}{r['min_last_3']:>12.2f}{r['seconds']:>9.1f}")
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in ("final", "min_last_3")}
    print(f"{'mean':>5}{mean['final']:>8.2f}{mean['min_last_3']:>12.3f}")
    held = sum(r["min_last_3"] >= BAR for r in rows)
    print(f"{held} of {len(rows)} seeds hold {BAR:.2f} in each of the last {LAST_EPOCHS} epochs")
    print(f"wrote {paths['seeds.json']} and {paths['seeds.png']}")


def refreshed_readme(folder):
    """The README beside the gated run shows that run's tables and figures: its marked blocks are
    rewritten (summary.write_readme). Only a note if that cannot be done: the run itself is saved."""
    folder = pathlib.Path(folder)
    try:
        return write_readme(folder / "README.md", folder / "metrics.json")
    except (OSError, ValueError) as e:
        return f"README.md's tables were not refreshed ({e})"


def main(argv=None, net=None):
    """Parses argv and trains net() (default: model.py's Net; the project's tests pass their own)."""
    args = parse_args(argv)
    # SIGTERM stops like Ctrl-C, and Ctrl-C stops even where the parent ignored it (a background job).
    # The caller's handlers come back on the way out (train.main is also called from tests).
    with stops_handled_by(signal.default_int_handler):
        train_and_save(args, net or student_net())


def train_and_save(args, net):
    global saved
    saved = False  # a second run in the same process (the tests) starts unsaved
    problem = buildable(net)
    if problem:
        sys.exit(f"error: {problem}")
    if args.holdout and os.path.samefile(args.out, HERE):
        sys.exit("error: --holdout would replace the test-set run the gate checks here; pass --out DIR")
    preflight(net)
    device = pick_device(args.device)
    layout = tables(net())  # the model's layer and receptive-field tables, kept with its run for the README
    try:
        data = load_splits(args.data_dir, device, args.holdout)
        if args.augment and args.epochs <= args.clean_epochs:
            print(f"note: the last {args.clean_epochs} epochs train without augmentation, so all {args.epochs} do "
                  "(--clean-epochs sets how many)", flush=True)
        if args.seeds:
            return run_seeds(args, device, data, net)
        weights, metrics = run(args, device, data, net)
        metrics.update(layers=layout["layers"], receptive_field=layout["receptive_field"])
        config = {k: v for k, v in vars(args).items() if k not in ("seeds", "out", "data_dir")}
        save_artifacts(args.out, weights, metrics, config)
        print(f"{metrics['eval_split']} accuracy {metrics[metrics['eval_split'] + '_accuracy']:.2f}%  "
              f"params {metrics['params']}  wrote model.pt, metrics.json, curves.png to {args.out}")
        if os.path.samefile(args.out, HERE):
            print(refreshed_readme(args.out))
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        if saved:
            sys.exit(f"interrupted after saving: model.pt, metrics.json and curves.png in {args.out} are complete")
        sys.exit("interrupted: nothing was written; earlier artifacts are untouched")


if __name__ == "__main__":
    main()
