"""MLLM-FL stage 1: global multimodal pretraining with dynamic weighted distillation (DWD).

The student ``f = W o pi o g`` (backbone ``g``, projection ``pi`` to the text dimension ``d``,
classifier ``W``) learns on the MLLM-captioned web pool. For a batch, with caption embeddings ``t``
from the frozen text encoder, student embeddings ``s = norm(pi(g(x)))`` and frozen image-encoder
embeddings ``v``:

    z    = norm(lambda_k * v + (1 - lambda_k) * s)
    loss = InfoNCE_sym(z, t; tau) + gamma * lambda_k * (1 - cos(s, v))

``lambda_k`` hands over from the teacher (``lambda0``) to the student (0) over the ``K`` steps.
DWD off means ``lambda_k = 0``: plain contrastive pretraining of the student. Captions with the
same text count as positives of each other (multi-positive InfoNCE), which equals the usual
InfoNCE when captions are unique. Afterwards ``W`` is set to the class-prompt text embeddings, so
the student is a zero-shot classifier, and ``W o pi`` is folded into one linear classifier: the
federated model is then the plain ResNet-8 that FedAvg uses (the same client cost).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from fl_core.data.augment import ImagePipeline


def dwd_weight(step: int, total: int, lambda0: float, schedule: str) -> float:
    """Teacher weight ``lambda_k`` at ``step`` of ``total`` (cosine, linear or constant)."""
    progress = step / max(total - 1, 1)
    if schedule == "cosine":
        return lambda0 * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lambda0 * (1 - progress)
    if schedule == "constant":
        return lambda0
    raise ValueError(f"lambda schedule {schedule!r} is not one of: cosine, linear, constant")


def multi_positive_info_nce(z: torch.Tensor, t: torch.Tensor, caption_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between unit vectors ``z`` and ``t``; pairs whose captions are identical
    (same ``caption_ids``) share the target mass."""
    logits = z @ t.T / temperature
    positives = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def dwd_loss(s: torch.Tensor, v: torch.Tensor | None, t: torch.Tensor, caption_ids: torch.Tensor, lam: float,
             temperature: float, gamma: float) -> tuple[torch.Tensor, dict]:
    """The stage-1 loss for unit-norm student ``s``, teacher ``v`` and caption ``t`` embeddings."""
    if v is None or lam == 0:
        contrastive = multi_positive_info_nce(s, t, caption_ids, temperature)
        return contrastive, {"contrastive": contrastive.detach(), "distill": torch.zeros((), device=s.device)}
    z = F.normalize(lam * v + (1 - lam) * s, dim=-1)
    contrastive = multi_positive_info_nce(z, t, caption_ids, temperature)
    distill = (1 - (s * v).sum(-1)).mean()
    return contrastive + gamma * lam * distill, {"contrastive": contrastive.detach(), "distill": distill.detach()}


def pretrain_student(student: nn.Module, images: torch.Tensor, caption_emb: torch.Tensor, caption_ids: torch.Tensor,
                     teacher_emb: torch.Tensor | None, pipeline: ImagePipeline, generator: torch.Generator, *,
                     epochs: int, batch_size: int, lr: float, lambda0: float, schedule: str, temperature: float,
                     gamma: float, progress: bool = True) -> dict:
    """Train ``student`` (whose ``forward`` returns ``(pi(g(x)), logits)``) with the DWD loss.
    ``teacher_emb=None`` trains without distillation. Returns per-epoch curves."""
    device = images.device
    caption_emb, caption_ids = caption_emb.to(device), caption_ids.to(device)
    teacher_emb = None if teacher_emb is None else teacher_emb.to(device)
    n = len(images)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    student.train()
    curves = {"epoch": [], "loss": [], "contrastive": [], "distill": [], "lambda": []}
    step = 0
    for epoch in tqdm(range(epochs), desc="stage 1 pretraining", disable=not progress, leave=False):
        sums = {"loss": 0.0, "contrastive": 0.0, "distill": 0.0, "lambda": 0.0}
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            lam = dwd_weight(step, total, lambda0, schedule) if teacher_emb is not None else 0.0
            s = F.normalize(student(pipeline.train_batch(images[idx], generator))[0], dim=-1)
            v = None if teacher_emb is None else teacher_emb[idx]
            loss, parts = dwd_loss(s, v, caption_emb[idx], caption_ids[idx], lam, temperature, gamma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for key, value in (("loss", loss.detach()), ("lambda", lam), *parts.items()):
                sums[key] += value
            step += 1
        curves["epoch"].append(epoch + 1)
        for key, value in sums.items():
            curves[key].append(float(value) / steps_per_epoch)
    return curves


@torch.no_grad()
def text_classifier(student: nn.Module, class_emb: torch.Tensor, images: torch.Tensor, pipeline: ImagePipeline,
                    temperature: float) -> None:
    """Set ``W`` to the unit class-prompt embeddings, scaled so that initial logits are about
    ``cos / temperature`` on the pool (the student's embeddings are not unit-norm)."""
    student.eval()
    norms = torch.cat([student(pipeline.normalize(images[i : i + 512]))[0].norm(dim=1) for i in range(0, len(images), 512)])
    scale = 1.0 / (temperature * float(norms.median()))
    student.classifier.weight.copy_(scale * F.normalize(class_emb, dim=-1).to(student.classifier.weight))
    student.classifier.bias.zero_()


@torch.no_grad()
def fold_projection(student_state: dict, plain_state: dict) -> dict:
    """State of the plain model (backbone + one classifier) computing the same function as the
    student's ``W o pi``: ``W' = W P``, ``b' = W p + b``."""
    folded = {k: v.clone() for k, v in student_state.items() if not k.startswith(("projection.", "classifier."))}
    w, b = student_state["classifier.weight"], student_state["classifier.bias"]
    p_w, p_b = student_state["projection.weight"], student_state["projection.bias"]
    folded["classifier.weight"] = w @ p_w
    folded["classifier.bias"] = w @ p_b + b
    missing = set(plain_state) - set(folded)
    if missing:
        raise ValueError(f"the pretrained student lacks weights of the federated model: {sorted(missing)[:5]}")
    return folded
