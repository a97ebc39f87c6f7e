"""Train all sampled clients of a round at once: their models are stacked along a leading client
dimension and one ``torch.func.vmap``-ed step updates every client (convolutions become grouped
convolutions, BatchNorm keeps its statistics per client).

Equal to training the clients one after another with ``local_sgd`` (same generators: same batches
and augmentations, losses and weights within float tolerance; tested). Clients whose datasets
differ in size are handled exactly by bucketing: each step trains, per batch size present, the
clients whose next batch has that size; a client that has finished its epochs sits out.

This pays where a step is bound by kernel launches (small models on a GPU). On a CPU that is
already compute-bound, grouped convolutions are slower than separate ones, so ``fl.client_training
= auto`` uses it only on CUDA (see ``benchmarks/round_speed.py``).
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from fl_core.data.augment import ImagePipeline
from fl_core.data.datasets import ImageSplit
from fl_core.fl.local import LocalStats, SGDSettings, client_batches


def train_clients_vectorized(
    model: nn.Module,
    clients: list[ImageSplit],
    pipeline: ImagePipeline,
    generators: list[torch.Generator],
    sgd: SGDSettings,
) -> list[tuple[dict[str, torch.Tensor], LocalStats]]:
    """Local SGD of every client in ``clients`` from ``model``'s weights (left unchanged), with the
    semantics of ``local_sgd`` (plain SGD with optional momentum, weight decay and FedProx).

    Returns each client's ``(state_dict, LocalStats)`` in the order given.
    """
    num = len(clients)
    skeleton = copy.deepcopy(model).to("meta").train()
    stack = {name: t.detach().unsqueeze(0).repeat(num, *[1] * t.dim()) for name, t in model.state_dict().items()}
    param_names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: stack[n] for n in param_names}
    buffers = {n: t for n, t in stack.items() if n not in params}
    anchor = {n: t.clone() for n, t in params.items()} if sgd.prox_mu > 0 else None
    velocity = {n: torch.zeros_like(t) for n, t in params.items()} if sgd.momentum else None

    def client_loss(p, b, x, y):
        _, logits = functional_call(skeleton, (p, b), (x,))
        return F.cross_entropy(logits, y)

    batched_loss = vmap(client_loss, randomness="error")
    streams = [client_batches(data, pipeline, gen, epochs=sgd.epochs, batch_size=sgd.batch_size)
               for data, gen in zip(clients, generators)]
    pending = {k: next(stream, None) for k, stream in enumerate(streams)}
    loss_sum = [torch.zeros((), device=clients[0].images.device) for _ in range(num)]
    steps = [0] * num
    while pending:
        buckets: dict[int, list[int]] = defaultdict(list)
        for k, batch in pending.items():
            buckets[len(batch[1])].append(k)
        for members in buckets.values():
            losses = _step(members, num, [pending[k] for k in members], params, buffers, anchor, velocity,
                           batched_loss, sgd)
            for k, loss in zip(members, losses):
                loss_sum[k] += loss
                steps[k] += 1
        pending = {k: batch for k in pending if (batch := next(streams[k], None)) is not None}
    return [
        ({n: stack[n][k].clone() for n in stack},
         LocalStats(num_samples=len(clients[k]), steps=steps[k], mean_loss=float(loss_sum[k]) / max(steps[k], 1)))
        for k in range(num)
    ]


def _step(members, num, batches, params, buffers, anchor, velocity, batched_loss, sgd: SGDSettings) -> torch.Tensor:
    """One SGD step of the clients ``members`` (all of them, or a bucket gathered and scattered
    back); updates the stacked tensors in place and returns the members' losses."""
    everyone = len(members) == num
    rows = None if everyone else torch.tensor(members, device=next(iter(params.values())).device)

    def pick(tensors):
        return tensors if everyone else {n: t[rows] for n, t in tensors.items()}

    p = {n: t.detach().requires_grad_(True) for n, t in pick(params).items()}
    b = pick(buffers)
    x = torch.stack([batch[0] for batch in batches])
    y = torch.stack([batch[1] for batch in batches])
    losses = batched_loss(p, b, x, y)
    objective = losses.sum()
    if anchor is not None:
        a = pick(anchor)
        objective = objective + sgd.prox_mu / 2 * sum((p[n] - a[n]).pow(2).sum() for n in p)
    grads = torch.autograd.grad(objective, list(p.values()))
    with torch.no_grad():
        v = pick(velocity) if velocity is not None else None
        for (n, weight), grad in zip(p.items(), grads):
            if sgd.weight_decay:
                grad = grad.add(weight, alpha=sgd.weight_decay)
            if v is not None:  # torch.optim.SGD: buf = momentum * buf + grad (buf starts as grad)
                grad = v[n].mul_(sgd.momentum).add_(grad)
            weight = weight.detach().sub_(grad, alpha=sgd.lr)
            if not everyone:
                params[n][rows] = weight
                if v is not None:
                    velocity[n][rows] = v[n]
        if not everyone:
            for n, t in b.items():
                buffers[n][rows] = t
    return losses.detach()
