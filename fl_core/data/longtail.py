"""Exponential long-tail profile and the per-class sampling that applies it (numpy only)."""

from __future__ import annotations

import numpy as np

from fl_core.notices import warn_once


def long_tail_counts(train_size: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Images kept per class: ``int(n_max * (1/IF) ** (c / (C - 1)))`` with ``n_max = N / C``."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} is invalid: a long tail needs at least 2 classes")
    if imbalance_factor < 1:
        raise ValueError(f"imbalance_factor={imbalance_factor} is invalid: it must be >= 1 (1 = balanced)")
    n_max = train_size / num_classes
    ratio = 1.0 / imbalance_factor
    return [int(n_max * ratio ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def class_index_lists(labels, num_classes: int) -> list[np.ndarray]:
    """Indices of each class, in order of appearance in ``labels``."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}; got {labels.min()}..{labels.max()}")
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def long_tail_class_lists(labels, num_classes: int, imbalance_factor: float, seed: int) -> list[np.ndarray]:
    """Apply the long tail to a training set, as the CReFF/CLIP2FL code does.

    Each class's index list is shuffled by one ``RandomState(seed)`` stream (class 0 first) and its
    first ``n_c`` entries are kept. A class with fewer images than asked keeps all, with a warning.
    """
    labels = np.asarray(labels)
    counts = long_tail_counts(len(labels), num_classes, imbalance_factor)
    rng = np.random.RandomState(seed)
    kept, short = [], []
    for c, indices in enumerate(class_index_lists(labels, num_classes)):
        indices = indices.tolist()
        rng.shuffle(indices)
        if len(indices) < counts[c]:
            short.append(f"class {c}: {len(indices)} < {counts[c]}")
        kept.append(np.asarray(indices[: counts[c]], dtype=np.int64))
    if short:
        warn_once("long tail: some classes have fewer images than asked, all kept (" + "; ".join(short) + ")")
    return kept
