"""What the gate measures a model by: the torch operations one forward pass runs (torch_calls) and
the numbers the model carries (carried_numbers). They live apart from model.py, the file a student
edits: a count defined there could be edited to lie. checks.py reads both against rules.py.

How the gate sees what forward runs (torch_calls): a TorchFunctionMode is active for one forward
pass and records each torch function and tensor method that the model's code calls, with its
arguments and result. A module and its functional form land on the same record: nn.Dropout calls
F.dropout, nn.BatchNorm2d calls F.batch_norm, nn.AdaptiveAvgPool2d calls F.adaptive_avg_pool2d,
nn.Linear calls F.linear. Only the outermost call is recorded, not what torch runs inside it.

What it cannot see: work done outside torch (numpy, Python arithmetic on lists), a TorchScript
module, a custom autograd Function's or C++ extension's insides, and branches of forward that the
traced batch does not take.
"""
import collections
import copy
import functools
import os
import site
import sys
import sysconfig
import types
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode


# By convention not parameters: BatchNorm's running statistics are computed, not learned. They
# are let off only beside the affine weights they normalise for, one of each per channel.
BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def size(array):
    """How many numbers a tensor, a numpy array or a list of Python numbers holds (a lazy layer's
    weights before its first forward pass: none yet)."""
    if isinstance(array, torch.Tensor):
        return 0 if nn.parameter.is_lazy(array) else array.numel()
    return array.size if isinstance(array, np.ndarray) else _python_numbers(array)


def _exempt(module, name, buffer):
    """BatchNorm's running statistics, when they sit beside affine weights of the same size."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or name not in BATCHNORM_STATISTICS:
        return False
    weight = getattr(module, "weight", None)
    return weight is not None and buffer.numel() in (weight.numel(), 1)


# Python numbers typed into model.py count as a table once a list or tuple holds this many: channel
# widths or a mean and a std are settings, a 9,000-number list made a tensor in forward is a table.
PYTHON_TABLE_FROM = 64
# Where Python and installed packages live: their classes, functions and modules are not the
# student's, and the walk does not go into them (torch's own globals are no table of the model's).
_LIBRARY_DIRS = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                                *sysconfig.get_paths().values(), site.getusersitepackages())
                       if p})
_LIBRARY_PACKAGES = ("torch", "numpy", "torchvision")


def _python_numbers(value):
    """How many numbers a list or tuple holds, nested ones included, if it holds only numbers; else 0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 1
    if not isinstance(value, (list, tuple)):
        return 0
    total = 0
    for item in value:
        n = _python_numbers(item)
        if not n:
            return 0
        total += n
    return total


def _students(obj):
    """Whether a class, function or Python module is the student's code, not Python's or a library's:
    defined in a file outside them, or in no file at all (a notebook, a module built in memory)."""
    module = obj if isinstance(obj, types.ModuleType) else sys.modules.get(getattr(obj, "__module__", None) or "")
    if module is None:
        return isinstance(obj, (type, types.FunctionType))  # a class or function made in exec or a notebook
    name = module.__name__
    if name in sys.builtin_module_names or name.split(".")[0] in _LIBRARY_PACKAGES:
        return False
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.origin in ("built-in", "frozen"):
        return False
    path = getattr(module, "__file__", None)
    return path is None or not os.path.realpath(path).startswith(_LIBRARY_DIRS)


def _contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a cell not filled yet
        return None


