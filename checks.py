"""How the gate judges a model against the assignment's rules (rules.py): by the torch operations
its forward pass runs (measure.torch_calls), the numbers it carries (measure.carried_numbers) and
the input pixels each logit depends on. test_model.py applies check_architecture to model.py's Net;
train.py applies it before the first epoch, so a refusal shows in seconds, not after training.

Every verdict is the same on every run: the checks run on a copy of the model whose random weights
are redrawn from a fixed seed, on fixed inputs, with dropout's masks drawn from a fixed seed.
"""
import copy
import inspect

import torch
from torch.overrides import TorchFunctionMode

from rules import CLASSES, FULLY_CONNECTED, PARAMS_BELOW

CLASSIFIER_AFTER_GAP = FULLY_CONNECTED != "nowhere"  # rules.FULLY_CONNECTED: "anywhere" is not implemented yet
from measure import BATCHNORM_STATISTICS, argument, carried_numbers, torch_calls

# How the recorded torch calls (measure.torch_calls) are read. Modules and their functional forms
# record the same name: nn.Dropout and F.dropout are both "dropout".
BATCH_NORM = "batch_norm"
DROPOUT_TRAINS_BY_DEFAULT = {"dropout": True, "dropout1d": True, "dropout2d": True, "dropout3d": True,
                             "alpha_dropout": False, "feature_alpha_dropout": False}
RESHAPES = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose"}
# Change no value (or only its precision): a cast, a copy, a move to another device.
VALUE_PRESERVING = {"contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type", "type_as", "cpu",
                    "cuda"}
OUTPUT_NORMALISERS = {"softmax", "log_softmax"}
CLASSIFIERS = {"linear", "conv2d"}  # nn.Linear / F.linear; nn.Conv2d / F.conv2d, 1x1 only
# A product of the activations with a matrix of the model's own: a fully-connected layer, whichever
# way it is spelled (a product of two activations, as in attention, is not one).
MATRIX_PRODUCTS = {"linear", "matmul", "rmatmul", "mm", "bmm", "einsum", "addmm", "tensordot", "inner", "mv"}
BATCH = 4  # images in the traced forward passes
SEED = 0


class Refusal(AssertionError):
    """The gate's verdict on a model that breaks a rule: one line that says what to do. An
    AssertionError, as pytest reports a failed check; raised, not asserted, so `python -O` keeps it."""


class Unusable(Refusal):
    """A model that cannot be trained, counted or scored as it is (forward raises, or the output is
    not (N, 10) for every N): train.py stops on it before the first epoch."""


def require(condition, message, kind=Refusal):
    if not condition:
        raise kind(message)


def one_line(error):
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# --- the model under judgement: model.py's Net ----------------------------------------------------

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


# --- the forward pass, recorded ---------------------------------------------------------------------

def tensors_in(call):
    values = [*call.args, *call.kwargs.values()]
    return [t for v in values for t in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(t, torch.Tensor)]


def outputs(call):
    """The tensors a call returned: one, or each of a tuple's (x.chunk, F.max_pool2d's indices)."""
    out = call.out
    return [t for t in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(t, torch.Tensor)]


def spatial(t):
    """H * W of a map (N, C, H, W) or of a flattened one (N, C, L); 1 for anything else."""
    return t.shape[2] * (t.shape[3] if t.dim() == 4 else 1) if t.dim() in (3, 4) else 1


def mean_dims(call, x):
    dims = argument(call, 1, "dim", call.kwargs.get("axis"))  # torch takes axis= as another name for dim=
    if dims is None or not isinstance(dims, (int, tuple, list)):
        return None
    return {d % x.dim() for d in ((dims,) if isinstance(dims, int) else dims)}


