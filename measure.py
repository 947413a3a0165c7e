"""What the gate measures a model by: the torch calls its forward makes (torch_calls, the op
recorder) and the numbers it carries (count_numbers, the counter). Both are the gate's own code, not
model.py's: a count defined there could be edited to lie. checks.py reads them against rules.py.

The recorder: a TorchFunctionMode records each torch function and tensor method forward calls (the
outermost only): nn.Dropout and F.dropout land on the same record, "dropout". A TorchScript function
at the top of a student's file runs as the Python it was scripted from, so its calls are seen; work
outside torch, a scripted module's insides and C++ extensions are not. An error in forward comes
back as ForwardError.

The counter counts what is reachable (carried_tensors): from the model (parameters, buffers,
attributes, containers, objects, functions' defaults, closures and code), from its classes, the
files that define them and what their functions read, a library's class included. A table is a
tensor, a numpy array or an array.array, text of TEXT_TABLE_FROM characters or more, or
PYTHON_TABLE_FROM Python numbers or more; each counts once. The running statistics that a
batch_norm call in forward reads are let off (forward is run to see which); a tensor that grows
with the batch counts what one image adds. Not seen: numbers loaded from a file or computed in
forward, and what Python's and installed packages' code holds (by_the_student).
"""
import array
import collections
import contextlib
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

# --- the op recorder ---------------------------------------------------------------------------------

# Python's and installed packages' code, and the gate's own, is not the student's: measure.py does not
# walk it, and its TorchScript is left as it is.
_LIBRARY_DIRS = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                                *sysconfig.get_paths().values(), site.getusersitepackages())
                       if p})
_LIBRARY_PACKAGES = ("torch", "numpy", "torchvision", "checks", "measure", "traces", "rules")


def by_the_student(obj):
    """Whether a class, function or module is the student's: defined outside Python's and the
    libraries' files, or in none (a notebook, a module built in memory)."""
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


class Call(NamedTuple):
    """One torch function or tensor method forward called, e.g. name "dropout" for F.dropout."""
    name: str
    args: tuple
    kwargs: dict
    out: object
    func: object = None  # what was called: the gate calls it again to see what it mixes or drops

    def again(self, *args):
        return self.func(*args, **self.kwargs)


class ForwardError(Exception):
    """An error in the model's own forward (the student's, not the gate's): __cause__ is it, with its
    traceback; `when`, the conditions it ran under, where known."""

    def __init__(self, when=None):
        super().__init__()
        self.when = when


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
    """While recording, each @torch.jit.script function at the top of a file defining the model's
    classes is the Python it was scripted from, whose calls the recorder sees."""
    files = {sys.modules.get(type(m).__module__) for m in model.modules()} - {None}
    swapped = [(f, name, v) for f in files if by_the_student(f) for name, v in list(vars(f).items())
               if isinstance(v, torch.jit.ScriptFunction) and callable(getattr(v, "_torchdynamo_inline", None))]
    for f, name, v in swapped:
        setattr(f, name, v._torchdynamo_inline)
    try:
        yield
    finally:
        for f, name, v in swapped:
            setattr(f, name, v)


def torch_calls(model, x, alter=None, grad=False):
    """([Call] in order, output) of model(x), gradients on if grad; forward's errors as ForwardError.
    alter: {i: f}: the i-th call's result is replaced by f(call)."""
    with torch.set_grad_enabled(grad), _torchscript_as_python(model), _Recorder(alter) as recorder:
        try:
            out = model(x)
        except Exception as e:
            raise ForwardError() from e
    return recorder.calls, out


def argument(call, position, name, default=None):
    """An argument of a recorded call, whether it was passed by position or by name."""
    if name in call.kwargs:
        return call.kwargs[name]
    return call.args[position] if len(call.args) > position else default



# --- the counter -------------------------------------------------------------------------------------

# Computed, not learned: let off for every BatchNorm whose statistics a batch_norm call in forward
# reads (affine or not); a BatchNorm that never runs holds a table, not statistics.
BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
PYTHON_TABLE_FROM = 64  # numbers in a list, tuple or dict: a mean and a std are settings, 9,000 a table
TEXT_TABLE_FROM = 256   # characters or bytes: a name is a setting, 48,000 characters of base64 a table
_TEXT = (str, bytes, bytearray)
_DATA = (torch.Tensor, np.ndarray, array.array, *_TEXT, list, tuple, dict)


def size(table):
    """How many numbers a table stores: a float one, a complex two; integer, bool and packed dtypes
    (an int16 holds two int8s) one per byte; text one per character; Python numbers one each."""
    if isinstance(table, torch.Tensor):
        kind = "c" if table.is_complex() else "f" if table.is_floating_point() else "i"
        n, width = (0 if nn.parameter.is_lazy(table) else table.numel()), table.element_size()
    elif isinstance(table, np.ndarray):
        kind, n, width = table.dtype.kind, table.size, table.itemsize
    elif isinstance(table, array.array):
        kind, n, width = "f" if table.typecode in "fd" else "i", len(table), table.itemsize
    else:
        return len(table) if isinstance(table, _TEXT) else _python_numbers(table)
    return n * {"f": 1, "c": 2}.get(kind, width)