def _global_names(code):
    """The global names a function's code reads, its nested functions' and lambdas' included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _short(name):
    return name.rsplit("<locals>.", 1)[-1]


def _children(value, where):
    """(child, where) for what value holds that the walk goes on into."""
    def at(attr):
        return f"{where}.{attr}" if where else attr

    if isinstance(value, nn.Module):
        for attr, p in value._parameters.items():
            yield p, at(attr)
        for attr, b in value._buffers.items():
            if b is not None and not _exempt(value, attr, b):
                yield b, at(attr)
        for attr, m in value._modules.items():
            yield m, at(attr)
        for attr, v in vars(value).items():
            if attr not in ("_parameters", "_buffers", "_modules"):
                yield v, at(attr)
        yield type(value), ""
    elif isinstance(value, dict):
        for key, v in value.items():
            if not isinstance(key, (str, int)):
                yield key, f"{where}[key]"
            yield v, f"{where}[{key!r}]"
    elif isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        for i, v in enumerate(value):
            yield v, f"{where}[{i}]"
    elif isinstance(value, type):
        if _students(value):
            for cls in value.__mro__:
                if _students(cls):
                    for attr, v in vars(cls).items():
                        if not (attr.startswith("__") and attr.endswith("__")) or attr == "__init__":
                            yield v, f"{_short(cls.__qualname__)}.{attr}"
    elif isinstance(value, types.ModuleType):
        if _students(value):
            for attr, v in vars(value).items():
                if not (attr.startswith("__") and attr.endswith("__")):
                    yield v, f"{value.__name__}.{attr}"
    elif isinstance(value, types.FunctionType):
        if _students(value):
            code, defaults = value.__code__, value.__defaults__ or ()
            positional = code.co_varnames[:code.co_argcount]
            for name, v in [*zip(positional[len(positional) - len(defaults):], defaults),
                            *(value.__kwdefaults__ or {}).items()]:
                yield v, f"{where}({name}=...)"
            yield [_contents(cell) for cell in value.__closure__ or ()], f"{where} closure"
            # The globals it reads: a table in a helper's own file is reachable through it.
            module = value.__globals__.get("__name__", "?")
            for name in sorted(_global_names(value.__code__)):
                if name in value.__globals__:
                    yield value.__globals__[name], f"{module}.{name}"
    elif isinstance(value, (staticmethod, classmethod)):
        yield value.__func__, where
    elif isinstance(value, property):
        for f in (value.fget, value.fset, value.fdel):
            yield f, where
    elif isinstance(value, types.MethodType):
        yield value.__func__, where
        yield value.__self__, where
    elif isinstance(value, functools.partial):
        yield value.func, where
        yield value.args, f"{where} args"
        yield value.keywords, f"{where} args"
    elif not isinstance(value, (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)):
        # Any other object: what it keeps (types.SimpleNamespace, a helper class's instance), and its class.
        for attr, v in (getattr(value, "__dict__", None) or {}).items():
            yield v, at(attr)
        for attr in getattr(type(value), "__slots__", ()):
            if isinstance(attr, str) and hasattr(value, attr):
                yield getattr(value, attr), at(attr)
        yield type(value), ""


def _walk(roots, seen, model=None):
    """{where: table} of every tensor, numpy array and Python table of numbers reachable from roots,
    breadth first, so each is named by its shortest path, and each counted once (seen: ids).

    Another instance of model's class than model (another `Net()`) is set aside, not walked:
    returned as [(where, instance)]."""
    found, copies = {}, []
    queue = collections.deque(roots)
    while queue:
        value, where = queue.popleft()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        if model is not None and type(value) is type(model) and value is not model:
            copies.append((where, value))
            continue
        if isinstance(value, (torch.Tensor, np.ndarray)) or _python_numbers(value) >= PYTHON_TABLE_FROM:
            name, n = where or "?", 1
            while name in found:  # two defaults of one function, say
                name, n = f"{where} ({n})", n + 1
            found[name] = value
            continue
        if isinstance(value, nn.Module):  # let off here, so that no other path to them counts them either
            seen.update(id(b) for attr, b in value._buffers.items() if b is not None and _exempt(value, attr, b))
        queue.extend(_children(value, where))
    return found, copies


def carried_tensors(model):
    """{where: table} for every table of numbers the model carries, each once: a tensor, a numpy
    array, or a list or tuple of at least PYTHON_TABLE_FROM Python numbers. Found by reachability:

    - from the model: parameters (trainable or frozen), buffers (persistent or not), plain
      attributes, and what they hold: containers of any kind, other objects' attributes
      (types.SimpleNamespace, a helper class's instance), functions' defaults and closure cells (a
      lambda kept on the model);
    - from the classes of its modules and their base classes: class attributes and their functions'
      defaults, closures and the globals they read;
    - from the Python files that define those classes: every top-level name (a helper class, a
      helper function's default, a list of numbers, an instance of a sub-block called in forward).

    BatchNorm's running statistics and batch counter beside BatchNorm's own affine weights are let
    off (BATCHNORM_STATISTICS). Another instance of the model's own class (a notebook-style
    `model = Net()` at the top of model.py) is a copy of the model, not a table: only what it holds
    beyond what the model holds by the same name counts.

    What cannot be found: numbers loaded from a file, or computed, inside forward.
    """
    classes = [cls for m in model.modules() for cls in type(m).__mro__ if _students(cls)]
    files = [sys.modules[cls.__module__] for cls in classes if cls.__module__ in sys.modules]
    seen = set()
    roots = [(model, ""), *((cls, "") for cls in dict.fromkeys(classes)), *((f, "") for f in dict.fromkeys(files))]
    found, copies = _walk(roots, seen, model)
    for where, other in copies:  # last: a table both it and a global reach is the global's
        seen.discard(id(other))
        theirs, _ = _walk([(other, "")], seen)
        found.update({f"{where}.{name}": t for name, t in theirs.items()
                      if name not in found or size(found[name]) != size(t)})
    return found


def _run_copy(model, batch):
    """A copy of model after forward in eval mode on `batch` random images, so that what forward
    creates or registers (a lazy layer's weights, a buffer added in forward, a cache) is there."""
    model = copy.deepcopy(model).eval()
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch)).to(device)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        model(x)
    return model


