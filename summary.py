"""What a model is made of: the numbers it carries, the torch operations its forward pass runs, its
layers and its receptive field. The gate measures models with these, so they live apart from
model.py, the file a student edits: a count defined there could be edited to lie.

    python summary.py      # the layer and receptive-field tables of model.py's Net

How the gate sees what forward runs (torch_calls): a TorchFunctionMode is active for one forward
pass and records each torch function and tensor method that the model's code calls, with its
arguments and result. A module and its functional form land on the same record: nn.Dropout calls
F.dropout, nn.BatchNorm2d calls F.batch_norm, nn.AdaptiveAvgPool2d calls F.adaptive_avg_pool2d,
nn.Linear calls F.linear. Only the outermost call is recorded, not what torch runs inside it.

What it cannot see: work done outside torch (numpy, Python arithmetic on lists), a TorchScript
module, a custom autograd Function's or C++ extension's insides, and branches of forward that the
traced batch does not take. It recognises only the usual spellings of an operation: a global
average pool written as x.sum((2, 3)) / 36 is not recognised as one, and is refused.
"""
import copy
import inspect
import json
import os
import re
import sys
import types
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

# By convention not parameters: BatchNorm's running statistics are computed, not learned. They
# are let off only beside the affine weights they normalise for, one of each per channel.
BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _arrays_in(value, depth=3):
    """The tensors and numpy arrays in value: itself, a module's parameters and buffers, or what a
    list, tuple, set or dict holds (three levels deep)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return [value]
    if isinstance(value, nn.Module):  # BatchNorm's statistics are let off here as in the module tree
        return [*value.parameters(), *(b for m in value.modules() for name, b in m.named_buffers(recurse=False)
                                       if not _exempt(m, name, b))]
    if depth and isinstance(value, (list, tuple, set, frozenset, dict)):
        items = value.values() if isinstance(value, dict) else value
        return [t for item in items for t in _arrays_in(item, depth - 1)]
    return []


def buildable(cls):
    """None if cls() can be called with no arguments, else a one-line reason. train.py and the gate
    build model.py's Net() so; an error raised inside Net.__init__ is the student's, with its traceback."""
    try:
        inspect.signature(cls).bind()
    except TypeError as e:
        return (f"model.py's Net() must build with no arguments ({e}): give each argument of Net.__init__ "
                "a default")
    except ValueError:  # no signature to read: let the call itself say
        pass
    return None


def student_net():
    """model.py's Net class. Imported when asked for, not when this file is: the project's tests and
    research scripts import the tools here and must start whatever model.py holds. An error in
    model.py keeps its traceback, which points at the student's line."""
    from model import Net
    return Net


def size(array):
    """How many numbers a tensor or numpy array holds."""
    return array.numel() if isinstance(array, torch.Tensor) else array.size


