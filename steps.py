"""The training step, and the loops that repeat it over an epoch: train.py's inner loop.

Two implementations behind one interface, `steps.epoch(augmented, progress) -> (loss, accuracy)`:

- EagerSteps: the plain PyTorch loop (torch.optim.SGD and its scheduler), one step per batch.
  It runs on the CPU, on Apple MPS, and on CUDA with --no-cuda-graph.
- GraphedSteps: the default on CUDA. One training step of this net is about a hundred small
  kernels; launched one at a time from Python they leave a big GPU waiting. Captured once as a CUDA
  graph, the whole step (batch gather, augmentation, forward, backward, SGD, weight average)
  replays with one launch. A graph replays fixed kernels on fixed memory, so whatever changes from
  step to step lives in device tensors that the graph reads: the batch's indices (copied into a
  fixed buffer before each replay), the learning rate, momentum and weight-average decay (computed
  for every step up front from the eager path's torch scheduler and looked up by a step counter on
  the device), and the random numbers (PyTorch's CUDA generator moves on at each replay). Off CUDA
  the same step runs eagerly (capture=False), which is how the tests check it on a CPU.

Both draw the same random numbers in the same order (the epoch's order, then per step the
augmentation, then dropout), and neither reads a value back to the host inside an epoch.
"""
import contextlib
import copy

import torch
import torch.nn.functional as F

from data import augment, to_float

WARM_UP_STEPS = 3  # eager steps before a capture, so cuDNN and the allocator settle; then undone
MOMENTUM = 0.9     # the step schedule's; the one-cycle schedule cycles it 0.95 -> 0.85 -> 0.95 instead
WEIGHT_DECAY = 1e-4
AUGMENT = dict(degrees=7.0, translate=0.05, scale=0.05)  # random rotation (deg), shift and zoom (fractions)


class CaptureError(Exception):
    """The step ran eagerly but could not be captured as a CUDA graph."""


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
        """decay: this step's as a device tensor (GraphedSteps); by default decay_at the next step."""
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


def make_optimizer(params, config, steps_per_epoch):
    """SGD with Nesterov momentum and its learning-rate schedule, stepped once per batch."""
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    if config.schedule == "onecycle":  # also cycles momentum from 0.95 to 0.85 and back, against the lr
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, epochs=config.epochs,
                                                        steps_per_epoch=steps_per_epoch)
    else:  # classic step decay: x0.1 at half and at three quarters of the run
        total = steps_per_epoch * config.epochs
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[total // 2, total * 3 // 4],
                                                         gamma=0.1)
    return optimizer, scheduler


def autocast(device_type, amp_dtype, **kwargs):
    """bf16 autocast when amp_dtype is set, else nothing."""
    return torch.autocast(device_type, dtype=amp_dtype, **kwargs) if amp_dtype else contextlib.nullcontext()


