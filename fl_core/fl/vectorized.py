"""Train all sampled clients of a round at once: their models are stacked along a leading client
dimension and run as one model (``fl_core.fl.stacked``: grouped convolutions, BatchNorm statistics
kept per client, batched matrix products), so one step updates every client.

Equal to training the clients one after another with ``local_sgd`` (same generators: same batches
and augmentations, losses and weights within float tolerance; tested). Clients whose datasets
differ in size are handled exactly by bucketing: each step trains, per batch size present, the
clients whose next batch has that size; a client that has finished its epochs sits out.

This pays where a step is bound by kernel launches (small models on a GPU) and, on a CPU, for small
models (see ``benchmarks/round_speed.py``). On CUDA a step still launches hundreds of kernels from
Python; with ``cuda_graphs`` each recurring step (same members, same batch size: most steps of a
round) is captured once as a CUDA graph and replayed, gathering and augmenting its batch inside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from collections import defaultdict
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from fl_core.data.augment import ImagePipeline
from fl_core.data.datasets import ImageSplit
from fl_core.fl.local import LocalStats, SGDSettings, full_precision, plan_client_steps
from fl_core.fl.stacked import per_client, stacked_skeleton


def train_clients_vectorized(
    model: nn.Module,
    clients: list[ImageSplit],
    pipeline: ImagePipeline,
    generators: list[torch.Generator],
    sgd: SGDSettings,
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    cuda_graphs: bool = False,
    channels_last: bool | None = None,
    grouped_conv: str = "native",
    compile_backend: str | Callable | None = None,
) -> list[tuple[dict[str, torch.Tensor], LocalStats]]:
    """Local SGD of every client in ``clients`` from ``model``'s weights (left unchanged), with the
    semantics of ``local_sgd`` (plain SGD with optional momentum, weight decay and FedProx).

    ``extra_loss(logits, indices)`` adds a method's term, as in ``local_sgd`` but for a bucket of
    members at once: logits ``(members, batch, classes)``, indices ``(members, batch)`` into the
    clients' datasets concatenated in the order given; it returns each member's term ``(members,)``.

    ``cuda_graphs`` replays recurring steps from CUDA graphs (CUDA only); ``channels_last`` lays
    out the stacked batches channels-last (default: on CPU only); ``grouped_conv`` picks the
    convolution kernels (``stacked_skeleton``); ``compile_backend`` names a ``torch.compile``
    backend (e.g. ``"inductor"``) for the forward pass and loss of the recurring step (every client,
    a full batch), compiled on its first call and reused by later rounds and runs of the same shapes;
    other steps stay eager, since each new shape would cost a compile. None changes the arithmetic,
    only its rounding.

    Returns each client's ``(state_dict, LocalStats)`` in the order given.
    """
    device = clients[0].images.device
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs the clients' data on a CUDA device, not {device.type}")
    if channels_last is None:
        channels_last = device.type == "cpu"  # oneDNN runs these grouped convolutions ~1.3x faster
    num = len(clients)
    skeleton = stacked_skeleton(model, grouped_conv)
    stack = {name: t.detach().unsqueeze(0).repeat(num, *[1] * t.dim()) for name, t in model.state_dict().items()}
    param_names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: stack[n] for n in param_names}
    buffers = {n: t for n, t in stack.items() if n not in params}
    anchor = {n: t.clone() for n, t in params.items()} if sgd.prox_mu > 0 else None
    velocity = {n: torch.zeros_like(t) for n, t in params.items()} if sgd.momentum else None

    compiled = None if compile_backend is None else _compiled_logits_and_losses(compile_backend)

    def batched_loss(p, b, x, y, idx):
        """Each member's mean cross-entropy (what is reported) and its training objective (plus the
        extra term); ``x`` in the stacked layout, ``y`` and ``idx`` (members, batch)."""
        recurring = compiled is not None and y.shape == (num, sgd.batch_size)
        logits, losses = (compiled if recurring else _logits_and_losses)(skeleton, p, b, x, y, sgd)
        return losses, losses if extra_loss is None else losses + extra_loss(logits, idx)

    plans = [plan_client_steps(len(data), pipeline, gen, epochs=sgd.epochs, batch_size=sgd.batch_size, device=device)
             for data, gen in zip(clients, generators)]
    # the round's clients as one dataset (each plan's indices shifted to its client's block), so that
    # a step gathers and augments every member's batch at once
    images = torch.cat([data.images for data in clients])
    labels = torch.cat([data.labels for data in clients])
    first = [0, *itertools.accumulate(len(data) for data in clients)][:-1]
    plans = [dataclasses.replace(plan, indices=plan.indices + offset) for plan, offset in zip(plans, first)]
    rows_of: dict[tuple[int, ...], torch.Tensor] = {}  # member tuples recur: one host-to-device copy each
    loss_sum = torch.zeros(num, device=device, dtype=next(iter(params.values())).dtype)
    steps = [len(plan.bounds) for plan in plans]
    graphs = _StepGraphs(device) if cuda_graphs else None

    def bucket_step(members: tuple[int, ...], rows: torch.Tensor | None, indices: torch.Tensor, draws: torch.Tensor | None):
        """One step of the bucket ``members``: their batches gathered and augmented, trained, losses summed."""
        x, y, idx = _stacked_batch(indices, draws, len(members), images, labels, pipeline, channels_last)
        losses = _step(rows, x, y, idx, params, buffers, anchor, velocity, batched_loss, sgd)
        if rows is None:
            loss_sum.add_(losses)
        else:
            loss_sum.index_add_(0, rows, losses)

    with graphs or contextlib.nullcontext():
        for t in range(max(steps)):
            buckets: dict[int, list[int]] = defaultdict(list)  # batch size -> the clients whose step t has it
            for k, plan in enumerate(plans):
                if t < steps[k]:
                    start, stop = plan.bounds[t]
                    buckets[stop - start].append(k)
            for size, members in buckets.items():
                members = tuple(members)
                rows = None
                if len(members) < num:
                    if members not in rows_of:
                        rows_of[members] = torch.tensor(members, device=device)
                    rows = rows_of[members]
                indices, draws = _member_batches([plans[k].take(t) for k in members])
                run = functools.partial(bucket_step, members, rows)
                if graphs is None:
                    run(indices, draws)
                else:
                    graphs.run((members, size), run, indices, draws)
    loss_totals = loss_sum.tolist()
    return [
        ({n: stack[n][k].clone() for n in stack},
         LocalStats(num_samples=len(clients[k]), steps=steps[k], mean_loss=loss_totals[k] / max(steps[k], 1)))
        for k in range(num)
    ]


def _logits_and_losses(skeleton: nn.Module, p: dict, b: dict, x: torch.Tensor, y: torch.Tensor, sgd: SGDSettings):
    """The stacked forward pass: each member's logits ``(members, batch, classes)`` in full precision
    and its mean cross-entropy ``(members,)``."""
    with sgd.autocast(x.device):
        _, logits = functional_call(skeleton, (p, b), (x,))
    logits = per_client(full_precision(logits), len(y))
    losses = F.cross_entropy(logits.reshape(y.numel(), -1), y.reshape(-1), reduction="none").view_as(y).mean(1)
    return logits, losses


@functools.cache
def _compiled_logits_and_losses(backend: str | Callable):
    # Fixed shapes: the recurring step's shapes never change within a run, and dynamic shapes would
    # lose the convolutions' layout specializations.
    return torch.compile(_logits_and_losses, backend=backend, dynamic=False)


def _member_batches(members) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The bucket's step batches interleaved (image ``b`` of every member side by side): image
    indices and augmentation draws; ``members`` holds each member's ``ClientSteps.take``."""
    indices = torch.stack([indices for indices, _ in members], dim=1).flatten()
    draws = None if members[0][1] is None else torch.stack([d for _, d in members], dim=1).flatten(0, 1)
    return indices, draws