def _exempt(module, name, buffer):
    """BatchNorm's running statistics, when they sit beside affine weights of the same size."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or name not in BATCHNORM_STATISTICS:
        return False
    weight = getattr(module, "weight", None)
    return weight is not None and buffer.numel() in (weight.numel(), 1)


def _functions_of(cls):
    """The plain functions a class defines (forward and its helpers)."""
    for value in vars(cls).values():
        value = getattr(value, "__func__", value)  # staticmethod, classmethod
        if isinstance(value, types.FunctionType):
            yield value


def _contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a cell not filled yet
        return None


def carried_tensors(model):
    """{where: tensor or numpy array} for every table of numbers the model carries, each once:

    - parameters, trainable or frozen;
    - buffers, persistent or not, except BatchNorm's running statistics and batch counter beside
      BatchNorm's own affine weights;
    - tensors, numpy arrays, modules, or containers of them, kept as plain attributes of a module,
      on its class or a base class, as default values or closure cells of their functions, or at
      the top level of the Python files that define those classes: a "feature bank" that forward
      reads from outside the module tree.

    This is what can be found cheaply, not a proof: numbers typed into model.py as Python lists,
    or loaded from a file inside forward, are not found.
    """
    found, seen = {}, set()

    def add(where, value):
        for i, t in enumerate(_arrays_in(value)):
            if id(t) not in seen:
                seen.add(id(t))
                found[where if i == 0 else f"{where}[{i}]"] = t

    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for attr, p in module.named_parameters(recurse=False):
            add(prefix + attr, p)
        for attr, b in module.named_buffers(recurse=False):
            if not _exempt(module, attr, b):
                add(prefix + attr, b)
        for attr, value in vars(module).items():
            if attr not in ("_parameters", "_buffers", "_modules"):
                add(prefix + attr, value)
    own_classes = {cls for m in model.modules() for cls in type(m).__mro__
                   if cls is not object and not cls.__module__.startswith("torch.")}
    for cls in sorted(own_classes, key=lambda c: c.__qualname__):
        for attr, value in vars(cls).items():
            add(f"{cls.__name__}.{attr}", value)
        for function in _functions_of(cls):
            where = f"{cls.__name__}.{function.__name__}"
            add(f"{where} defaults", [function.__defaults__, function.__kwdefaults__])
            add(f"{where} closure", [_contents(cell) for cell in function.__closure__ or ()])
        source = sys.modules.get(cls.__module__)
        for attr, value in (vars(source).items() if source else ()):
            # A class is looked at only if it is one of the model's; an instance of one of them (a
            # notebook-style `model = Net()` at the top of the file) is another copy, not a table.
            if not isinstance(value, (type, *own_classes)):
                add(f"{cls.__module__}.{attr}", value)
    return found


def count_params(model):
    """Every number the model carries (carried_tensors), after one forward pass in eval mode on a
    copy, so that what forward creates counts too. The size limit counts these."""
    model = copy.deepcopy(model).eval()
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28, device=device))
    return sum(size(t) for t in carried_tensors(model).values())


class Call(NamedTuple):
    """One torch function or tensor method that forward called, e.g. name "dropout" for F.dropout."""
    name: str
    args: tuple
    kwargs: dict
    out: object


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # the mode is off inside: what func calls is not recorded
        self.calls.append(Call(getattr(func, "__name__", str(func)).strip("_"), args, kwargs, out))  # a @ b: "matmul"
        return out


@torch.no_grad()
def torch_calls(model, x):
    """Runs model(x); returns ([Call] in the order forward made them, the model's output)."""
    with _Recorder() as recorder:
        out = model(x)
    return recorder.calls, out


def argument(call, position, name, default=None):
    """An argument of a recorded call, whether it was passed by position or by name."""
    if name in call.kwargs:
        return call.kwargs[name]
    return call.args[position] if len(call.args) > position else default


@torch.no_grad()
def leaf_calls(model, x):
    """Runs model(x); returns ([(name, module, input shape, output)] per leaf module, in the order
    forward called them, and the model's output)."""
    names = {m: name for name, m in model.named_modules()}
    calls, hooks = [], []
    for m in model.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(
                lambda m, i, o: calls.append((names[m], m, tuple(i[0].shape), o))))
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls, out


def eval_leaf_calls(model, size=28):
    """leaf_calls on one blank size x size image in eval mode; the model's mode is left as it was."""
    was_training = model.training
    calls, _ = leaf_calls(model.eval(), torch.zeros(1, 1, size, size))
    model.train(was_training)
    return calls


def layer_table(model, size=28):
    """Rows of (name, type, output shape, params) for each leaf module run, like torchsummary."""
    return [(name, type(m).__name__, tuple(o.shape[1:]), sum(p.numel() for p in m.parameters()))
            for name, m, _, o in eval_leaf_calls(model, size)]


def receptive_field_table(model, size=28):
    """Rows of (name, kernel, padding, stride, n_in, n_out, jump, rf) for each conv and pool, in the
    order forward runs them.

    rf_out = rf_in + (kernel - 1) * jump_in;  jump_out = jump_in * stride.
    A dilated kernel counts its span; the global average pool's row uses the whole map as its kernel.
    """
    rows, rf, jump = [], 1, 1
    for name, m, in_shape, out in eval_leaf_calls(model, size):
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, p, s = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.padding, m.stride))
            d = getattr(m, "dilation", 1)
            k = (d if isinstance(d, int) else d[0]) * (k - 1) + 1
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            k, p, s = in_shape[-1], 0, 1
        else:
            continue
        rf, jump_in = rf + (k - 1) * jump, jump
        jump *= s
        rows.append((name, k, p, s, in_shape[-1], out.shape[-1], jump_in, rf))
    return rows


def tables(model):
    """The layer table, the receptive-field table and the count, as JSON-ready rows: what
    `python summary.py` prints, and what train.py keeps in metrics.json as the trained model's."""
    return {"params": count_params(model),
            "layers": [[name, kind, str(list(shape)), params] for name, kind, shape, params in layer_table(model)],
            "receptive_field": [list(row) for row in receptive_field_table(model)]}