def carried_numbers(model):
    """{where: how many numbers} the model carries (carried_tensors), measured on copies after a
    forward pass in eval mode.

    A tensor whose size follows the batch (activations kept by forward, `self.cache = x.detach()`)
    counts what one image adds to it, under the name "where (per image)". Such a tensor is carried
    from call to call, so it is counted rather than let off (forward could read it as a table);
    per image, because its size is the last batch's and the count must not depend on the batch:
    training's last batch, the gate's 4 images and scoring's 1,000 give the same count."""
    two, three = ({name: size(t) for name, t in carried_tensors(_run_copy(model, n)).items()} for n in (2, 3))
    counts = {}
    for name in dict.fromkeys([*two, *three]):
        a, b = two.get(name, 0), three.get(name, 0)
        if a and b and a != b:
            counts[f"{name} (per image)"] = abs(b - a)
        else:
            counts[name] = max(a, b)
    return counts


def count_numbers(model):
    """Every number the model carries (carried_numbers). The size limit counts these; train.py
    writes this count to metrics.json, and the gate compares it with its own."""
    return sum(carried_numbers(model).values())


class Call(NamedTuple):
    """One torch function or tensor method that forward called, e.g. name "dropout" for F.dropout."""
    name: str
    args: tuple
    kwargs: dict
    out: object


class _Recorder(TorchFunctionMode):
    def __init__(self, alter=None):
        super().__init__()
        self.calls, self.alter = [], alter or {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # the mode is off inside: what func calls is not recorded
        if len(self.calls) in self.alter:
            out = self.alter[len(self.calls)](out, args)
        self.calls.append(Call(getattr(func, "__name__", str(func)).strip("_"), args, kwargs, out))  # a @ b: "matmul"
        return out


@torch.no_grad()
def torch_calls(model, x, alter=None):
    """Runs model(x); returns ([Call] in the order forward made them, the model's output).

    alter: {i: f}: the i-th call's result is replaced by f(result, arguments), to see whether the
    output depends on it (checks.py)."""
    with _Recorder(alter) as recorder:
        out = model(x)
    return recorder.calls, out


def argument(call, position, name, default=None):
    """An argument of a recorded call, whether it was passed by position or by name."""
    if name in call.kwargs:
        return call.kwargs[name]
    return call.args[position] if len(call.args) > position else default