class Trace:
    """One forward pass of a fresh copy of the model, in training or eval mode, recorded, and what
    the rules read from it:

    - image: the tensors computed from the input (the rest are the model's constants);
    - point: those that hold one value per channel at most, whatever their shape: a 1x1 map, a
      pooled vector, and what is computed from them alone (padded, expanded, upsampled, convolved,
      through a Linear or a ReLU): a map made so is still a 1x1 map;
    - region: {id: (H, W)} for a tensor whose last axis, averaged, averages an H x W map: the map
      flattened to (N, C, H*W), or already averaged over its rows (x.mean(3)).
    """

    def __init__(self, model, training):
        self.model, self.training = model, training
        self.mode = "training" if training else "eval"
        self.x = torch.rand(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(SEED))
        self.calls, self.out, fed = self.run()
        self.path = feeding(self.calls, self.out)
        self.image, self.point, self.region, self.pools = {id(fed)}, set(), {}, {}
        for i, call in enumerate(self.calls):
            self.read(i, call)
        self.matter = {}

    def run(self, alter=None):
        """The model's calls and output on the same input, with the same dropout masks, every time."""
        model, x = copy.deepcopy(self.model).train(self.training), self.x.clone()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return (*torch_calls(model, x, alter), x)

    def read(self, i, call):
        ins = [t for t in tensors_in(call) if id(t) in self.image]
        if not ins:
            return
        hw = self.pool_size(call, ins)
        if hw:
            self.pools[i] = hw
        for t in outputs(call):
            self.image.add(id(t))
            reduced = any(s.dim() in (3, 4) and t.shape[:2] == s.shape[:2] and spatial(s) > 1 for s in ins)
            if hw or all(id(s) in self.point for s in ins) or (t.dim() in (2, 3, 4) and spatial(t) == 1 and
                                                                 (reduced or t.dim() == 4)):
                self.point.add(id(t))
        x, out = call.args[0] if call.args and isinstance(call.args[0], torch.Tensor) else ins[0], call.out
        if not isinstance(out, torch.Tensor) or hw:
            return
        if call.name in RESHAPES and x.dim() == 4 and out.dim() == 3 and out.shape[:2] == x.shape[:2]:
            self.region[id(out)] = tuple(x.shape[2:])  # x.view(n, c, -1)
        elif call.name == "mean" and x.dim() == 4 and mean_dims(call, x) in ({2}, {3}):
            self.region[id(out)] = tuple(x.shape[2:])  # x.mean(3): a mean over rows, a step to the map's mean
        elif call.name in VALUE_PRESERVING and id(x) in self.region:
            self.region[id(out)] = self.region[id(x)]

    def pool_size(self, call, ins):
        """The (H, W) of the map that a call averages to one value per channel, or None if it is no
        such pool: adaptive_avg_pool2d to 1x1, avg_pool2d with a window over the whole map, a mean
        over H and W (in one call or two), or over the last axis of a map viewed as (N, C, H*W). A map
        made from a 1x1 one (padded, expanded, upsampled) counts as 1x1, as does one that is the
        same at every position."""
        x = call.args[0] if call.args else call.kwargs.get("input")
        if not (isinstance(x, torch.Tensor) and x.dim() in (3, 4) and isinstance(call.out, torch.Tensor)
                and id(x) in {id(t) for t in ins}):
            return None
        hw = self.region.get(id(x), tuple(x.shape[2:]) if x.dim() == 4 else (x.shape[2], 1))
        pooled = None
        if call.name == "mean":
            dims = mean_dims(call, x)
            whole = {d for d in (2, 3)[:x.dim() - 2] if x.shape[d] > 1} or {x.dim() - 1}
            full = {2, 3} if x.dim() == 4 else {2}
            if dims is not None and ((dims == full and x.dim() == 4) or (id(x) in self.region and whole <= dims <= full)):
                pooled = hw
        elif call.name in ("adaptive_avg_pool2d", "adaptive_avg_pool1d") and call.out.shape[2:] == (1,) * (x.dim() - 2):
            pooled = hw if x.dim() == 4 or id(x) in self.region else None
        elif call.name in ("avg_pool2d", "avg_pool1d"):
            kernel, padding = argument(call, 1, "kernel_size"), argument(call, 3, "padding", 0)
            kernel = (kernel,) * (x.dim() - 2) if isinstance(kernel, int) else tuple(kernel)
            if all(k >= n for k, n in zip(kernel, x.shape[2:])) and padding in (0, (0,), (0, 0), [0], [0, 0]) and \
                    (x.dim() == 4 or id(x) in self.region):
                pooled = hw
        if pooled is None:
            return None
        if id(x) in self.point or (x.numel() and bool((x.flatten(2).amax(2) == x.flatten(2).amin(2)).all())):
            return (1, 1)
        return pooled

    def matters(self, i):
        """Whether the output changes when the i-th call's result is changed: what is computed and
        then multiplied by zero, or thrown away, does not count as run."""
        if i not in self.path:
            return False
        if i not in self.matter:
            _, out, _ = self.run({i: perturbed})
            same = isinstance(out, torch.Tensor) and out.shape == self.out.shape and \
                torch.equal(out.nan_to_num(), self.out.nan_to_num())
            self.matter[i] = not same
        return self.matter[i]


