"""The simulated MLLM: an offline stand-in for LLaVA on a held-out pool whose labels it may read.

For each image it decides, from a generator seeded by (seed, image content), whether its answer is
right (probability ``accuracy``); a wrong answer is drawn from a seeded confusion model (each class
has its own Dirichlet-drawn distribution over the other classes). The same image always gets the
same answer, in its caption and in its class distribution. Captions come from varied templates.
Everything it produces is reported as "simulated MLLM" by the code that shows it.
"""

from __future__ import annotations

import numpy as np
import torch

from fl_core.data.webpool import WebPool
from fl_core.teachers.cache import image_digest

CAPTION_TEMPLATES = (
    "a photo of a {name}.",
    "a close-up picture of a {name}.",
    "a low-resolution image showing a {name}.",
    "a blurry photo of a {name}, centered in the frame.",
    "a simple picture of a single {name} on a plain background.",
    "an image that contains a {name}.",
    "a small, grainy snapshot of a {name}.",
    "a cropped photo of a {name}.",
)


class SimulatedMLLM:
    simulated = True

    def __init__(self, pool: WebPool, class_names: list[str], accuracy: float = 0.9, seed: int = 0):
        labels = pool.hidden_labels("simulated-mllm")
        self.class_names = list(class_names)
        self.accuracy = accuracy
        self.seed = seed
        self.name = f"simulated-mllm(accuracy={accuracy:g}, seed={seed})"
        self._truth = {}
        for image, label in zip(pool.images, labels.tolist()):
            self._truth.setdefault(image_digest(image), label)
        c = len(class_names)
        confusion = np.random.RandomState(seed).dirichlet(np.full(c - 1, 0.5), size=c)
        self.confusion = np.zeros((c, c))
        for k in range(c):
            self.confusion[k, np.arange(c) != k] = confusion[k]

    def describe(self) -> dict:
        return {"backend": "simulated", "accuracy": self.accuracy, "seed": self.seed,
                "note": "simulated MLLM: reads the hidden labels of the held-out pool"}

    def _answer(self, digest: str) -> tuple[int, np.ndarray]:
        """(answer, class distribution) for one image digest, both fixed by seed and image content."""
        if digest not in self._truth:
            raise ValueError("the simulated MLLM can only annotate images of the held-out pool it was built on")
        truth = self._truth[digest]
        rng = np.random.RandomState((int(digest[:8], 16) ^ self.seed) & 0xFFFFFFFF)
        c = len(self.class_names)
        answer = truth if rng.rand() < self.accuracy else int(rng.choice(c, p=self.confusion[truth]))
        logits = rng.normal(0.0, 0.5, c) + 2.0 * self.confusion[truth]
        others = np.delete(logits, answer)
        logits[answer] = others.max() + rng.uniform(0.5, 4.0)  # the answer is the argmax, confidence varies
        probs = np.exp(logits - logits.max())
        return answer, probs / probs.sum()

    def class_distribution(self, images: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        """(N, C) distribution over ``class_names`` (must be the classes it was built with)."""
        if list(class_names) != self.class_names:
            raise ValueError("the simulated MLLM answers over the dataset's own classes only")
        return torch.tensor(np.stack([self._answer(image_digest(im))[1] for im in images]), dtype=torch.float32)

    def caption(self, images: torch.Tensor, prompt: str = "") -> list[str]:
        """A caption naming the class it believes each image shows."""
        captions = []
        for image in images:
            digest = image_digest(image)
            answer, _ = self._answer(digest)
            template = CAPTION_TEMPLATES[int(digest[8:16], 16) % len(CAPTION_TEMPLATES)]
            captions.append(template.format(name=self.class_names[answer]))
        return captions