def _exempt(module, name, buffer, statistics):
    """A BatchNorm's running statistics and counter, or a buffer, that a batch_norm call read."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or name not in BATCHNORM_STATISTICS:
        return id(buffer) in statistics
    return any(id(getattr(module, s, None)) in statistics for s in BATCHNORM_STATISTICS[:2])


def _python_numbers(value):
    """How many numbers a list, tuple or dict (values, and keys but whole-number indices) holds, if
    only numbers; else 0."""
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
    if isinstance(value, (torch.Tensor, np.ndarray, array.array)):
        return True
    return len(value) >= TEXT_TABLE_FROM if isinstance(value, _TEXT) else _python_numbers(value) >= PYTHON_TABLE_FROM




def _global_names(code):
    """The names a function's code (nested code included) reads."""
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
    """A student's class: every attribute, its student bases' too; a library's: only data (a table
    model.py may have set on nn.Conv2d, say)."""
    for cls in value.__mro__:
        mine = by_the_student(cls)
        for attr, v in vars(cls).items():
            if (mine and (not _dunder(attr) or attr == "__init__")) or (not _dunder(attr) and isinstance(v, _DATA)):
                yield v, f"{_short(cls.__qualname__)}.{attr}"


def _library_attributes(value, names, where, depth=3):
    """The data a student's function reads from a library's module or class (`nn.Identity.BANK`):
    the attributes its code names, `depth` dots deep."""
    for name in names:
        owners = value.__mro__ if isinstance(value, type) else (value,)  # read as stored: no __getattr__
        v = next((vars(owner)[name] for owner in owners if name in vars(owner)), None)
        if isinstance(v, _DATA) and not isinstance(v, (list, tuple, dict)) or _is_table(v):
            yield v, f"{where}.{name}"
        elif depth > 1 and isinstance(v, (type, types.ModuleType)) and not by_the_student(v):
            yield from _library_attributes(v, names, f"{where}.{name}", depth - 1)


def _code_texts(code, doc):
    """Text and bytes written in a function's code (nested code included), its docstring aside."""
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_texts(const, None)
        elif isinstance(const, _TEXT) and const != doc:
            yield const


def _contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a cell not filled yet
        return None


def _function_children(value, where):
    code, defaults = value.__code__, value.__defaults__ or ()
    positional = code.co_varnames[:code.co_argcount]
    for name, v in [*zip(positional[len(positional) - len(defaults):], defaults), *(value.__kwdefaults__ or {}).items()]:
        yield v, f"{where}({name}=...)"
    yield [_contents(cell) for cell in value.__closure__ or ()], f"{where} closure"
    yield list(_code_texts(code, value.__doc__)), f"{where} code"
    module, names = value.__globals__.get("__name__", "?"), sorted(_global_names(code))
    for name in names:
        if name in value.__globals__:
            v = value.__globals__[name]
            yield v, f"{module}.{name}"
            if isinstance(v, (type, types.ModuleType)) and not by_the_student(v):
                yield from _library_attributes(v, names, f"{module}.{name}")


def _object_children(value, at):
    """What any other object keeps (types.SimpleNamespace, a helper's instance), and its class."""
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
            if by_the_student(value) else ()
    if isinstance(value, types.FunctionType):
        return _function_children(value, where) if by_the_student(value) else ()
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
    """{where: table} reachable from roots, breadth first (each named by its shortest path, counted
    once: seen holds ids), and [(where, instance)] of model's class other than model, not walked."""
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
        if isinstance(value, nn.Module):  # let off here: no other path counts them
            seen.update(id(b) for attr, b in value._buffers.items()
                        if b is not None and _exempt(value, attr, b, statistics))
        queue.extend(_children(value, where, statistics))
    return found, copies


def carried_tensors(model, statistics=frozenset()):
    """{where: table} for every table the model carries (a tensor, numpy array, array.array, text, or
    Python numbers), each once, found by reachability: from the model (parameters, buffers,
    attributes, containers, objects, functions' defaults, closures and code), from its classes, the
    files that define them and what their functions read, a library's class included. Statistics
    that batch_norm read are let off (statistics: ids). Another `Net()` at the top of model.py is a
    copy of the model: only what it holds beyond the model counts. Not found: numbers loaded from a
    file or computed in forward."""
    classes = [cls for m in model.modules() for cls in type(m).__mro__ if by_the_student(cls)]
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
    """A copy of model after forward in eval mode on `batch` images (what forward registers is then
    there), and the ids of the tensors its batch_norm calls read as running statistics."""
    model = copy.deepcopy(model).eval()
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch)).to(device)
    with torch.random.fork_rng(devices=[]):
        calls, _ = torch_calls(model, x)
    statistics = {id(argument(call, i, name)) for call in calls if call.name == "batch_norm"
                  for i, name in ((1, "running_mean"), (2, "running_var"))}
    return model, statistics


def carried_numbers(model):
    """{where: how many numbers} the model carries (carried_tensors), after forward in eval mode. A
    tensor whose size follows the batch (`self.cache = x.detach()`) counts what one image adds, as
    "where (per image)": carried, so counted, but the count must not depend on the batch."""
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
    """Every number the model carries: the size rule's count, and metrics.json's."""
    return sum(carried_numbers(model).values())

