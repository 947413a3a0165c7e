"""How the gate judges a model against the course's rules (rules.py): check_architecture (the gate,
and train.py before its first epoch), findings (every rule's verdict, for the job summary), and
every refusal a student can read, in REFUSALS. A model is judged by value under the conditions of
training (train mode, gradients on, the training batch, first call and after an epoch of calls) and
of scoring (eval mode, no gradients, the scoring batch, the trained state in a fresh model): a part
counts when its input varies with the image and the output changes with what it does. Only
parameters are redrawn, from a fixed seed; buffers stay as held."""
import copy
from dataclasses import dataclass

import torch

import rules
from measure import ForwardError, argument, carried_numbers
from traces import (DROPOUTS, WARM_UP_CALLS, Conditions, Trace, blind_pixels, is_a_map, outputs, redrawn, reshapes,
                    tensors_in, warmed)

# --- the catalogue: every refusal, as the student reads it, and its fix ------------------------------
REFUSALS = {
    "no-arguments": ("model.py's Net() must build with no arguments ({error})",
                     "give every argument of `Net.__init__` a default"),
    "forward-raised": ("forward raised {error} on {images} in {mode} mode{hint}",
                       "fix the line the traceback above points at"),
    "output-shape": ("output {shape} for {images} in {mode} mode, expected ({n}, {classes}): logits or "
                     "log-probabilities{hint}",
                     "end with 10 values per image; `x.squeeze()` drops a single image's batch dimension: use "
                     "`x.flatten(1)`"),
    "no-gradient": ("{when}the output carries no gradient in training mode: the model cannot learn (don't compute "
                    "the logits from .numpy(), .item() or under torch.inference_mode())",
                    "compute the logits with torch operations on the input"),
    "torchscript-module": ("`{name}` is a TorchScript module, which the gate cannot see into",
                           "script functions, not modules, or drop torch.jit.script: the gate runs the Python"),
    "no-batchnorm": ("{when}no BatchNorm ran in forward (nn.BatchNorm2d or F.batch_norm; one defined but not called, "
                     "applied to a constant, or whose result does not change the output, does not count)",
                     "call it in `forward` on the activations and use its result (GroupNorm or LayerNorm do not "
                     "count)"),
    "no-dropout": ("{when}no Dropout with p > 0 ran in forward in training mode (nn.Dropout, nn.Dropout2d, or "
                   "F.dropout(x, p, training=self.training); one applied to a constant, undone, or whose mask does "
                   "not change the output does not count)",
                   "`x = self.drop(x)` with p > 0; with `F.dropout`, pass `training=self.training`"),
    "no-gap": ("{when}no global average pooling ran in forward: use nn.AdaptiveAvgPool2d(1), nn.AvgPool2d over the "
               "whole map, F.adaptive_avg_pool2d(x, 1) or x.mean((2, 3))",
               "pool the last map with a form of the forms table; a max pool, or a window smaller than the map, is "
               "not one"),
    "gap-on-1x1": ("{when}the average pool maps (1, 1) to (1, 1): it must pool a map larger than 1x1 (a 1x1 map "
                   "padded, expanded or upsampled is still 1x1)",
                   "stop the convolutions at a 2x2 map or larger and let the pool do the rest"),
    "output-not-from-gap": ("{when}the output does not come from the global average pool",
                            "return what the pool (and the classifier after it) computed"),
    "after-gap": ("{when}`{op}` runs after the global average pool: only {allowed} may follow it",
                  "move it before the pool, or drop it"),
    "wide-conv-after-gap": ("{when}a {k}x{k} conv runs after the global average pool: only a 1x1 conv or nn.Linear "
                            "may classify the pooled map", "use a 1x1 conv or nn.Linear"),
    "classifiers-after-gap": ("{when}{count} layers run after the global average pool: {allowed} may follow it",
                              "keep one classifier after the pool"),
    "fully-connected-on-a-map": ("{when}`{op}` is a fully-connected layer: it mixes {what} at once; {where}",
                                 "mix channels at each position (a 1x1 conv) and let the pool combine positions"),
    "fully-connected-nowhere": ("{when}`{op}` is a fully-connected layer ({what}): these rules allow none",
                                "classify with a 1x1 conv before the pool, and nothing after it"),
    "blind-pixels": ("logit {k} ignores {blind} of the 784 input pixels: every logit must see the whole image",
                     "don't crop or mask the input; grow the receptive field to the whole image"),
    "too-many-numbers": ("{total:,} parameters and other carried numbers; the rule is fewer than {limit:,} (largest: "
                         "{largest}{others})", "make the model smaller; the largest tables are named"),
    "uncountable": ("the numbers the model carries could not be counted: forward in eval mode on 2 and 3 images "
                    "raised {error}", "make forward run in eval mode on any batch"),
    "gate-error": ("the gate could not check the {rule} rule: {error} (an error in the gate's checks.py, not a "
                   "verdict on your model: please report it)", "nothing in your model: report it"),
}
# Where a fully-connected layer may run, as the refusal says it (rules.FULLY_CONNECTED).
FC_WHERE = {"after-gap": "a fully-connected layer may only classify the pooled vector",
            "nowhere": "these rules allow none"}
