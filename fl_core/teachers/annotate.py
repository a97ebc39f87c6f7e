"""Annotating the web pool with the MLLM: captions, class distributions q, hard labels, and the
measured label accuracy where the pool's hidden labels exist."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fl_core.data.webpool import WebPool
from fl_core.teachers.cache import TeacherCache, image_digest


@dataclass
class Annotation:
    captions: list[str]
    class_probs: torch.Tensor  # q: (N, C) MLLM distribution over the classes
    labels: torch.Tensor  # argmax of q
    accuracy: float | None  # against the held-out pool's hidden labels; None for real web data
    mllm: dict  # the MLLM's describe(); 'backend': 'simulated' marks simulated annotations

    @property
    def simulated(self) -> bool:
        return self.mllm.get("backend") == "simulated"


def annotate_pool(pool: WebPool, class_names: list[str], mllm, cache: TeacherCache, prompt: str,
                  batch_size: int = 64, progress: bool = True) -> Annotation:
    """Caption every pool image and ask for its class distribution (cached per image)."""
    digests = [image_digest(im) for im in pool.images]
    captions = cache.map({"kind": "caption", "mllm": mllm.name, "prompt": prompt}, digests,
                         lambda pos: mllm.caption(pool.images[pos], prompt), batch_size,
                         desc="MLLM captions", progress=progress)
    rows = cache.map({"kind": "class_distribution", "mllm": mllm.name, "classes": list(class_names)}, digests,
                     lambda pos: list(mllm.class_distribution(pool.images[pos], class_names)), batch_size,
                     desc="MLLM class distributions", progress=progress)
    probs = torch.stack(rows).float()
    labels = probs.argmax(1)
    accuracy = None
    if pool.has_hidden_labels:
        accuracy = float((labels == pool.hidden_labels("measure-annotation-accuracy")).float().mean())
    return Annotation(captions, probs, labels, accuracy, mllm.describe())
