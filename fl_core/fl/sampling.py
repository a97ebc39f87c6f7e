"""Seeded client sampling and per-(round, client) random streams."""

from __future__ import annotations

import numpy as np
import torch


def client_schedule(seed: int, num_clients: int, per_round: int, rounds: int) -> list[np.ndarray]:
    """Clients of every round, drawn as the CReFF/CLIP2FL code does: one ``RandomState(seed)``
    whose ``choice(num_clients, per_round, replace=False)`` is called once per round."""
    rng = np.random.RandomState(seed)
    return [rng.choice(num_clients, per_round, replace=False) for _ in range(rounds)]


def client_generator(seed: int, round_idx: int, client_id: int) -> torch.Generator:
    """A CPU generator for one client's local work in one round (shuffling, augmentation).

    Independent of the order clients are trained in, so interrupted and vectorized runs match.
    """
    state = np.random.SeedSequence([seed, round_idx, client_id]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