FORMS = [
    "| part | accepted forms |", "|---|---|",
    "| BatchNorm | `nn.BatchNorm2d` (or 1d, affine or not), `F.batch_norm`, on activations that vary with the image |",
    "| Dropout | `nn.Dropout`, `nn.Dropout2d`, `F.dropout(x, p, training=self.training)`, p a number or a tensor > 0, "
    "whose mask changes the output |",
    "| global average pool | any mean over all positions of a map larger than 1×1, whatever the layout: "
    "`nn.AdaptiveAvgPool2d(1)`, `nn.AvgPool2d(k)` over the whole k×k map, `F.adaptive_avg_pool2d(x, 1)`, "
    "`x.mean((2, 3))`, `x.view(n, c, -1).mean(-1)`, `x.mean(-1).mean(-1)`, channels-last `x.mean((1, 2))` |",
    "| after the pool | reshapes (`view`, `flatten`, `squeeze`, `x[:, :, 0, 0]`), casts, dropout, `softmax` / "
    "`log_softmax`, and one classifier: `nn.Linear` or a 1×1 conv |",
    "| before the pool | convolutions, and layers that mix channels at each position (`nn.Linear` over the channel "
    "axis is a 1×1 conv); no layer that mixes all positions of a map at once (a conv whose kernel covers the map, "
    "a Linear or matmul on a flattened map); a Linear on a pooled vector (squeeze-and-excitation) |",
    "| TorchScript | `@torch.jit.script` functions (the gate runs the Python they were scripted from) |",
]
RULES = ("runs", "parameters", "BatchNorm", "Dropout", "global average pool", "fully-connected", "whole image")
CHECK_ORDER = ("runs", "BatchNorm", "Dropout", "global average pool", "fully-connected", "whole image", "parameters")
SQUEEZE_HINT = " (x.squeeze() drops the batch dimension of a single image: use x.flatten(1))"


def refusal_table():
    """The catalogue as markdown rows, "| the gate says | fix |", in the catalogue's order."""
    def shown(template):
        return "`" + template.replace("{when}", "").replace("`", "'") + "`"

    rows = [f"| {shown(message)} | {fix} |" for message, fix in REFUSALS.values()]
    return ["| the gate says | fix |", "|---|---|", *rows]


class Refusal(AssertionError):
    """A rule broken, in one line that says what to do (raised, not asserted: `python -O` keeps it)."""


class Unusable(Refusal):
    """A model that cannot be trained or scored as it is: train.py stops on it before the first epoch."""


class GateError(Refusal):
    """The gate itself failed on a model: its message names the gate, never the student."""


def refusal(key, kind=Refusal, **fields):
    return kind(REFUSALS[key][0].format(**fields))


def require(condition, key, kind=Refusal, **fields):
    if not condition:
        raise refusal(key, kind, **fields)


def one_line(error):
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def buildable(cls):
    """None if cls() can be called with no arguments (as train.py and the gate build it), else why."""
    import inspect
    try:
        inspect.signature(cls).bind()
    except TypeError as e:
        return REFUSALS["no-arguments"][0].format(error=e) + ": give each argument of Net.__init__ a default"
    except ValueError:  # no signature to read: let the call itself say
        pass
    return None


