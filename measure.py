"""What the gate measures a model by: the torch operations one forward pass runs (torch_calls) and
the numbers the model carries (carried_numbers). They live apart from model.py, the file a student
edits: a count defined there could be edited to lie. checks.py reads both against rules.py.

How the gate sees what forward runs (torch_calls): a TorchFunctionMode is active for one forward
pass and records each torch function and tensor method that the model's code calls, with its
arguments and result. A module and its functional form land on the same record: nn.Dropout calls
F.dropout, nn.BatchNorm2d calls F.batch_norm, nn.AdaptiveAvgPool2d calls F.adaptive_avg_pool2d,
nn.Linear calls F.linear. Only the outermost call is recorded, not what torch runs inside it.

A TorchScript function (@torch.jit.script) that model.py's code calls is run as the Python it
was scripted from while the gate records, so its torch calls are seen. What it cannot see: work done
outside torch (numpy, Python arithmetic on lists), a scripted module's insides, and a custom autograd
Function's or C++ extension's insides.
"""
import array
import contextlib
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
# are let off for every BatchNorm whose statistics a batch_norm call in forward uses (affine or
# not, module or F.batch_norm): a BatchNorm that never runs holds a table, not statistics.
BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
# A floating-point value is one number, a complex one two (its real and imaginary parts). Integer,
# bool and other packed dtypes count by their bytes: an int16 can hold two int8 numbers.
_REAL_PARTS = {True: 2, False: 1}


def storage_numbers(t):
    """How many numbers a tensor or numpy array stores (a lazy layer's weights before its first
    forward pass: none yet)."""
    if isinstance(t, torch.Tensor):
        if nn.parameter.is_lazy(t):
            return 0
        floating, complex_, n, width = t.is_floating_point(), t.is_complex(), t.numel(), t.element_size()
    else:
        floating, complex_ = t.dtype.kind == "f", t.dtype.kind == "c"
        n, width = t.size, t.itemsize
    if floating or complex_:
        return n * _REAL_PARTS[complex_]
    return n * width


def size(table):
    """How many numbers a table holds: a tensor, a numpy array or array.array by storage; text and
    bytes one per character or byte; a list, tuple or dict of Python numbers one per number."""
    if isinstance(table, (torch.Tensor, np.ndarray)):
        return storage_numbers(table)
    if isinstance(table, array.array):
        return len(table) * (1 if table.typecode in "fd" else table.itemsize)
    if isinstance(table, (str, bytes, bytearray, memoryview)):
        return len(table) if not isinstance(table, memoryview) else table.nbytes
    return _python_numbers(table)


def _exempt(module, name, buffer, statistics):
    """BatchNorm's running statistics and counter, when a batch_norm call used them (statistics:
    the ids of the tensors batch_norm calls read as running statistics)."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or name not in BATCHNORM_STATISTICS:
        return id(buffer) in statistics
    return any(id(getattr(module, s, None)) in statistics for s in BATCHNORM_STATISTICS[:2])


# Python numbers typed into model.py count as a table once a list or tuple holds this many: channel
# widths or a mean and a std are settings, a 9,000-number list made a tensor in forward is a table.
PYTHON_TABLE_FROM = 64
# Where Python and installed packages live: their classes, functions and modules are not the
# student's, and the walk does not go into them (torch's own globals are no table of the model's).
_LIBRARY_DIRS = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                                *sysconfig.get_paths().values(), site.getusersitepackages())
                       if p})
_LIBRARY_PACKAGES = ("torch", "numpy", "torchvision", "checks", "measure", "rules")  # and the gate's own


# Text or bytes count as a table from this length: a name or a format string is a setting, 48,000
# characters of base64 are a table of weights.
TEXT_TABLE_FROM = 256
_TEXT = (str, bytes, bytearray)
_DATA = (torch.Tensor, np.ndarray, array.array, *_TEXT, list, tuple, dict)


def _python_numbers(value):
    """How many numbers a list, tuple or dict holds (a dict: its values, and its keys that are not
    whole numbers, which only index), nested ones included, if it holds only numbers; else 0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 1
    if isinstance(value, dict):
        keys = [k for k in value if not isinstance(k, int)]
        return _python_numbers([*keys, *value.values()]) if value else 0
    if not isinstance(value, (list, tuple)):
        return 0
    total = 0
    for item in value:
        n = _python_numbers(item)
        if not n:
            return 0
        total += n
    return total