def _stacked_batch(indices, draws, members: int, images, labels, pipeline: ImagePipeline,
                   channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bucket's batches (``_member_batches``) gathered and augmented in one go: images in the
    stacked model's layout, labels and indices ``(members, batch)``."""
    x = pipeline.augment(pipeline.normalize(images[indices]), draws)
    size = len(indices) // members
    x = x.view(size, members * x.shape[1], *x.shape[2:])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    idx = indices.view(size, members).T
    return x, labels[idx], idx


class _StepGraphs:
    """Runs a round's bucket steps, each recurring one from a CUDA graph: a step's first occurrence
    runs eagerly (and warms up), its second is captured and replayed, later ones copy their batch's
    indices and draws into the captured inputs and replay. A graph replays the very kernels the
    eager step launches, on the same tensors (updated in place), so the arithmetic is unchanged.
    Used as a context: the steps run on a side stream, as capture requires of warm-up work.

    Each graph keeps its own memory for a step's activations, so at most ``max_graphs`` are held
    (clients of very different sizes make many member sets); steps beyond them run eagerly."""

    def __init__(self, device: torch.device, max_graphs: int = 16):
        self.max_graphs = max_graphs
        self.stream = torch.cuda.Stream(device)
        self.seen: set = set()
        self.graphs: dict = {}

    def __enter__(self):
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        self._context = torch.cuda.stream(self.stream)
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        self._context.__exit__(*exc)
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        self.graphs.clear()  # frees the graphs' memory pools

    def run(self, key, step: Callable, *inputs: torch.Tensor | None) -> None:
        if key in self.graphs:
            graph, static = self.graphs[key]
            for held, given in zip(static, inputs):
                if held is not None:
                    held.copy_(given, non_blocking=True)
            graph.replay()
        elif key in self.seen and len(self.graphs) < self.max_graphs:
            static = [None if given is None else given.clone() for given in inputs]
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    step(*static)
            except RuntimeError as error:  # e.g. a method's loss that reads a value back to the host
                raise RuntimeError(f"capturing a local training step as a CUDA graph failed ({error}); a "
                                   "step must not synchronize with the host. Run with fl.cuda_graphs=off") from error
            graph.replay()  # capturing records the step without running it
            self.graphs[key] = (graph, static)
        else:
            self.seen.add(key)
            step(*inputs)


def _step(rows, x, y, idx, params, buffers, anchor, velocity, batched_loss, sgd: SGDSettings) -> torch.Tensor:
    """One SGD step of the clients ``rows`` (None: all of them; else a bucket gathered and scattered
    back) on their stacked batches ``x``, ``y`` (images ``idx``); updates the stacked tensors in place and returns
    the members' losses."""
    everyone = rows is None

    def pick(tensors):
        return tensors if everyone else {n: t[rows] for n, t in tensors.items()}

    p = {n: t.detach().requires_grad_(True) for n, t in pick(params).items()}
    b = pick(buffers)
    losses, objectives = batched_loss(p, b, x, y, idx)
    objective = objectives.sum()
    if anchor is not None:
        a = pick(anchor)
        objective = objective + sgd.prox_mu / 2 * sum((p[n] - a[n]).pow(2).sum() for n in p)
    weights = list(p.values())
    grads = torch.autograd.grad(objective, weights)
    with torch.no_grad():  # torch.optim.SGD's update, one multi-tensor op per line (few kernels on CUDA)
        weights = [w.detach() for w in weights]
        if sgd.weight_decay:
            grads = torch._foreach_add(grads, weights, alpha=sgd.weight_decay)
        if velocity is not None:  # buf = momentum * buf + grad (buf starts as grad)
            v = pick(velocity)
            torch._foreach_mul_(list(v.values()), sgd.momentum)
            torch._foreach_add_(list(v.values()), grads)
            grads = list(v.values())
        torch._foreach_sub_(weights, grads, alpha=sgd.lr)
        if not everyone:  # scatter the bucket's rows back
            for n, weight in zip(p, weights):
                params[n][rows] = weight
                if velocity is not None:
                    velocity[n][rows] = v[n]
            for n, t in b.items():
                buffers[n][rows] = t
    return losses.detach()
