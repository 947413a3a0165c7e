"""What depends on what, by value: the gate's probes of a model's forward.

A Trace is one forward recorded (measure.torch_calls) under given Conditions, and what it shows:
which tensors are computed from the image, which calls average a map over all its positions, and,
by running forward again with one call's result changed, whether the output depends on that call.
The probes run on a copy of the model whose parameters are redrawn from a fixed seed (redrawn), so
every run gives the same answer; blind_pixels asks which input pixels each logit depends on.
"""
import copy
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

import rules
from measure import ForwardError, torch_calls

WARM_UP_CALLS = 469   # one epoch of 60,000 images at 128: a forward that changes after N calls shows
SEED = 0
RESHAPES = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "contiguous", "clone",
            "float", "double", "half", "bfloat16", "to", "type", "type_as", "cpu", "cuda"}  # change no value
DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}
AVERAGES = {"mean", "adaptive_avg_pool2d", "adaptive_avg_pool1d", "avg_pool2d", "avg_pool1d"}


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


class RectifiersPassThrough(TorchFunctionMode):
    """Forward as a wiring diagram: rectifiers, dropout and detach pass their input through (a unit
    dead at initialisation still connects its inputs)."""

    PASS_THROUGH = {"relu", "relu6", "hardtanh", "detach", "dropout", "dropout1d", "dropout2d", "dropout3d",
                    "alpha_dropout", "feature_alpha_dropout"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "").strip("_") in self.PASS_THROUGH and args and isinstance(args[0], torch.Tensor):
            return args[0]
        return func(*args, **(kwargs or {}))


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


def images(n, seed=SEED):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def varies_with_the_image(t):
    """Whether a tensor differs between the images of the batch (its first axis)."""
    t = t.detach()
    return t.dim() > 0 and t.shape[0] > 1 and bool((t != t[:1]).any())


def the_same(a, b, tolerance=0.0):
    """Whether two outputs are equal, within tolerance times b's largest value."""
    if not (isinstance(a, torch.Tensor) and a.shape == b.shape):
        return False
    a, b = a.detach().nan_to_num(), b.detach().nan_to_num()
    return bool((a - b).abs().max() <= tolerance * b.abs().max()) if tolerance and a.numel() else torch.equal(a, b)


def is_a_map(t):
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2] * t.shape[3] > 1


def is_the_mean(y, mean):
    """Whether y holds mean's values, per image and channel, in whatever layout."""
    if y.numel() != mean.numel() or not y.is_floating_point():
        return False
    return torch.allclose(y.detach().reshape(mean.shape).float(), mean, rtol=1e-3, atol=1e-5 * (1 + mean.abs().max()))


def noised(call):
    """The call's result with noise added, in place if the call was in place (its result may go unread)."""
    out = call.out
    if not (isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel()):
        return out
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(SEED + 1)).to(out) * \
        (out.detach().abs().mean().nan_to_num() + 1)
    return out.add_(noise) if any(out is a for a in call.args) else out + noise


def redrawn_mask(call):
    """The dropout made again with another mask; the random stream after it is left as it was."""
    state = torch.get_rng_state()
    torch.manual_seed(SEED + 2)
    out = call.again(*call.args)
    torch.set_rng_state(state)
    return out