def student_net():
    """model.py's Net class, imported when asked for: an error in model.py keeps its traceback."""
    from model import Net
    return Net


def check_runs(model):
    """(N, 10) out for several images in training mode, and for several and one in eval mode."""
    for training, n in ((True, 4), (False, 4), (False, 1)):
        fields = dict(images="1 image" if n == 1 else f"{n} images", mode="training" if training else "eval")
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                out = copy.deepcopy(model).train(training)(torch.rand(n, 1, 28, 28))
        except Exception as e:
            raise refusal("forward-raised", Unusable, error=one_line(e), **fields,
                          hint=f", though it ran on 4{SQUEEZE_HINT}" if n == 1 else "") from e
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        hint = SQUEEZE_HINT if n == 1 and isinstance(out, torch.Tensor) and out.numel() == rules.CLASSES else ""
        require(shape == (n, rules.CLASSES), "output-shape", Unusable, shape=shape, n=n, classes=rules.CLASSES,
                hint=hint, **fields)


def shortfall(accuracies):
    """Why a run's test accuracy per epoch misses the bar, in one line, or None: the rule on a run
    that train.py's verdict and the gate's check of metrics.json both apply."""
    n, last = len(accuracies), rules.LAST_EPOCHS
    if n > rules.MAX_EPOCHS:
        return f"the run has {n} epochs; the rule allows at most {rules.MAX_EPOCHS}"
    if n < last:
        return f"the run holds {n} epoch{'s' * (n != 1)}; the rule judges the last {last}"
    low = [f"{e} ({a:.2f})" for e, a in enumerate(accuracies[-last:], n - last + 1) if a < rules.MIN_ACCURACY]
    if low:
        return f"epoch{'s' * (len(low) > 1)} {', '.join(low)} below {rules.MIN_ACCURACY:.2f}, in the last {last}"
    return None


# --- the conditions a model is judged under, and the rules on its head ----------------------------
TRAINING_BATCH = 128  # train.py's batch size
SCORING_BATCH = 1000  # test_model.score's
CONDITIONS = (Conditions("", True, TRAINING_BATCH, True, "fresh"),
              Conditions(f"after {WARM_UP_CALLS} training calls: ", True, TRAINING_BATCH, True, "warm"),
              Conditions("in eval mode (what is scored): ", False, SCORING_BATCH, False, "scored"))
PASSIVE = {"softmax", "log_softmax", *DROPOUTS}  # may follow the pool
ACTIVATIONS = {"relu", "gelu", "silu", "sigmoid", "tanh", "leaky_relu", "elu", "relu6", "hardtanh", "mish"}
CLASSIFIERS = {"linear", "conv2d"}  # nn.Linear / F.linear; nn.Conv2d / F.conv2d, 1x1 only
CLASSIFIERS_AFTER_GAP = {"after-gap": 1, "nowhere": 0, "anywhere": float("inf")}


def check_head(t):
    """In a trace, a GAP over a map larger than 1x1 feeds the output, and what follows it is
    parameter-free but for the classifiers rules.FULLY_CONNECTED allows."""
    when, where = t.when.label, rules.FULLY_CONNECTED
    require(t.pools, "no-gap", when=when)
    require(any(h * w > 1 for h, w in t.pools.values()), "gap-on-1x1", when=when)
    gap = t.output_gap()
    require(gap is not None, "output-not-from-gap", when=when)
    limit = CLASSIFIERS_AFTER_GAP.get(where, 1)
    allowed = "reshapes, casts, dropout, softmax or log_softmax" + \
              {0: "", 1: " and one classifier (nn.Linear or a 1x1 conv)"}.get(limit, ", activations and classifiers")
    pooled, classifiers = {id(t.calls[gap].out)}, 0
    for i in range(gap + 1, len(t.calls)):
        call = t.calls[i]
        if i not in t.path or not any(id(x) in pooled for x in tensors_in(call)):
            continue  # work the output does not depend on, or on another branch that joins later
        pooled.update(id(y) for y in outputs(call))
        if reshapes(call) or call.name in PASSIVE or (limit > 1 and call.name in ACTIVATIONS) or \
                not t.matters(i):
            continue
        require(call.name in CLASSIFIERS and limit, "after-gap", when=when, op=call.name, allowed=allowed)
        weight = argument(call, 1, "weight")
        k = tuple(weight.shape[-2:]) if call.name == "conv2d" and isinstance(weight, torch.Tensor) else (1, 1)
        require(k == (1, 1), "wide-conv-after-gap", when=when, k=k[0])
        classifiers += 1
        require(classifiers <= limit, "classifiers-after-gap", when=when, count=classifiers, allowed=allowed)


