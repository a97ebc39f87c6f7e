"""Accuracy (top-1, per class, per class group) and cost accounting."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from fl_core.data.augment import ImagePipeline
from fl_core.data.datasets import ImageSplit
from fl_core.models import inference_batch, inference_model

GROUP_NAMES = ("many", "medium", "few", "head", "middle", "tail")


def predict(model: nn.Module, split: ImageSplit, pipeline: ImagePipeline, batch_size: int = 500) -> torch.Tensor:
    """Predicted class of every image in ``split``, by ``model``'s inference form (``inference_model``:
    eval mode, BatchNorm folded, channels-last on a CPU; ``model`` itself is left as it is)."""
    return _predict(inference_model(model), split, pipeline, batch_size)


@torch.inference_mode()
def _predict(model: nn.Module, split: ImageSplit, pipeline: ImagePipeline, batch_size: int) -> torch.Tensor:
    preds = [model(inference_batch(pipeline.normalize(split.images[i : i + batch_size])))[1].argmax(1)
             for i in range(0, len(split), batch_size)]
    return torch.cat(preds)


def per_class_accuracy(preds, labels, num_classes: int) -> np.ndarray:
    """Accuracy of each class (NaN for a class absent from ``labels``)."""
    preds, labels = np.asarray(torch.as_tensor(preds).cpu()), np.asarray(torch.as_tensor(labels).cpu())
    total = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels[preds == labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def group_accuracy(per_class: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Mean per-class accuracy of each group over its classes with test images; ``None`` for a group
    without any (no classes, or none in the test set)."""
    return {name: (float(np.nanmean(per_class[idx])) if not np.isnan(per_class[idx]).all() else None)
            for name, idx in groups.items()}


def evaluate(model, split: ImageSplit, pipeline: ImagePipeline, groups: dict, num_classes: int, batch_size: int = 500) -> dict:
    """Top-1 over ``split``, per-class accuracy and the group accuracies, as a JSON-ready dict."""
    preds = predict(model, split, pipeline, batch_size)
    per_class = per_class_accuracy(preds, split.labels, num_classes)
    top1 = float((preds == split.labels).float().mean())
    return {"top1": top1, **group_accuracy(per_class, groups), "per_class": [round(float(a), 6) for a in per_class]}


def tensor_bytes(tensors) -> int:
    """Bytes of a state dict's (or an iterable's) tensors, as they would be sent."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return int(sum(t.numel() * t.element_size() for t in values))


def training_flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one training step (forward + backward) per image, as counted by torch's
    ``FlopCounterMode`` (convolutions and matmuls; normalisation and activations are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).train()
    x = torch.zeros((2, *input_shape), device=next(probe.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        probe(x)[1].sum().backward()
    return counter.get_total_flops() // 2


def forward_flops_per_image(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one inference forward pass per image (``FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((2, *input_shape), device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2