class Trace:
    """One forward pass of a copy of `start` under `when`, recorded, and what the rules read off it:
    image (ids of the tensors computed from the input), point (of those computed from 1x1 maps or
    pooled vectors alone: a map made from them is still one position), pools ({call: (H, W)} for
    each call whose result is the mean over all positions of an H x W map)."""

    def __init__(self, start, when):
        self.start, self.when, self.x, self.matter = start, when, images(when.batch), {}
        self.calls, self.out, fed = self.run()
        self.path = feeding(self.calls, self.out)
        self.maker = {id(t): i for i, call in enumerate(self.calls) for t in outputs(call)}
        self.image, self.point, self.pools, self.means = {id(fed)}, set(), {}, {}
        for i, call in enumerate(self.calls):
            self.read(i, call)

    def run(self, alter=None):
        """The calls and output on the same input, with the same dropout masks, every time."""
        model, x = copy.deepcopy(self.start).train(self.when.training), self.x.clone()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            try:
                return (*torch_calls(model, x, alter, self.when.grad), x)
            except ForwardError as e:
                raise ForwardError(self.when) from e.__cause__

    def read(self, i, call):
        ins = [t for t in tensors_in(call) if id(t) in self.image]
        if not ins:
            return
        hw = self.pool_size(call, ins)
        if hw:
            self.pools[i] = hw
        for t in outputs(call):
            self.image.add(id(t))
            one_position = t.dim() in (2, 3, 4) and t.shape[2:].numel() == 1 and (t.dim() == 4 or any(
                s.dim() in (3, 4) and t.shape[:2] == s.shape[:2] and s.shape[2:].numel() > 1 for s in ins))
            if hw or one_position or all(id(s) in self.point for s in ins):
                self.point.add(id(t))

    def maps_before(self, ins, depth=8):
        """The nearest maps (N, C, H, W) with H * W > 1 that ins are computed from."""
        found, frontier, seen = [], list(ins), set()
        for _ in range(depth):
            earlier = []
            for t in frontier:
                if id(t) in seen or id(t) not in self.image:
                    continue
                seen.add(id(t))
                if is_a_map(t):
                    found.append(t)  # and, if it only rearranges one (channels last), that one too
                maker = self.calls[self.maker[id(t)]] if id(t) in self.maker else None
                if maker is not None and (not is_a_map(t) or reshapes(maker)):
                    earlier += tensors_in(maker)
            frontier = earlier
        return found

    def pool_size(self, call, ins):
        """(H, W) if the call's result is the mean over all positions of an H x W map computed
        before it (and its inputs are not that mean already); (1, 1) for an average of a 1x1 map, or
        of a map made from one, or the same at every position."""
        y = call.out
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            return None
        if call.name in AVERAGES and ins[0].dim() == 4 and ins[0].shape[2:].numel() == 1 and \
                y.numel() == ins[0].shape[:2].numel():
            return (1, 1)
        for m in self.maps_before(ins):
            mean = self.means.setdefault(id(m), m.detach().float().mean((2, 3)))
            if is_the_mean(y, mean) and not any(is_the_mean(s, mean) for s in ins):
                flat = m.detach().flatten(2)
                one = id(m) in self.point or bool((flat.amax(2) == flat.amin(2)).all())
                return (1, 1) if one else tuple(m.shape[2:])
        return None

    def matters(self, i):
        """Whether the output changes when the i-th call's result is changed."""
        if i not in self.matter:
            self.matter[i] = not the_same(self.run({i: noised})[1], self.out)
        return self.matter[i]

    def part_works(self, kind):
        """A call of kind (batch_norm, or a dropout) on activations that vary with the image, whose
        result the output depends on; for a dropout, on its mask: another mask, another output."""
        for i, call in enumerate(self.calls):
            if call.name != kind and not (kind == "dropout" and call.name in DROPOUTS):
                continue
            ins = tensors_in(call)
            if not ins or not varies_with_the_image(ins[0]):
                continue
            if kind != "dropout" and self.matters(i):
                return True
            if kind == "dropout" and not the_same(self.run({i: redrawn_mask})[1], self.out, 1e-4):
                return True
        return False

    def output_gap(self):
        """The last global average pool over a map larger than 1x1 that the output depends on."""
        gaps = [i for i, (h, w) in self.pools.items() if h * w > 1]
        return next((i for i in reversed(gaps) if varies_with_the_image(tensors_in(self.calls[i])[0])
                     and self.matters(i)), None)

    def source_map(self, i):
        """What the i-th call's image input is a rearrangement of (through reshapes and casts), and
        the calls between: the map whose positions it mixes, or the vector whose entries it does."""
        t = next(t for t in tensors_in(self.calls[i]) if id(t) in self.image)
        chain = [i]
        while not is_a_map(t) and id(t) in self.maker and reshapes(self.calls[self.maker[id(t)]]):
            chain.insert(0, self.maker[id(t)])
            t = next((s for s in tensors_in(self.calls[chain[0]]) if id(s) in self.image), None)
            if t is None:
                return None, []
        return t, chain

    def mixes_all(self, i, m, chain):
        """Whether each of a few outputs of the i-th call depends on every position of the map m
        (every entry of a vector m), found by the gradients of the call made again on m."""
        for rows in (slice(0, 2), slice(None)):  # two images are enough, unless forward hard-codes its batch
            source = m.detach()[rows].clone().requires_grad_()
            try:
                with torch.enable_grad():
                    y = replayed(self.calls, chain, m, source)
                break
            except Exception:
                continue
        else:
            return False
        per = y.numel() // y.shape[0] if y.dim() and y.shape[0] == source.shape[0] else y.numel()
        for p in sorted({0, per // 2, per - 1}):
            g, = torch.autograd.grad(y.flatten()[p], source, retain_graph=True, allow_unused=True)
            reach = 0 if g is None else (g.abs().sum((0, 1)) if is_a_map(m) else g.abs().reshape(len(g), -1).sum(0))
            if g is None or not bool((reach > 0).all()):
                return False
        return True

    def fully_connected(self):
        """[(call, the map or vector it mixes whole)] for each call with weights of its own (a tensor
        not computed from the input) that mixes all positions of a map, or all of a vector."""
        found = []
        for i, call in enumerate(self.calls):
            weights = [t for t in tensors_in(call) if id(t) not in self.image and t.numel() > 1]
            if not weights or reshapes(call) or call.name in DROPOUTS | {"batch_norm"} or \
                    not any(id(t) in self.image for t in tensors_in(call)):
                continue
            m, chain = self.source_map(i)
            if m is not None and self.mixes_all(i, m, chain) and self.matters(i):
                found.append((i, m))
        return found


def reshapes(call):
    """Whether a call only rearranges the values it is given (x[:, :, 0, 0] on a 1x1 map included),
    or changes none of them (a cast, a copy)."""
    if call.name == "getitem":
        return isinstance(call.out, torch.Tensor) and call.out.numel() == call.args[0].numel()
    return call.name in RESHAPES


def redrawn(model):
    """A copy of model, its lazy layers built, with every parameter that is random at construction
    redrawn from a fixed seed at a fixed scale (1 / sqrt(fan-in)): the checks then give the same
    verdict on every run. Constant ones (BatchNorm's ones and zeros) and buffers stay as they are."""
    model = copy.deepcopy(model)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        try:
            model.eval()(torch.zeros(2, 1, 28, 28))  # a lazy layer gets its weights here
        except Exception as e:
            raise ForwardError(Conditions("", False, 2, False, "fresh")) from e
        generator = torch.Generator().manual_seed(SEED)
        for t in model.parameters():
            if t.is_floating_point() and t.numel() > 1 and bool(t.max() != t.min()):
                fan_in = t.numel() // t.shape[0] if t.dim() > 1 else t.numel()  # torch's usual scale, fixed
                t.copy_(torch.randn(t.shape, generator=generator).to(t) * fan_in ** -0.5)
    return model.train()


def warmed(model):
    """A copy of model after WARM_UP_CALLS training calls (two images each, gradients on)."""
    model, generator = copy.deepcopy(model).train(), torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for _ in range(WARM_UP_CALLS):
            try:
                model(torch.rand(2, 1, 28, 28, generator=generator))
            except Exception as e:
                raise ForwardError(Conditions("", True, 2, True, "fresh")) from e
    return model


def in_double_precision(model, x):
    """model(x) in eval mode, rectifiers passing through, in float64 where the model runs so (a far
    corner pixel moves a logit by a millionth of its size), else in its own precision; and the
    relative change that counts as one."""
    for dtype, precision in ((torch.float64, 1e-12), (None, 1e-6)):
        copied = copy.deepcopy(model).eval()
        try:
            with RectifiersPassThrough(), torch.random.fork_rng(devices=[]):
                copied, x = (copied.double(), x.double()) if dtype else (copied, x)
                return copied(x).double().nan_to_num(), precision
        except Exception:
            if dtype is None:
                raise


@torch.no_grad()
def blind_pixels(model):
    """For each logit, how many input pixels it does not depend on, by value, in eval mode: each
    pixel is set alone on a blank image (and, for those that seem ignored, changed on a random one),
    with rectifiers passing everything through (a unit dead at initialisation still connects)."""
    blind = torch.ones(784, rules.CLASSES, dtype=torch.bool)
    for base in (torch.zeros(1, 784), images(1, SEED + 3).flatten(1)):
        probes = base.repeat(786, 1)
        probes[2:].diagonal().copy_(1 - base[0])  # pixel p of image p + 2 changed; images 0 and 1 as they are
        logits, precision = in_double_precision(model, probes.view(-1, 1, 28, 28))
        noise = (logits[0] - logits[1]).abs().max()
        tolerance = max(10 * noise.item(), precision * (1 + logits[0].abs().max().item()))
        blind &= (logits[2:] - logits[0]).abs() <= tolerance
        if not blind.any():
            break
    return [int(n) for n in blind.sum(0)]