def _is_table(value):
    """Whether a value is a table of numbers in itself, counted whole."""
    if isinstance(value, (torch.Tensor, np.ndarray, array.array)):
        return True
    if isinstance(value, _TEXT):
        return len(value) >= TEXT_TABLE_FROM
    return _python_numbers(value) >= PYTHON_TABLE_FROM


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


def _dunder(attr):
    return attr.startswith("__") and attr.endswith("__")


def _module_children(value, at, statistics):
    for attr, p in value._parameters.items():
        yield p, at(attr)
    for attr, b in value._buffers.items():
        if b is not None and not _exempt(value, attr, b, statistics):
            yield b, at(attr)
    for attr, m in value._modules.items():
        yield m, at(attr)
    for attr, v in vars(value).items():
        if attr not in ("_parameters", "_buffers", "_modules"):
            yield v, at(attr)
    yield type(value), ""


def _class_children(value):
    """A student's class: every attribute of it and of its student bases. A library's class (torch's
    nn.Conv2d, say): only the data it holds, a table model.py may have set on it."""
    for cls in value.__mro__:
        mine = _students(cls)
        for attr, v in vars(cls).items():
            if (mine and (not _dunder(attr) or attr == "__init__")) or (not _dunder(attr) and isinstance(v, _DATA)):
                yield v, f"{_short(cls.__qualname__)}.{attr}"


def _library_attributes(value, names, where, depth=3):
    """What a student's function reads from a library's module or class (`nn.Identity.BANK`): the
    attributes its code names, followed `depth` dots deep; only data, not the library's code."""
    for name in names:
        owners = value.__mro__ if isinstance(value, type) else (value,)  # read as stored: no __getattr__
        v = next((vars(owner)[name] for owner in owners if name in vars(owner)), None)
        if isinstance(v, _DATA) and not isinstance(v, (list, tuple, dict)) or _is_table(v):
            yield v, f"{where}.{name}"
        elif depth > 1 and isinstance(v, (type, types.ModuleType)) and not _students(v):
            yield from _library_attributes(v, names, f"{where}.{name}", depth - 1)


def _code_texts(code, doc):
    """Text and bytes written in a function's code (its docstring aside), nested code included."""
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_texts(const, None)
        elif isinstance(const, _TEXT) and const != doc:
            yield const


def _function_children(value, where):
    code, defaults = value.__code__, value.__defaults__ or ()
    positional = code.co_varnames[:code.co_argcount]
    for name, v in [*zip(positional[len(positional) - len(defaults):], defaults), *(value.__kwdefaults__ or {}).items()]:
        yield v, f"{where}({name}=...)"
    yield [_contents(cell) for cell in value.__closure__ or ()], f"{where} closure"
    yield list(_code_texts(code, value.__doc__)), f"{where} code"
    # The globals it reads: a table in a helper's own file is reachable through it.
    module, names = value.__globals__.get("__name__", "?"), sorted(_global_names(code))
    for name in names:
        if name in value.__globals__:
            v = value.__globals__[name]
            yield v, f"{module}.{name}"
            if isinstance(v, (type, types.ModuleType)) and not _students(v):
                yield from _library_attributes(v, names, f"{module}.{name}")


def _object_children(value, at):
    """Any other object: what it keeps (types.SimpleNamespace, a helper class's instance), and its class."""
    for attr, v in (getattr(value, "__dict__", None) or {}).items():
        yield v, at(attr)
    for attr in getattr(type(value), "__slots__", ()):
        if isinstance(attr, str) and hasattr(value, attr):
            yield getattr(value, attr), at(attr)
    yield type(value), ""