class EagerSteps:
    """Trains `model` one epoch at a time with torch.optim.SGD: the plain PyTorch loop."""

    def __init__(self, model, average, images, labels, config, amp_dtype=None):
        self.model, self.average, self.images, self.labels = model, average, images, labels
        self.batch_size, self.amp_dtype = config.batch_size, amp_dtype
        self.optimizer, self.scheduler = make_optimizer(model.parameters(), config, -(-len(labels) // config.batch_size))

    def lr(self):
        """The learning rate of the next step."""
        return self.optimizer.param_groups[0]["lr"]

    def step(self, idx, augmented):
        """One training step on the images at idx; returns (summed loss, correct) as device tensors."""
        x, y = to_float(self.images[idx]), self.labels[idx]
        if augmented:
            x = augment(x, **AUGMENT)
        with autocast(y.device.type, self.amp_dtype):
            logits = self.model(x)
            # One loss for logits and log-probabilities alike: cross_entropy applies log_softmax, which
            # leaves log-probabilities as they are, so on a log_softmax output it equals F.nll_loss.
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.average is not None:
            self.average.update()
        return loss.detach() * len(y), (logits.argmax(1) == y).sum()

    def epoch(self, augmented, progress=iter):
        """One pass in a fresh random order; progress wraps the batches (a progress bar). Returns
        (mean loss, accuracy %) of the model being trained, on the batches as it saw them."""
        self.model.train()
        n = len(self.labels)
        loss_sum = torch.zeros((), device=self.labels.device)
        correct = torch.zeros((), device=self.labels.device, dtype=torch.long)
        for idx in progress(torch.randperm(n, device=self.labels.device).split(self.batch_size)):
            loss, right = self.step(idx, augmented)
            loss_sum += loss
            correct += right
        return loss_sum.item() / n, 100 * correct.item() / n


def schedule(optimizer, scheduler, steps):
    """([lr], [momentum]) of optimizer's first group before each of `steps` steps, as scheduler sets
    them. Steps both: pass throwaway ones (an optimizer over a dummy parameter)."""
    lrs, momenta = [], []
    for i in range(steps):
        group = optimizer.param_groups[0]
        lrs.append(group["lr"])
        momenta.append(group["momentum"])
        if i < steps - 1:
            optimizer.step()  # no gradients: changes nothing, but keeps the scheduler's order check quiet
            scheduler.step()
    return lrs, momenta


class NesterovSGD:
    """torch.optim.SGD(nesterov=True, dampening=0) with the learning rate AND the momentum passed in
    as device tensors at each step. torch's SGD takes a tensor learning rate but a float momentum,
    and OneCycleLR cycles the momentum too: a captured graph must read both anew at every replay."""

    def __init__(self, params, weight_decay):
        self.params = list(params)
        self.weight_decay = weight_decay
        # Zeros, not torch's lazily created buffers: the first step gives momentum * 0 + grad, the
        # same as torch's copy of the gradient, and the memory exists before the capture.
        self.buffers = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, lr, momentum):
        # Multi-tensor (foreach) ops: a handful of kernels for all the parameters, not a few each.
        grads = torch._foreach_add([p.grad for p in self.params], self.params, alpha=self.weight_decay)
        torch._foreach_mul_(self.buffers, momentum)
        torch._foreach_add_(self.buffers, grads)
        updates = torch._foreach_mul(self.buffers, momentum)  # Nesterov: lr * (grad + momentum * buf)
        torch._foreach_add_(updates, grads)
        torch._foreach_mul_(updates, lr)
        torch._foreach_sub_(self.params, updates)


class GraphedSteps:
    """Trains `model` one epoch at a time, each step replayed from a captured CUDA graph
    (capture=False: run eagerly, as on a CPU). The same steps as EagerSteps, in the same order.

    Every graph the run needs is captured here, before the first epoch: one per batch size (the last
    batch of an epoch is smaller: 60,000 = 468 x 128 + 96) and per augmentation (the last epochs
    train on clean images). A step that cannot be captured raises CaptureError before any training."""

    def __init__(self, model, average, images, labels, config, amp_dtype=None, capture=True):
        device = labels.device
        self.model, self.average, self.images, self.labels = model, average, images, labels
        self.batch_size, self.amp_dtype, self.capture = config.batch_size, amp_dtype, capture
        steps_per_epoch = -(-len(labels) // config.batch_size)
        total = steps_per_epoch * config.epochs
        lrs, momenta = schedule(*make_optimizer([torch.zeros(1, requires_grad=True)], config, steps_per_epoch), total)
        decays = [average.decay_at(t) for t in range(1, total + 1)] if average is not None else None
        # A capture's warm-up may start at the last step and read past the end: repeat the last value.
        padded = lambda values: torch.tensor(values + values[-1:] * WARM_UP_STEPS, device=device)
        self.lrs, self.momenta = padded(lrs), padded(momenta)
        self.decays = None if decays is None else padded(decays)
        self.optimizer = NesterovSGD(model.parameters(), WEIGHT_DECAY)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        for p in self.optimizer.params:
            p.grad = torch.zeros_like(p)  # fixed memory that every replay's backward fills
        sizes = {config.batch_size, len(labels) % config.batch_size} - {0}
        self.indices = {n: torch.zeros(n, dtype=torch.long, device=device) for n in sizes}  # each step's batch
        self.graphs = {}  # (batch size, augmented) -> captured graph
        if capture:
            kinds = {config.augment and epoch <= config.epochs - config.clean_epochs
                     for epoch in range(1, config.epochs + 1)}
            for key in sorted((n, augmented) for n in sizes for augmented in kinds):
                self.graphs[key] = self._capture(*key)

    def lr(self):
        """The learning rate of the next step."""
        return self.lrs[self.step_index].item()

    def step(self, batch_size, augmented):
        """One training step on the indices in self.indices[batch_size]."""
        idx = self.indices[batch_size]
        x, y = to_float(self.images[idx]), self.labels[idx]
        if augmented:
            x = augment(x, **AUGMENT)
        # Without the autocast cache: a graph must not keep casts made during its capture.
        with autocast(y.device.type, self.amp_dtype, cache_enabled=False):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
        for p in self.optimizer.params:
            p.grad.zero_()
        loss.backward()
        now = lambda schedule: schedule.index_select(0, self.step_index).squeeze(0)  # 0-d, read on the device
        self.optimizer.step(now(self.lrs), now(self.momenta))
        if self.average is not None:
            self.average.update(now(self.decays))
        self.step_index += 1
        self.loss_sum += loss.detach() * batch_size
        self.correct += (logits.argmax(1) == y).sum()

    def _state(self):
        """Every tensor a step changes (buffers persistent or not), so a warm-up can be undone."""
        models = [self.model] + ([self.average.model] if self.average is not None else [])
        return [*(t for m in models for t in (*m.parameters(), *m.buffers())), *self.optimizer.buffers,
                self.step_index, self.loss_sum, self.correct]

    def _warm_up(self, batch_size, augmented):
        """WARM_UP_STEPS eager steps, off the default stream on CUDA as torch.cuda.graph requires,
        then every tensor and the random-number state put back: the steps never happened."""
        cuda = self.labels.device.type == "cuda"
        with torch.no_grad():
            saved = [t.clone() for t in self._state()]
        rng = torch.cuda.get_rng_state() if cuda else torch.get_rng_state()
        side = torch.cuda.Stream() if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            for _ in range(WARM_UP_STEPS):
                self.step(batch_size, augmented)
        if cuda:
            torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for t, value in zip(self._state(), saved):
                t.copy_(value)
        (torch.cuda.set_rng_state if cuda else torch.set_rng_state)(rng)

    def _capture(self, batch_size, augmented):
        """The graph of one step with this batch size and augmentation."""
        self._warm_up(batch_size, augmented)  # an error in the model's own code surfaces here, eagerly
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step(batch_size, augmented)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [""])[0]
            raise CaptureError(f"the training step could not be captured as a CUDA graph "
                               f"({type(e).__name__}: {reason})") from e
        return graph

    def epoch(self, augmented, progress=iter):
        """One pass in a fresh random order, as EagerSteps.epoch; the one read back to the host is
        at the end."""
        self.model.train()
        n = len(self.labels)
        self.loss_sum.zero_()
        self.correct.zero_()
        for idx in progress(torch.randperm(n, device=self.labels.device).split(self.batch_size)):
            self.indices[len(idx)].copy_(idx)
            if self.capture:
                self.graphs[(len(idx), augmented)].replay()
            else:
                self.step(len(idx), augmented)
        return self.loss_sum.item() / n, 100 * self.correct.item() / n


def make_steps(model, average, images, labels, config, amp_dtype=None):
    """GraphedSteps when config.cuda_graph is set (captured on CUDA, eager elsewhere), else EagerSteps."""
    if config.cuda_graph:
        return GraphedSteps(model, average, images, labels, config, amp_dtype, capture=labels.device.type == "cuda")
    return EagerSteps(model, average, images, labels, config, amp_dtype)
