"""What forward runs: the gate's op recorder, and whose code is the student's.

torch_calls records, with a TorchFunctionMode, each torch function and tensor method forward calls
(the outermost only): nn.Dropout and F.dropout land on the same record, "dropout". A TorchScript
function at the top of a student's file runs as the Python it was scripted from, so its calls are
seen; work outside torch, a scripted module's insides and C++ extensions are not. An error in
forward comes back as ForwardError, with the Conditions it ran under where known.
"""
import contextlib
import os
import site
import sys
import sysconfig
import types
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.overrides import TorchFunctionMode

# Python's and installed packages' code, and the gate's own, is not the student's: measure.py does not
# walk it, and its TorchScript is left as it is.
_LIBRARY_DIRS = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                                *sysconfig.get_paths().values(), site.getusersitepackages())
                       if p})
_LIBRARY_PACKAGES = ("torch", "numpy", "torchvision", "checks", "measure", "probe", "traces", "rules")


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


@dataclass(frozen=True)
class Conditions:
    """How forward is run: the mode, the batch, gradients on or off, and which state of the model."""
    label: str      # how a refusal under them starts ("" for the first training call)
    training: bool
    batch: int
    grad: bool
    start: str      # "fresh": the model as built; "warm": after WARM_UP_CALLS training calls; "scored":
                    # a fresh model holding the warm one's state, as the gate loads a checkpoint

    @property
    def mode(self):
        return "training" if self.training else "eval"


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


class RectifiersPassThrough(TorchFunctionMode):
    """Forward as a wiring diagram: rectifiers, dropout and detach pass their input through (a unit
    dead at initialisation still connects its inputs)."""

    PASS_THROUGH = {"relu", "relu6", "hardtanh", "detach", "dropout", "dropout1d", "dropout2d", "dropout3d",
                    "alpha_dropout", "feature_alpha_dropout"}

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
    """The tensors a call returned: one, or a tuple's (x.chunk)."""
    out = call.out
    return [t for t in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(t, torch.Tensor)]


def feeding(calls, out):
    """The indices of the calls the output is computed from."""
    on_path, needed = set(), {id(out)}
    for i in reversed(range(len(calls))):
        if any(id(t) in needed for t in outputs(calls[i])):
            on_path.add(i)
            needed.update(id(t) for t in tensors_in(calls[i]))
    return on_path


def replayed(calls, chain, source, new_source):
    """The last of chain's calls (indices) made again, source replaced by new_source (and so on)."""
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