def mixed(m):
    """What a fully-connected layer mixes whole, as its refusal says it."""
    if is_a_map(m):
        return f"all {m.shape[2] * m.shape[3]} positions of a {tuple(m.shape[1:])} map"
    return f"all {m[0].numel()} values of a {tuple(m.shape[1:])} vector that no pool made"


def fully_connected_rule(t, where):
    """The fully-connected layers of a trace against rules.FULLY_CONNECTED; returns how many run.
    Where they may run after the pool, one may act on a pooled vector anywhere (squeeze-and-
    excitation); with no pool required and none run, one may classify whatever it is given."""
    layers, gap = t.fully_connected(), t.output_gap() if t.pools else None
    for i, m in layers if where == "nowhere" else []:
        what = f"it mixes {mixed(m)}" if is_a_map(m) else "on a vector"
        raise refusal("fully-connected-nowhere", when=t.when.label, op=t.calls[i].name, what=what)
    unpooled = [(i, m) for i, m in layers if id(m) not in t.point]
    for n, (i, m) in enumerate(unpooled):
        if gap is not None and i > gap or gap is None and not rules.REQUIRE_GAP and n == len(unpooled) - 1:
            continue  # after the pool it is the head's to judge; with no pool required, the last classifies
        raise refusal("fully-connected-on-a-map", when=t.when.label, op=t.calls[i].name, what=mixed(m),
                      where=FC_WHERE[where])
    return len(layers)


@dataclass
class Finding:
    rule: str          # one of RULES
    value: str         # what this model shows, e.g. "5,288", "runs in forward", "not required", "none"
    ok: bool
    reason: str = ""   # the one-line refusal when not ok


class Judgement:
    """A model under judgement: its redrawn copy, that copy after an epoch of training calls, and
    the traces of each condition, made when a rule first asks for them."""

    def __init__(self, model):
        self.model = redrawn(model)
        self.warm = warmed(self.model)
        self.traces = {}

    def start(self, when):
        if when.start != "scored":
            return self.model if when.start == "fresh" else self.warm
        scored = copy.deepcopy(self.model)
        try:
            scored.load_state_dict(self.warm.state_dict(), strict=False)
        except RuntimeError:  # a layer that changes its shape in forward: the warm model as it is
            return self.warm
        return scored

    def trace(self, when):
        if when not in self.traces:
            self.traces[when] = Trace(self.start(when), when)
        return self.traces[when]

    def each(self):
        """The traces of every condition, in CONDITIONS' order."""
        return [self.trace(when) for when in CONDITIONS]