def perturbed(out, args):
    """out with noise added, in place if the call was in place (its result may go unread)."""
    if not (isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel()):
        return out
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(SEED + 1)).to(out) * \
        (out.detach().abs().mean().nan_to_num() + 1)
    if any(out is a for a in args):
        return out.add_(noise)
    return out + noise


def feeding(calls, out):
    """The indices of the calls that the output is computed from, found walking back from it: a layer
    whose result is thrown away does not count. (Trace.matters then asks whether it changes it.)"""
    on_path, needed = set(), {id(out)}
    for i in reversed(range(len(calls))):
        if any(id(t) in needed for t in outputs(calls[i])):
            on_path.add(i)
            needed.update(id(t) for t in tensors_in(calls[i]))
    return on_path


def drops(call):
    """Whether a recorded call is a dropout that drops: p > 0, in training mode."""
    if call.name not in DROPOUT_TRAINS_BY_DEFAULT:
        return False
    training = call.kwargs.get("train", argument(call, 2, "training", DROPOUT_TRAINS_BY_DEFAULT[call.name]))
    p = argument(call, 1, "p", 0.5)
    return isinstance(p, (int, float)) and p > 0 and bool(training)


def reshapes(call):
    """Whether a call only rearranges the values it is given (x[:, :, 0, 0] on a 1x1 map included),
    or changes none of them (a cast, a copy)."""
    if call.name == "getitem":
        return isinstance(call.out, torch.Tensor) and call.out.numel() == call.args[0].numel()
    return call.name in RESHAPES | VALUE_PRESERVING


# --- the rules ------------------------------------------------------------------------------------

NO_GAP = ("no global average pooling ran in forward: use nn.AdaptiveAvgPool2d(1), nn.AvgPool2d over the whole map, "
          "F.adaptive_avg_pool2d(x, 1) or x.mean((2, 3))")