def format_table(header, rows, align):
    """Plain-text columns, each as wide as its widest entry; align: "<" or ">" per column."""
    cells = [header] + [[f"{v:,}" if isinstance(v, int) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if a == "<" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()
                     for row in cells)


def format_tables(t):
    """tables(model)'s two tables as text."""
    layers = format_table(["layer", "type", "output shape", "params"], t["layers"] + [["total", "", "", t["params"]]],
                          "<<>>")
    fields = format_table(["layer", "k", "p", "s", "n_in", "n_out", "j_in", "RF"], t["receptive_field"], "<>>>>>>>")
    return layers, fields


# --- The README's generated blocks: `python summary.py --readme` ------------------------------------
# A block sits between two marker lines, and the command rewrites what is between them, nothing else:
#   <!-- begin layers: python summary.py --readme -->
#   <!-- end layers -->
BLOCK = re.compile(r"(<!-- begin (?P<name>[a-z-]+): python summary\.py --readme -->\n)(?P<body>.*?)(<!-- end (?P=name) -->)",
                   re.S)
BLOCK_NAMES = ("rules", "layers", "receptive-field", "last-epochs")
SHOWN_EPOCHS = 5  # the last-epochs table
HERE = Path(__file__).parent


def readme_blocks(metrics):
    """{block name: markdown} from a run's metrics.json: its model's tables and figures, its last epochs."""
    from rules import LAST_EPOCHS, MAX_EPOCHS, MIN_ACCURACY, PARAMS_BELOW

    history = metrics["history"]
    last = [h["test_accuracy"] for h in history[-LAST_EPOCHS:]]
    layers, fields = format_tables(metrics)
    rows = ["| epoch | lr | augmented | train loss | train acc % | test loss | test acc % |",
            "|---:|---:|:---:|---:|---:|---:|---:|"]
    for h in history[-SHOWN_EPOCHS:]:
        accuracy = f"{h['test_accuracy']:.2f}"
        if h in history[-LAST_EPOCHS:]:
            accuracy = f"**{accuracy}**"
        rows.append(f"| {h['epoch']} | {h['lr']:.4f} | {'yes' if h['augmented'] else 'no'} | {h['train_loss']:.4f} | "
                    f"{h['train_accuracy']:.2f} | {h['test_loss']:.4f} | {accuracy} |")
    return {
        "rules": "\n".join([
            "| rule | the assignment | this model |", "|---|---|---|",
            f"| parameters | fewer than {PARAMS_BELOW:,} | {metrics['params']:,} |",
            f"| test accuracy | ≥ {MIN_ACCURACY:.2f} % in each of the last {LAST_EPOCHS} epochs | "
            f"{', '.join(f'{a:.2f}' for a in last)} |",
            f"| epochs | ≤ {MAX_EPOCHS} | {metrics['epochs']} |"]),
        "layers": f"```\n{layers}\n```",
        "receptive-field": f"```\n{fields}\n```",
        "last-epochs": "\n".join(rows) + f"\n\nThe saved model is the last epoch's ({last[-1]:.2f} %). "
                       f"[All {len(history)} epochs](metrics.json); the curves:\n\n![training curves](curves.png)",
    }


def refresh_readme(text, blocks):
    """text with each marked block's body replaced by blocks[name]; unknown names are left alone."""
    def fill(block):
        return block.group(0) if block["name"] not in blocks else block.group(1) + blocks[block["name"]] + "\n" + block.group(4)
    return BLOCK.sub(fill, text)


def stale_blocks(text, metrics):
    """The names of text's marked blocks that differ from what write_readme would write for this run."""
    return [m["name"] for m in BLOCK.finditer(refresh_readme(text, readme_blocks(metrics)))
            if m.group(0) not in text]


def write_readme(readme=HERE / "README.md", metrics_path=HERE / "metrics.json"):
    """Rewrites readme's marked blocks from the committed run; returns the message to print.
    Raises ValueError with a one-line reason when the run cannot describe model.py's Net."""
    readme, metrics_path = Path(readme), Path(metrics_path)
    text = readme.read_text()
    if not BLOCK.search(text):
        return (f"{readme.name} has no generated blocks, so it was left alone. To add one, put the two lines "
                "`<!-- begin layers: python summary.py --readme -->` and `<!-- end layers -->` where the table "
                f"goes (blocks: {', '.join(BLOCK_NAMES)})")
    try:
        metrics = json.loads(metrics_path.read_text())
        blocks = readme_blocks(metrics)
    except FileNotFoundError:
        raise ValueError(f"{metrics_path.name} is missing: run `python train.py` first") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{metrics_path.name} is not a run of the current train.py ({type(e).__name__}: {e}): "
                         "run `python train.py` first") from None
    params = count_params(student_net()())
    if params != metrics["params"]:
        raise ValueError(f"model.py's Net carries {params:,} numbers, the committed run's model {metrics['params']:,}: "
                         "run `python train.py` first, then this command")
    new = refresh_readme(text, blocks)
    if new == text:
        return f"{readme.name} is up to date"
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, readme)  # all at once: an interrupted write leaves the old README
    changed = [m["name"] for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(new)) if m["body"] != n["body"]]
    return f"rewrote {readme.name}'s blocks: {', '.join(changed)}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--readme"]:
        try:
            print(write_readme())
        except ValueError as e:
            sys.exit(f"error: {e}")
    elif sys.argv[1:]:
        sys.exit("usage: python summary.py [--readme]")
    else:
        print("\n\n".join(format_tables(tables(student_net()()))))