def judge_runs(judgement, model):
    check_runs(model)
    j = judgement()
    scripted = [name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    require(not scripted, "torchscript-module", name=scripted[0] if scripted else "")
    for t in j.each():
        require(not t.when.grad or t.out.requires_grad, "no-gradient", when=t.when.label)
    return "runs in forward"


def judge_part(j, required, kind, key):
    """A required part (BatchNorm, dropout) works in every condition where it is required."""
    if not required:
        return "not required"
    for t in j.each():
        if kind == "dropout" and not t.when.training:
            continue
        require(t.part_works(kind), key, when=t.when.label)
    return "runs in forward"


def judge_gap(j):
    if not rules.REQUIRE_GAP:
        return "not required"
    for t in j.each():
        check_head(t)
    return "runs in forward"


def judge_fully_connected(j):
    where = rules.FULLY_CONNECTED
    if where not in ("after-gap", "anywhere", "nowhere"):
        raise ValueError(f"rules.FULLY_CONNECTED is {where!r}: it must be 'after-gap', 'anywhere' or 'nowhere'")
    if where == "anywhere":
        return "allowed anywhere"
    layers = max(fully_connected_rule(t, where) for t in j.each())
    return f"{layers} (a classifier)" if layers else "none"


def judge_whole_image(model):
    for k, blind in enumerate(blind_pixels(model)):
        require(blind == 0, "blind-pixels", k=k, blind=blind)
    return "all 784 pixels"


def judge_size(model):
    """Counts every number the model carries, not only model.parameters() (measure.carried_numbers)."""
    try:
        carried = carried_numbers(model)
    except Exception as e:
        raise refusal("uncountable", Unusable, error=one_line(e.__cause__ or e)) from e

    def named(items):
        return ", ".join(f"{name} {n:,}" for name, n in sorted(items, key=lambda item: -item[1])[:3])

    # The largest tables, and the largest of what is not a parameter: a buffer, a table kept on the
    # side or a cache can be what tips the count, and is the easiest to miss.
    parameters = {name for name, _ in model.named_parameters()}
    others = named((name, n) for name, n in carried.items() if name not in parameters)
    total = sum(carried.values())
    require(total < rules.PARAMS_BELOW, "too-many-numbers", total=total, limit=rules.PARAMS_BELOW,
            largest=named(carried.items()), others=f"; not parameters: {others}" if others else "")
    return f"{total:,}"


def _judged(model):
    """[(Finding, the exception behind a refusal or None)] for every rule, in RULES' order."""
    made = []

    def judgement():  # made once the model runs: building it runs forward
        made[:] = made or [Judgement(model)]
        return made[0]

    judges = {"runs": lambda: judge_runs(judgement, model), "parameters": lambda: judge_size(model),
              "BatchNorm": lambda: judge_part(judgement(), rules.REQUIRE_BATCHNORM, "batch_norm", "no-batchnorm"),
              "Dropout": lambda: judge_part(judgement(), rules.REQUIRE_DROPOUT, "dropout", "no-dropout"),
              "global average pool": lambda: judge_gap(judgement()),
              "fully-connected": lambda: judge_fully_connected(judgement()),
              "whole image": lambda: judge_whole_image(judgement().model)}
    results = {}
    for rule in CHECK_ORDER:
        if rule != "runs" and isinstance(results["runs"][1], Unusable):
            results[rule] = (Finding(rule, "not judged", False, "not judged: the model does not run"), None)
            continue
        try:
            results[rule] = (Finding(rule, judges[rule](), True), None)
        except Exception as e:
            error = _as_refusal(e, rule)
            value = "not judged" if isinstance(error, GateError) else "refused"
            results[rule] = (Finding(rule, value, False, str(error)), error)
    return [results[rule] for rule in RULES]


def _as_refusal(error, rule):
    """A refusal as it is; an error in the student's forward as Unusable, with its traceback; any
    other error as the gate's own, named as such."""
    if isinstance(error, Refusal):
        return error
    if isinstance(error, ForwardError):
        cause, when = error.__cause__, error.when or CONDITIONS[0]
        made = refusal("forward-raised", Unusable, error=one_line(cause), images=f"{when.batch} images",
                       mode=when.mode, hint="")
        made.__cause__ = cause
        return made
    made = refusal("gate-error", GateError, rule=rule, error=one_line(error))
    made.__cause__ = error
    return made


def findings(model):
    """Every rule judged on model, in RULES' order; never raises for a model's fault."""
    return [finding for finding, _ in _judged(model)]


def check_architecture(model):
    """The numbers model carries, if it meets the rules. Raises the first rule's Refusal it breaks
    (Unusable: it cannot be trained or scored; GateError: the gate itself failed), never another error."""
    judged = {finding.rule: (finding, error) for finding, error in _judged(model)}
    if error := next((judged[rule][1] for rule in CHECK_ORDER if judged[rule][1] is not None), None):
        raise error
    return int(judged["parameters"][0].value.replace(",", ""))
