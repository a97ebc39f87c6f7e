"""MLLM-FL stage 3: global alignment of the aggregated model on a class-balanced set of web
images labelled by the MLLM, with ``L_align = CE(y, p) + beta * KL(q || p)``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fl_core.data.augment import ImagePipeline


@dataclass
class AlignmentSet:
    indices: np.ndarray  # into the web pool
    labels: torch.Tensor  # y = argmax q, the MLLM's label
    probs: torch.Tensor  # q, the MLLM's class distribution
    per_class: list[int]  # images per class (fewer than m where the MLLM labelled fewer)

    def __len__(self) -> int:
        return len(self.indices)


def build_alignment_set(labels: torch.Tensor, probs: torch.Tensor, num_classes: int, per_class: int, seed: int,
                        select: str = "random") -> AlignmentSet:
    """``per_class`` pool images per MLLM label: a seeded random draw, or the most confident."""
    rng = np.random.RandomState(seed)
    labels_np = labels.cpu().numpy()
    confidence = probs.max(1).values.cpu().numpy()
    chosen = []
    for c in range(num_classes):
        candidates = np.flatnonzero(labels_np == c)
        if select == "confident":
            candidates = candidates[np.argsort(-confidence[candidates], kind="stable")]
        elif select == "random":
            candidates = rng.permutation(candidates)
        else:
            raise ValueError(f"align_select={select!r} is not one of: random, confident")
        chosen.append(np.sort(candidates[:per_class]))
    indices = np.concatenate(chosen).astype(np.int64)
    return AlignmentSet(indices, labels[indices].clone(), probs[indices].clone(), [len(c) for c in chosen])


def alignment_loss(logits: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, beta: float) -> torch.Tensor:
    """``CE(y, p) + beta * KL(q || p)`` with ``p = softmax(logits)``, averaged over the batch."""
    log_p = F.log_softmax(logits, dim=1)
    kl = F.kl_div(log_p, probs, reduction="batchmean")
    return F.nll_loss(log_p, labels) + beta * kl


def align_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor,
                pipeline: ImagePipeline, generator: torch.Generator, *, epochs: int, batch_size: int, lr: float,
                beta: float, params: str = "all") -> float:
    """Fine-tune ``model`` in place on the alignment set; returns the mean loss.

    ``params='classifier'`` trains only the classifier, with the backbone (and its BN statistics) frozen.
    """
    if params == "classifier":
        model.eval()
        trainable = list(model.classifier.parameters())
    else:
        model.train()
        trainable = list(model.parameters())
    optimizer = torch.optim.SGD(trainable, lr=lr, momentum=0.9)
    labels, probs = labels.to(images.device), probs.to(images.device)
    total, steps = torch.zeros((), device=images.device), 0
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator).to(images.device)
        for start in range(0, len(images), batch_size):
            idx = order[start : start + batch_size]
            loss = alignment_loss(model(pipeline.train_batch(images[idx], generator))[1], labels[idx], probs[idx], beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
    model.train()
    return float(total) / max(steps, 1)
