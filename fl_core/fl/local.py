"""The client's local update: plain minibatch SGD with cross-entropy (optionally FedProx)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from fl_core.data.augment import ImagePipeline
from fl_core.data.datasets import ImageSplit


@dataclass
class LocalStats:
    num_samples: int
    steps: int
    mean_loss: float


@dataclass(frozen=True)
class SGDSettings:
    """A client's local optimisation: ``epochs`` passes of minibatch SGD (``torch.optim.SGD``
    semantics), plus FedProx's proximal term when ``prox_mu > 0``."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0

    @classmethod
    def from_config(cls, fl, prox_mu: float = 0.0) -> "SGDSettings":
        """The settings of ``cfg.fl`` (an ``FLConfig``) with a method's ``prox_mu``."""
        return cls(fl.local_epochs, fl.batch_size, fl.lr, fl.momentum, fl.weight_decay, prox_mu)


def client_batches(data: ImageSplit, pipeline: ImagePipeline, generator: torch.Generator, *, epochs: int,
                   batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(augmented images, labels, indices)`` of every local step: reshuffled each epoch, last batch
    kept even when short, as a ``DataLoader(shuffle=True)`` does. All randomness comes from
    ``generator``, drawn in step order, so clients trained together draw what they draw alone."""
    n = len(data)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(data.images.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield pipeline.train_batch(data.images[idx], generator), data.labels[idx], idx


def local_sgd(
    model: nn.Module,
    data: ImageSplit,
    pipeline: ImagePipeline,
    generator: torch.Generator,
    sgd: SGDSettings,
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> LocalStats:
    """Train ``model`` in place for ``sgd.epochs`` passes over ``data`` (see ``client_batches``).

    ``sgd.prox_mu > 0`` adds FedProx's ``mu/2 * ||w - w_start||^2`` with ``w_start`` the incoming
    weights; ``extra_loss(logits, batch_indices)`` adds a method's term (e.g. distillation).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    prox_mu = sgd.prox_mu
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
    optimizer = torch.optim.SGD(params, lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay)
    total_loss = torch.zeros((), device=data.images.device)
    steps = 0
    for x, y, idx in client_batches(data, pipeline, generator, epochs=sgd.epochs, batch_size=sgd.batch_size):
        _, logits = model(x)
        loss = F.cross_entropy(logits, y)
        objective = loss
        if extra_loss is not None:
            objective = objective + extra_loss(logits, idx)
        if anchor is not None:
            objective = objective + prox_mu / 2 * sum((p - a).pow(2).sum() for p, a in zip(params, anchor))
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        total_loss += loss.detach()
        steps += 1
    return LocalStats(num_samples=len(data), steps=steps, mean_loss=float(total_loss) / max(steps, 1))
