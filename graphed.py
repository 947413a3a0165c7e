"""The training step as a CUDA graph: train.py's path on CUDA (the default there; --no-cuda-graph turns it off).

One training step of this net is about a hundred small kernels. Launched one at a time from Python,
they leave a big GPU waiting on the launches. Captured once as a CUDA graph, the whole step (batch
gather, augmentation, forward, backward, SGD, weight average) replays with one launch. A graph
replays fixed kernels on fixed memory, so whatever changes from step to step lives in device tensors
that the graph reads:

- the batch's indices: copied into a fixed buffer before each replay (a copy on the device);
- the learning rate and momentum: the values the eager path's torch scheduler sets, computed for
  every step up front and looked up by a step counter on the device. OneCycleLR's momentum cycle
  (0.95 -> 0.85 -> 0.95, against the learning rate) is kept that way;
- the weight average's decay: likewise, from WeightAverage.decay_at;
- random numbers (augmentation, dropout): PyTorch's CUDA generator moves on at each replay.

SGD is written out (Nesterov momentum, weight decay, as torch.optim.SGD computes it) because it has
to read its learning rate and momentum from device tensors. The last batch of an epoch is smaller
(60,000 = 468 x 128 + 96), so it gets a graph of its own, and so do the epochs without augmentation:
the recipe is the eager path's. Nothing is read back to the host inside an epoch.

Off the GPU the same step runs eagerly (capture=False), which is how the tests check it on a CPU.
"""
import contextlib

import torch
import torch.nn.functional as F
from data import to_float

WARM_UP_STEPS = 3  # eager steps before a capture, so cuDNN and the allocator settle; then undone


class CaptureError(Exception):
    """The step ran eagerly but could not be captured as a CUDA graph."""


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
    """torch.optim.SGD(nesterov=True, dampening=0) with the learning rate and momentum passed in
    as tensors at each step, so that a captured graph can read new values at every replay."""

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
    """Trains `model` one epoch at a time, each step replayed from a captured graph (CUDA) or run
    eagerly (capture=False). Runs the steps of train.py's train_one_epoch, in the same order."""

    def __init__(self, model, average, images, labels, batch_size, lrs, momenta, decays, weight_decay,
                 augment, amp_dtype=None, capture=True):
        device = labels.device
        self.model, self.average = model, average
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.augment, self.amp_dtype, self.capture = augment, amp_dtype, capture
        # A capture's warm-up may start at the last step and read past the end: repeat the last value.
        padded = lambda values: torch.tensor(values + values[-1:] * WARM_UP_STEPS, device=device)
        self.lrs, self.momenta = padded(lrs), padded(momenta)
        self.decays = None if decays is None else padded(decays)
        self.optimizer = NesterovSGD(model.parameters(), weight_decay)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        for p in self.optimizer.params:
            p.grad = torch.zeros_like(p)  # fixed memory that every replay's backward fills
        self.indices = {}  # batch size -> the fixed index buffer its step reads
        self.graphs = {}   # (batch size, augmented) -> captured graph

    def _step(self, batch_size, augmented):
        """One training step on the indices in self.indices[batch_size]."""
        idx = self.indices[batch_size]
        x, y = to_float(self.images[idx]), self.labels[idx]
        if augmented:
            x = self.augment(x)
        # Without the autocast cache: a graph must not keep casts made during its capture.
        autocast = (torch.autocast(y.device.type, dtype=self.amp_dtype, cache_enabled=False) if self.amp_dtype
                    else contextlib.nullcontext())
        with autocast:
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
                self._step(batch_size, augmented)
        if cuda:
            torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for t, value in zip(self._state(), saved):
                t.copy_(value)
        (torch.cuda.set_rng_state if cuda else torch.set_rng_state)(rng)

    def _captured(self, batch_size, augmented):
        """The graph of one step with this batch size and augmentation, captured on first use."""
        key = (batch_size, augmented)
        if key not in self.graphs:
            self._warm_up(batch_size, augmented)  # an error in the model's own code surfaces here, eagerly
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self._step(batch_size, augmented)
            except Exception as e:
                reason = (str(e).strip().splitlines() or [""])[0]
                raise CaptureError(f"the training step could not be captured as a CUDA graph "
                                   f"({type(e).__name__}: {reason})") from e
            self.graphs[key] = graph
        return self.graphs[key]

    def epoch(self, augmented, progress=iter):
        """One pass in a fresh random order; progress wraps the batches (train.py's progress bar). Returns (mean loss, accuracy %) of the model being
        trained on the batches as it saw them; the one read back to the host is here, at the end."""
        self.model.train()
        n = len(self.labels)
        self.loss_sum.zero_()
        self.correct.zero_()
        order = torch.randperm(n, device=self.labels.device)
        for idx in progress(order.split(self.batch_size)):
            if len(idx) not in self.indices:
                self.indices[len(idx)] = torch.empty_like(idx)
            self.indices[len(idx)].copy_(idx)
            if self.capture:
                self._captured(len(idx), augmented).replay()
            else:
                self._step(len(idx), augmented)
        return self.loss_sum.item() / n, 100 * self.correct.item() / n