def _children(value, where, statistics):
    """(child, where) for what value holds that the walk goes on into."""
    def at(attr):
        return f"{where}.{attr}" if where else attr

    if isinstance(value, nn.Module):
        return _module_children(value, at, statistics)
    if isinstance(value, dict):
        return ((v, f"{where}[{k!r}]") for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        return ((v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, type):
        return _class_children(value)
    if isinstance(value, types.ModuleType):
        return ((v, f"{value.__name__}.{a}") for a, v in vars(value).items() if not _dunder(a)) \
            if _students(value) else ()
    if isinstance(value, types.FunctionType):
        return _function_children(value, where) if _students(value) else ()
    if isinstance(value, (staticmethod, classmethod, types.MethodType)):
        return ((v, where) for v in (value.__func__, getattr(value, "__self__", None)))
    if isinstance(value, property):
        return ((f, where) for f in (value.fget, value.fset, value.fdel))
    if isinstance(value, functools.partial):
        return ((value.func, where), (value.args, f"{where} args"), (value.keywords, f"{where} args"))
    if isinstance(value, (*_TEXT, int, float, complex, bool, type(None), torch.dtype, torch.device)):
        return ()
    return _object_children(value, at)


def _walk(roots, seen, model=None, statistics=frozenset()):
    """{where: table} of every table of numbers (_is_table) reachable from roots, breadth first, so
    each is named by its shortest path, and each counted once (seen: ids).

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
        if _is_table(value):
            name, n = where or "?", 1
            while name in found:  # two defaults of one function, say
                name, n = f"{where} ({n})", n + 1
            found[name] = value
            continue
        if isinstance(value, nn.Module):  # let off here, so that no other path to them counts them either
            seen.update(id(b) for attr, b in value._buffers.items()
                        if b is not None and _exempt(value, attr, b, statistics))
        queue.extend(_children(value, where, statistics))
    return found, copies


def carried_tensors(model, statistics=frozenset()):
    """{where: table} for every table of numbers the model carries, each once: a tensor, a numpy
    array, an array.array, a list, tuple or dict of at least PYTHON_TABLE_FROM Python numbers, or
    text or bytes of at least TEXT_TABLE_FROM characters. Found by reachability:

    - from the model: parameters (trainable or frozen), buffers (persistent or not), plain
      attributes, and what they hold: containers of any kind, other objects' attributes
      (types.SimpleNamespace, a helper class's instance), functions' defaults and closure cells (a
      lambda kept on the model);
    - from the classes of its modules and their base classes: class attributes and their functions'
      defaults, closures and the globals they read;
    - from the Python files that define those classes: every top-level name (a helper class, a
      helper function's default, a list of numbers, an instance of a sub-block called in forward);
    - text and bytes written in the student's functions, and data that they read from a library's
      module or class, or that model.py set on a library class the model uses.

    BatchNorm's running statistics and batch counter are let off where a batch_norm call used them
    (statistics: their ids; BATCHNORM_STATISTICS). Another instance of the model's own class (a notebook-style
    `model = Net()` at the top of model.py) is a copy of the model, not a table: only what it holds
    beyond what the model holds by the same name counts.

    What cannot be found: numbers loaded from a file, or computed, inside forward.
    """
    classes = [cls for m in model.modules() for cls in type(m).__mro__ if _students(cls)]
    files = [sys.modules[cls.__module__] for cls in classes if cls.__module__ in sys.modules]
    seen = set()
    roots = [(model, ""), *((cls, "") for cls in dict.fromkeys(classes)), *((f, "") for f in dict.fromkeys(files))]
    found, copies = _walk(roots, seen, model, statistics)
    for where, other in copies:  # last: a table both it and a global reach is the global's
        seen.discard(id(other))
        theirs, _ = _walk([(other, "")], seen, statistics=statistics)
        own = {**{name: size(b) for name, b in model.named_buffers()}, **{name: size(t) for name, t in found.items()}}
        found.update({f"{where}.{name}": t for name, t in theirs.items() if own.get(name) != size(t)})
    return found


def _run_copy(model, batch):
    """A copy of model after forward in eval mode on `batch` random images, so that what forward
    creates or registers (a lazy layer's weights, a buffer added in forward, a cache) is there, and
    the ids of the tensors that forward's batch_norm calls read as running statistics."""
    model = copy.deepcopy(model).eval()
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch)).to(device)
    with torch.random.fork_rng(devices=[]):
        calls, _ = torch_calls(model, x)
    statistics = {id(argument(call, i, name)) for call in calls if call.name == "batch_norm"
                  for i, name in ((1, "running_mean"), (2, "running_var"))}
    return model, statistics


def carried_numbers(model):
    """{where: how many numbers} the model carries (carried_tensors), measured on copies after a
    forward pass in eval mode.

    A tensor whose size follows the batch (activations kept by forward, `self.cache = x.detach()`)
    counts what one image adds to it, under the name "where (per image)". Such a tensor is carried
    from call to call, so it is counted rather than let off (forward could read it as a table);
    per image, because its size is the last batch's and the count must not depend on the batch:
    training's last batch, the gate's 4 images and scoring's 1,000 give the same count."""
    two, three = ({name: size(t) for name, t in carried_tensors(*_run_copy(model, n)).items()} for n in (2, 3))
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
    func: object = None  # what was called: the gate calls it again to see what it mixes or drops

    def again(self, *args):
        """The call made again on other arguments (the same keywords)."""
        return self.func(*args, **self.kwargs)


class ForwardError(Exception):
    """An error raised inside the model's own forward while the gate ran it: the student's, not the
    gate's. Its __cause__ is the error, with the traceback that points at the student's line; `when`
    the conditions it ran under, where the caller knows them."""

    when = None

    @classmethod
    def under(cls, when):
        error = cls()
        error.when = when
        return error


class _Recorder(TorchFunctionMode):
    def __init__(self, alter=None):
        super().__init__()
        self.calls, self.alter = [], alter or {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # the mode is off inside: what func calls is not recorded
        call = Call(getattr(func, "__name__", str(func)).strip("_"), args, kwargs, out, func)  # a @ b: "matmul"
        if len(self.calls) in self.alter:
            call = call._replace(out=self.alter[len(self.calls)](call))
        self.calls.append(call)
        return call.out


@contextlib.contextmanager
def _torchscript_as_python(model):
    """While the gate records: each TorchScript function (@torch.jit.script) at the top level of a
    student's file that defines the model's classes is the Python function it was scripted from,
    whose torch calls the recorder sees. Put back afterwards."""
    files = {sys.modules.get(type(m).__module__) for m in model.modules()} - {None}
    swapped = [(f, name, v) for f in files if _students(f) for name, v in list(vars(f).items())
               if isinstance(v, torch.jit.ScriptFunction) and callable(getattr(v, "_torchdynamo_inline", None))]
    for f, name, v in swapped:
        setattr(f, name, v._torchdynamo_inline)
    try:
        yield
    finally:
        for f, name, v in swapped:
            setattr(f, name, v)


def torch_calls(model, x, alter=None, grad=False):
    """Runs model(x), with gradients recorded if grad; returns ([Call] in the order forward made
    them, the model's output). An error that forward raises comes out as ForwardError.

    alter: {i: f}: the i-th call's result is replaced by f(call), to see whether the output depends
    on it, or on what it draws (checks.py)."""
    with torch.set_grad_enabled(grad), _torchscript_as_python(model), _Recorder(alter) as recorder:
        try:
            out = model(x)
        except Exception as e:
            raise ForwardError(str(e)) from e
    return recorder.calls, out


class RectifiersPassThrough(TorchFunctionMode):
    """Forward as a wiring diagram: ReLU and its clipped kin, dropout and detach pass their input
    through, so a unit dead at initialisation still connects its inputs to the output."""

    PASS_THROUGH = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "detach", "dropout", "dropout1d", "dropout2d",
                    "dropout3d", "alpha_dropout", "feature_alpha_dropout"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "").strip("_") in self.PASS_THROUGH and args and isinstance(args[0], torch.Tensor):
            return args[0]
        return func(*args, **(kwargs or {}))


def argument(call, position, name, default=None):
    """An argument of a recorded call, whether it was passed by position or by name."""
    if name in call.kwargs:
        return call.kwargs[name]
    return call.args[position] if len(call.args) > position else default



def tensors_in(call):
    values = [*call.args, *call.kwargs.values()]
    return [t for v in values for t in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(t, torch.Tensor)]


def outputs(call):
    """The tensors a call returned: one, or each of a tuple's (x.chunk, F.max_pool2d's indices)."""
    out = call.out
    return [t for t in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(t, torch.Tensor)]


def feeding(calls, out):
    """The indices of the calls that the output is computed from, found walking back from it."""
    on_path, needed = set(), {id(out)}
    for i in reversed(range(len(calls))):
        if any(id(t) in needed for t in outputs(calls[i])):
            on_path.add(i)
            needed.update(id(t) for t in tensors_in(calls[i]))
    return on_path


def replayed(calls, chain, source, new_source):
    """The last of `chain`'s calls (indices into calls) made again with source replaced by
    new_source and what each call of the chain made replaced by what it makes again."""
    new = {id(source): new_source}

    def swap(v):
        if isinstance(v, (list, tuple)):
            return type(v)(swap(u) for u in v)
        return new.get(id(v), v) if isinstance(v, torch.Tensor) else v

    out = None
    for i in chain:
        call = calls[i]
        out = call.func(*swap(call.args), **{k: swap(v) for k, v in call.kwargs.items()})
        new.update(zip(map(id, outputs(call)), outputs(call._replace(out=out))))
    return out
