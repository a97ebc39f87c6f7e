"""The client's local update: plain minibatch SGD with cross-entropy (optionally FedProx)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    precision: str = "fp32"  # or "bf16": the forward pass under bf16 autocast

    @classmethod
    def from_config(cls, fl, prox_mu: float = 0.0) -> "SGDSettings":
        """The settings of ``cfg.fl`` (an ``FLConfig``) with a method's ``prox_mu``."""
        return cls(fl.local_epochs, fl.batch_size, fl.lr, fl.momentum, fl.weight_decay, prox_mu, fl.precision)

    def autocast(self, device: torch.device):
        """The forward pass's autocast context (a no-op in fp32). Its weight cache is off: a cached
        cast would be stale after the in-place update, and CUDA graphs cannot capture one."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16", cache_enabled=False)


@dataclass(frozen=True)
class ClientSteps:
    """Every local step of one client, drawn up front and held on the client's device: the
    concatenated per-epoch permutations, the augmentation draws in the same order, and each step's
    ``(start, stop)`` slice of both."""

    indices: torch.Tensor
    draws: torch.Tensor | None
    bounds: tuple[tuple[int, int], ...]

    def take(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image indices and augmentation draws of local step ``step``."""
        start, stop = self.bounds[step]
        return self.indices[start:stop], None if self.draws is None else self.draws[start:stop]

    def batch(self, step: int, data: ImageSplit, pipeline: ImagePipeline) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(augmented images, labels, indices)`` of local step ``step``."""
        idx, draws = self.take(step)
        return pipeline.augment(pipeline.normalize(data.images[idx]), draws), data.labels[idx], idx


def plan_client_steps(num_samples: int, pipeline: ImagePipeline, generator: torch.Generator, *, epochs: int,
                      batch_size: int, device: torch.device | str) -> ClientSteps:
    """Draw a client's local training: reshuffled each epoch, last batch kept even when short, as a
    ``DataLoader(shuffle=True)`` does. All randomness comes from ``generator``, drawn in step order
    (an epoch's permutation, then each batch's augmentation), so clients trained together draw what
    they draw alone. Drawn on the CPU and moved in one copy, not one per step (each a sync on CUDA)."""
    orders, draws, bounds = [], [], []
    for epoch in range(epochs):
        orders.append(torch.randperm(num_samples, generator=generator))
        for start in range(0, num_samples, batch_size):
            stop = min(start + batch_size, num_samples)
            if (drawn := pipeline.draw(generator, stop - start)) is not None:
                draws.append(drawn)
            bounds.append((epoch * num_samples + start, epoch * num_samples + stop))
    return ClientSteps(torch.cat(orders).to(device), torch.cat(draws).to(device) if draws else None, tuple(bounds))


def full_precision(logits: torch.Tensor) -> torch.Tensor:
    """bf16 logits (autocast) -> float32 for the loss; others as they are (float64 in tests)."""
    return logits.float() if logits.dtype == torch.bfloat16 else logits


def local_sgd(
    model: nn.Module,
    data: ImageSplit,
    pipeline: ImagePipeline,
    generator: torch.Generator,
    sgd: SGDSettings,
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> LocalStats:
    """Train ``model`` in place for ``sgd.epochs`` passes over ``data`` (see ``plan_client_steps``).

    ``sgd.prox_mu > 0`` adds FedProx's ``mu/2 * ||w - w_start||^2`` with ``w_start`` the incoming
    weights; ``extra_loss(logits, batch_indices)`` adds a method's term (e.g. distillation).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    prox_mu = sgd.prox_mu
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
    optimizer = torch.optim.SGD(params, lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay)
    total_loss = torch.zeros((), device=data.images.device, dtype=params[0].dtype)
    steps = 0
    plan = plan_client_steps(len(data), pipeline, generator, epochs=sgd.epochs, batch_size=sgd.batch_size,
                             device=data.images.device)
    for step in range(len(plan.bounds)):
        x, y, idx = plan.batch(step, data, pipeline)
        with sgd.autocast(x.device):
            _, logits = model(x)
        logits = full_precision(logits)
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