def check_head(trace):
    """A global average pool over a map larger than 1x1 feeds the output, and what runs between the
    two is parameter-free (reshapes, casts, dropout, softmax / log_softmax) but for one optional
    classifier. Before it, a fully-connected layer may only act on a pooled vector."""
    calls, pools = trace.calls, trace.pools
    require(pools, NO_GAP)
    gaps = [i for i, (h, w) in pools.items() if h * w > 1]
    require(gaps, f"the average pool maps {tuple(pools[max(pools)])} to (1, 1): it must pool a map larger than 1x1 "
                  "(a 1x1 map padded, expanded or upsampled is still 1x1)")
    gap = next((i for i in reversed(gaps) if trace.matters(i)), None)
    require(gap is not None, "the output does not come from the global average pool")
    # gap: the last pool the output comes from; what runs before it is the body of the net. There a
    # Linear (or a matrix product) may act on a pooled vector (a squeeze-and-excitation gate, say),
    # not on a map: flatten -> nn.Linear -> view -> pool is a fully-connected head with a pool for show.
    for i, call in enumerate(calls[:gap]):
        if call.name in MATRIX_PRODUCTS:
            ins = [t for t in tensors_in(call) if id(t) in trace.image]
            if len(ins) == 1 and id(ins[0]) not in trace.point and trace.matters(i):
                layer = "nn.Linear" if call.name == "linear" else f"`{call.name}` (a fully-connected layer)"
                raise Refusal(f"{layer} runs on a map before the global average pool: a fully-connected layer may "
                              "only classify the pooled vector")
    allowed = "reshapes, casts, dropout, softmax or log_softmax" + \
              (" and one classifier (nn.Linear or a 1x1 conv)" if CLASSIFIER_AFTER_GAP else "")
    pooled, classifiers = {id(calls[gap].out)}, 0
    for i in range(gap + 1, len(calls)):
        call = calls[i]
        if i not in trace.path or not any(id(t) in pooled for t in tensors_in(call)):
            continue  # work the output does not depend on, or on another branch that joins later
        pooled.update(id(t) for t in outputs(call))
        if reshapes(call) or call.name in OUTPUT_NORMALISERS | set(DROPOUT_TRAINS_BY_DEFAULT) or not trace.matters(i):
            continue
        require(call.name in CLASSIFIERS, f"`{call.name}` runs after the global average pool: only {allowed} may follow it")
        require(CLASSIFIER_AFTER_GAP, f"`{call.name}` runs after the global average pool: these rules allow no classifier there")
        weight = argument(call, 1, "weight")
        kernel = tuple(weight.shape[-2:]) if call.name == "conv2d" and isinstance(weight, torch.Tensor) else (1, 1)
        require(kernel == (1, 1), f"a {kernel[0]}x{kernel[1]} conv runs after the global average pool: only a 1x1 conv "
                                  "or nn.Linear may classify the pooled map")
        classifiers += 1
        require(classifiers == 1, f"{classifiers} layers run after the global average pool: {allowed} may follow it")


def check_parts(trace):
    """BatchNorm and a dropout that drops each run in training mode, and the output depends on them."""
    require(any(trace.calls[i].name == BATCH_NORM and trace.matters(i) for i in sorted(trace.path)),
            "no BatchNorm ran in forward (nn.BatchNorm2d or F.batch_norm; one defined but not called, or whose "
            "result does not change the output, does not count)")
    require(any(drops(trace.calls[i]) and trace.matters(i) for i in sorted(trace.path)),
            "no Dropout with p > 0 ran in forward in training mode (nn.Dropout, nn.Dropout2d, or "
            "F.dropout(x, p, training=self.training); one whose result does not change the output does not count)")


class _Connections(TorchFunctionMode):
    """Forward as a wiring diagram: ReLU and its clipped kin, dropout and detach pass their input
    through (a unit dead at initialisation still connects its inputs to the output), and every call
    records gradients, even inside `with torch.no_grad():` (an input normalised there is still
    the input)."""

    PASS_THROUGH = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "detach", *DROPOUT_TRAINS_BY_DEFAULT}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "").strip("_") in self.PASS_THROUGH and args and isinstance(args[0], torch.Tensor):
            return args[0]
        with torch.enable_grad():
            return func(*args, **(kwargs or {}))


def blind_pixels(model):
    """For each logit, the input pixels it does not depend on in eval mode, found by gradients of a
    copy (with rectifiers passing everything through), not read off the layers."""
    model = copy.deepcopy(model).eval()
    pixels = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(SEED), requires_grad=True)
    try:
        with _Connections(), torch.random.fork_rng(devices=[]):
            logits = model(pixels * 1)  # not the leaf itself: forward may change its input in place
        grads = [torch.autograd.grad(logits[:, k].sum(), pixels, retain_graph=True, allow_unused=True)[0]
                 for k in range(logits.shape[1])] if logits.requires_grad else [None] * logits.shape[1]
    except RuntimeError:  # torch.inference_mode, say: no gradient reaches the input
        grads = [None] * CLASSES
    return [784 if g is None else int((g.abs().sum(0) == 0).sum()) for g in grads]


def check_whole_image(model):
    for k, blind in enumerate(blind_pixels(model)):
        require(blind == 0, f"logit {k} ignores {blind} of the 784 input pixels: every logit must see the whole image" +
                (" (no gradient reaches the input: don't compute the logits from .numpy(), .item() or under "
                 "torch.inference_mode())" if blind == 784 else ""))


