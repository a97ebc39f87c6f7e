"""Server aggregation."""

from __future__ import annotations

import torch


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """FedAvg: the ``weights``-weighted mean of state dicts (BN buffers included; integer
    buffers such as ``num_batches_tracked`` are averaged in float64 and rounded back)."""
    if not states:
        raise ValueError("cannot aggregate zero client states")
    total = float(sum(weights))
    out = {}
    for name, first in states[0].items():
        mean = sum(s[name].double() * w for s, w in zip(states, weights)) / total
        out[name] = (mean if first.is_floating_point() else mean.round()).to(first.dtype)
    return out
