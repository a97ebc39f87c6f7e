"""Class groups for long-tail reporting: many/medium/few by count, head/middle/tail by rank."""

from __future__ import annotations

import numpy as np


def count_groups(train_counts, many_threshold: int = 100, few_threshold: int = 20) -> dict[str, np.ndarray]:
    """Classes with more than ``many_threshold`` training images are 'many', fewer than
    ``few_threshold`` 'few', the rest 'medium' (the usual LT reporting; groups may be empty)."""
    counts = np.asarray(train_counts)
    return {
        "many": np.flatnonzero(counts > many_threshold),
        "medium": np.flatnonzero((counts <= many_threshold) & (counts >= few_threshold)),
        "few": np.flatnonzero(counts < few_threshold),
    }


def rank_groups(train_counts) -> dict[str, np.ndarray]:
    """Head/middle/tail thirds of the classes ranked by training count (ties: lower class id
    first); with C % 3 != 0 the head, then the middle, takes the extra class."""
    order = np.argsort(-np.asarray(train_counts), kind="stable")
    head, middle, tail = np.array_split(order, 3)
    return {"head": np.sort(head), "middle": np.sort(middle), "tail": np.sort(tail)}


def class_groups(train_counts, many_threshold: int = 100, few_threshold: int = 20) -> dict[str, np.ndarray]:
    """Both groupings in one dict: many, medium, few, head, middle, tail."""
    return {**count_groups(train_counts, many_threshold, few_threshold), **rank_groups(train_counts)}
