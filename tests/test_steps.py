"""steps.py: GraphedSteps, the CUDA-graph training path, against EagerSteps, the plain loop.

On the CPU the graph-ready step runs eagerly (capture=False): the schedule tensors, the hand-written
SGD and whole epochs are checked against the eager loop there. The capture itself needs CUDA.
"""
import pytest
import torch

import steps
import train
from reference import Reference


def without_dropout():
    """The reference net with no randomness inside: its dropout modules at p = 0."""
    model = Reference()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return model


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def flags(*argv, cuda_graph=False):
    """train.py's flags; cuda_graph=True also off CUDA, where GraphedSteps runs its step eagerly."""
    args = train.parse_args(["--epochs", "3", "--batch-size", "64", *argv])
    args.cuda_graph = cuda_graph
    return args


def eager_schedule(args, steps_per_epoch):
    """(lr, momentum) of each step as the eager loop's optimizer sees them, and the weight
    average's decay at each step, recorded from a real run of the eager objects."""
    model = Reference()
    optimizer, scheduler = steps.make_optimizer(model.parameters(), args, steps_per_epoch)
    average = steps.WeightAverage(model, args.ema)
    lrs, momenta, decays = [], [], []
    for _ in range(steps_per_epoch * args.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        momenta.append(optimizer.param_groups[0]["momentum"])
        decays.append(average.decay_at(average.steps + 1))
        optimizer.step()
        scheduler.step()
        average.update()
    return lrs, momenta, decays


@pytest.mark.parametrize("schedule", ["onecycle", "step"])
def test_schedule_tensors_match_the_eager_schedule(schedule):
    args = flags("--schedule", schedule)
    per_epoch = 10
    x = torch.zeros(per_epoch * args.batch_size, 1, 28, 28, dtype=torch.uint8)
    y = torch.zeros(per_epoch * args.batch_size, dtype=torch.long)
    state = train.start(flags("--schedule", schedule, cuda_graph=True), "cpu", (x, y, x, y, "val"), Reference)
    lrs, momenta, decays = eager_schedule(args, per_epoch)
    total, padding = per_epoch * args.epochs, steps.WARM_UP_STEPS  # padded for a warm-up at the last step
    for ours, eager in ((state.steps.lrs, lrs), (state.steps.momenta, momenta), (state.steps.decays, decays)):
        assert len(ours) == len(eager) + padding == total + padding
        assert torch.allclose(ours, torch.tensor(eager + eager[-1:] * padding))
    if schedule == "onecycle":  # the momentum cycle is there, not a constant
        assert max(momenta) == pytest.approx(0.95) and min(momenta) < 0.86


def test_hand_written_sgd_matches_torch_sgd():
    """Five steps with a new learning rate and momentum each time, as OneCycleLR would set them."""
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    sgd = steps.NesterovSGD(ours, weight_decay=1e-4)
    reference = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for lr, momentum in [(0.01, 0.95), (0.05, 0.93), (0.1, 0.9), (0.07, 0.88), (0.02, 0.85)]:
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        sgd.step(torch.tensor(lr), torch.tensor(momentum))
        for group in reference.param_groups:
            group.update(lr=lr, momentum=momentum)
        reference.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def two_runs(test_tensors, device, *argv, net=Reference):
    """The same short run, eager and graph-ready; returns both finished states."""
    images, labels = (t.to(device) for t in test_tensors)
    data = (images[:1000], labels[:1000], images[1000:2000], labels[1000:2000], "val")  # 15 x 64 + 40
    states = []
    for cuda_graph in (False, True):
        args = flags("--epochs", "2", "--clean-epochs", "1", *argv, cuda_graph=cuda_graph)
        state = train.start(args, device, data, net)
        train.train_epochs(state, args, data, args.epochs)
        states.append(state)
    return states


def assert_same_training(eager, graph, tolerance):
    for a, b in zip(eager.history, graph.history):
        for key in ("lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=tolerance[key]), key
    for kept in (lambda state: state.model, lambda state: state.average.model if state.average else state.model):
        for (name, a), b in zip(kept(eager).state_dict().items(), kept(graph).state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=tolerance["weights"], msg=name)


class WithTemperature(Reference):
    """A 0-d parameter, as a learned temperature would be: the step's scalars must fit it."""

    def __init__(self):
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return super().forward(x) * self.temperature


@pytest.mark.parametrize("ema, net, weights", [("0.995", Reference, 1e-4), ("0", Reference, 1e-4),
                                                ("0.995", WithTemperature, 1e-2)],
                         ids=["weight-average", "raw-weights", "scalar-parameter"])
def test_graph_ready_steps_train_like_the_eager_loop(test_tensors, ema, net, weights):
    """On the CPU both paths draw the same random numbers in the same order (augmentation, then
    dropout), so two epochs, one augmented and one not, a ragged last batch in each, must agree
    up to float rounding."""
    eager, graph = two_runs(test_tensors, "cpu", "--ema", ema, net=net)
    assert graph.steps.step_index.item() == 2 * 16
    # Rounding apart, the same training. torch's SGD and the hand-written one round differently
    # in the last bit, and 32 steps amplify that: allow 0.1 % of a loss (losses are 0.4 to 2 here)
    # and two images of 1,000. A learned temperature scales every logit and so every gradient,
    # which amplifies rounding faster: its weights agree to 1e-2 (1e-3 apart on torch 2.14).
    assert_same_training(eager, graph, {"lr": 1e-6, "train_loss": 1e-3, "train_accuracy": 0.21,
                                        "val_loss": 1e-3, "val_accuracy": 0.21, "weights": weights})


def test_warm_up_leaves_no_trace_even_at_the_last_step(test_tensors):
    """Before each capture, real steps warm up cuDNN and the allocator. They may start at the very
    last step (the schedules are padded for that), and afterwards every tensor they touched and
    the random-number state are as they were."""
    images, labels = test_tensors
    data = (images[:200], labels[:200], images[200:300], labels[200:300], "val")
    args = flags("--epochs", "1", cuda_graph=True)
    state = train.start(args, "cpu", data, Reference)
    graph = state.steps
    graph.step_index.fill_(len(graph.lrs) - steps.WARM_UP_STEPS - 1)  # the last real step
    graph.indices[64].copy_(torch.arange(64))
    before, rng = [t.clone() for t in graph._state()], torch.get_rng_state()
    graph._warm_up(64, augmented=True)
    assert all(torch.equal(a, b) for a, b in zip(before, graph._state()))
    assert torch.equal(rng, torch.get_rng_state())


@cuda
def test_captured_graphs_train_like_the_eager_loop_on_cuda(test_tensors, monkeypatch):
    """With no randomness inside the step (no augmentation, no dropout), the captured graphs and
    the eager loop must train the same weights. GPU kernels are not bit-exact (atomics in the
    backward pass; TF32, turned off here, rounds convolutions to 10 bits), and 32 steps at a high
    learning rate amplify that, hence the tolerance. A step replayed with a stale learning rate or
    momentum, or not at all, lands far outside it."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    eager, graph = two_runs(test_tensors, "cuda", "--no-augment", net=without_dropout)
    assert graph.steps.step_index.item() == 2 * 16
    assert set(graph.steps.graphs) == {(64, False), (40, False)}
    assert_same_training(eager, graph, {"lr": 1e-6, "train_loss": 1e-2, "train_accuracy": 1.0,
                                        "val_loss": 1e-2, "val_accuracy": 1.0, "weights": 1e-2})


@cuda
def test_captured_run_with_augmentation_and_dropout_learns_on_cuda(test_tensors):
    """The default recipe through the captured graphs: its random draws differ from the eager
    loop's, so the check is that it learns as well, not that it matches; and each replay draws
    new random numbers (two replays of one step from the same state give different losses)."""
    eager, graph = two_runs(test_tensors, "cuda")
    assert set(graph.steps.graphs) == {(64, True), (40, True), (64, False), (40, False)}
    assert graph.history[-1]["val_accuracy"] > 80
    assert abs(graph.history[-1]["val_accuracy"] - eager.history[-1]["val_accuracy"]) < 5
    graphed, losses = graph.steps, []
    saved = [t.clone() for t in graphed._state()]
    for _ in range(2):
        with torch.no_grad():
            for t, value in zip(graphed._state(), saved):
                t.copy_(value)
        graphed.graphs[(64, True)].replay()
        losses.append((graphed.loss_sum - saved[-2]).item())
    assert losses[0] != losses[1]


class ReadsBack(Reference):
    """Reads a value back to Python in forward: runs eagerly, but cannot be captured as a graph."""

    def forward(self, x):
        if x.sum().item() >= 0:
            return super().forward(x)
        raise ValueError("pixels are never negative")


@cuda
def test_a_step_that_cannot_be_captured_trains_eagerly_on_cuda(test_tensors, capsys):
    """The capture fails for real; train.start says so in one line and trains the model eagerly."""
    images, labels = (t.to("cuda") for t in test_tensors)
    data = (images[:1000], labels[:1000], images[1000:2000], labels[1000:2000], "val")
    args = flags("--epochs", "1", cuda_graph=True)
    run = train.start(args, torch.device("cuda"), data, ReadsBack)
    train.train_epochs(run, args, data, args.epochs)
    assert isinstance(run.steps, steps.EagerSteps) and run.history[-1]["val_accuracy"] > 50
    assert "could not be captured as a CUDA graph" in capsys.readouterr().err