def check_size(model):
    """Counts every number the model carries, not only model.parameters(): a buffer or a tensor
    kept on the side is as much a learned table as a weight is (measure.carried_numbers)."""
    try:
        carried = carried_numbers(model)
    except Exception as e:
        raise Unusable(f"the numbers the model carries could not be counted: forward in eval mode on 2 and 3 "
                       f"images raised {one_line(e)}") from e
    total = sum(carried.values())

    def named(items):
        return ", ".join(f"{name} {n:,}" for name, n in sorted(items, key=lambda item: -item[1])[:3])

    # The three largest tables, and the largest of what is not a parameter: a buffer, a table kept
    # on the side or a cache can be what tips the count, and is the easiest to miss.
    parameters = {name for name, _ in model.named_parameters()}
    others = named((name, n) for name, n in carried.items() if name not in parameters)
    require(total < PARAMS_BELOW, f"{total:,} parameters and other carried numbers; the rule is fewer than "
                                  f"{PARAMS_BELOW:,} (largest: {named(carried.items())}" +
                                  (f"; not parameters: {others})" if others else ")"))
    return total


SQUEEZE_HINT = " (x.squeeze() drops the batch dimension of a single image: use x.flatten(1))"


def check_runs(model):
    """The model runs and returns (N, 10) for a batch of several images in training mode, and for
    several and for one in eval mode (scoring may feed one image at a time)."""
    for training, n in ((True, BATCH), (False, BATCH), (False, 1)):
        mode = "training" if training else "eval"
        images = "1 image" if n == 1 else f"{n} images"
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                out = copy.deepcopy(model).train(training)(torch.rand(n, 1, 28, 28))
        except Exception as e:
            raise Unusable(f"forward raised {one_line(e)} on {images} in {mode} mode" +
                           (f", though it ran on {BATCH}{SQUEEZE_HINT}" if n == 1 else "")) from e
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        hint = SQUEEZE_HINT if n == 1 and isinstance(out, torch.Tensor) and out.numel() == CLASSES else ""
        require(shape == (n, CLASSES), f"output {shape} for {images} in {mode} mode, expected ({n}, {CLASSES}): "
                                       f"logits or log-probabilities{hint}", Unusable)


def redrawn(model):
    """A copy of model, its lazy layers built, with every weight that is random at construction
    redrawn from a fixed seed at a fixed scale (1 / sqrt(fan-in)): the checks then give the same
    verdict on every run, whatever weights the model was built with. Constant weights (BatchNorm's
    ones and zeros) stay as they are."""
    model = copy.deepcopy(model)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model.eval()(torch.zeros(2, 1, 28, 28))  # a lazy layer gets its weights here
        generator = torch.Generator().manual_seed(SEED)
        tables = [*model.parameters(), *(b for name, b in model.named_buffers()
                                         if name.rsplit(".", 1)[-1] not in BATCHNORM_STATISTICS)]
        for t in tables:
            if t.is_floating_point() and t.numel() > 1 and bool(t.max() != t.min()):
                fan_in = t.numel() // t.shape[0] if t.dim() > 1 else t.numel()  # torch's usual scale, fixed
                t.copy_(torch.randn(t.shape, generator=generator).to(t) * fan_in ** -0.5)
    return model.train()


def check_architecture(model):
    """The assignment's rules on a model, judged by the torch operations its forward pass runs, in
    training mode and in eval mode (what is scored). Returns the number of numbers it carries.

    Raises Refusal (an AssertionError) with one line for any model that breaks a rule, and
    Unusable (a Refusal) for one that cannot be trained or scored as it is; never another error."""
    try:
        check_runs(model)
        model = redrawn(model)
        training = Trace(model, training=True)
        check_parts(training)
        check_head(training)
        try:
            check_head(Trace(model, training=False))
        except Refusal as e:
            raise Refusal(f"in eval mode (what is scored): {e}") from None
        check_whole_image(model)
        return check_size(model)
    except Refusal:
        raise
    except Exception as e:  # a model the gate cannot read: a verdict all the same, with the trace below it
        raise Refusal(f"the gate could not check this model: {one_line(e)} (the traceback above shows where)") from e
