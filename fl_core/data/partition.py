"""Partitioners that split long-tailed class lists across clients (seeded, numpy only).

``creff`` reproduces the public CReFF/CLIP2FL code exactly (see DESIGN.md section 3), so that
results are comparable with theirs; ``dirichlet`` is the NIID-Bench split; ``iid`` a shuffled cut.
"""

from __future__ import annotations

import math

import numpy as np

from fl_core.data.longtail import class_index_lists, long_tail_class_lists

MAX_REDRAWS = 10_000  # a Dirichlet split that needs more redraws than this is hopeless; say so


def federated_split(
    labels,
    *,
    num_classes: int,
    imbalance_factor: float,
    num_clients: int,
    alpha: float,
    seed: int,
    method: str = "creff",
    min_client_size: int = 10,
    long_tail: bool = True,
) -> list[np.ndarray]:
    """Long-tail the training set, then split it: each client's indices into ``labels``.

    ``long_tail=False`` keeps every image (for splits that are long-tailed already, ImageNet-LT).
    """
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} is invalid: it must be >= 1")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha} is invalid: the Dirichlet concentration must be > 0")
    if long_tail:
        class_lists = long_tail_class_lists(labels, num_classes, imbalance_factor, seed)
    else:
        class_lists = class_index_lists(labels, num_classes)
    total = sum(len(c) for c in class_lists)
    if num_clients > total:
        raise ValueError(f"num_clients={num_clients} is invalid: only {total} training images to split")
    if method == "creff":
        return creff_partition(class_lists, num_clients, alpha, seed)
    if method == "dirichlet":
        return dirichlet_partition(class_lists, num_clients, alpha, seed, min_client_size)
    if method == "iid":
        return iid_partition(class_lists, num_clients, seed)
    raise ValueError(f"method={method!r} is not a partitioner; choose one of: creff, dirichlet, iid")


def creff_partition(class_lists: list[np.ndarray], num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """The CReFF/CLIP2FL split: Dirichlet per chunk of 10 clients, then an equal-size re-cut.

    With fewer than 10 clients (their code asserts at least 10) one chunk of all clients is used.
    """
    pairs = [(int(i), c) for c, indices in enumerate(class_lists) for i in indices]
    rng = np.random.RandomState(seed)
    rng.shuffle(pairs)
    chunk_clients = min(10, num_clients)
    n_chunks = math.ceil(num_clients / chunk_clients)
    step = int(chunk_clients / num_clients * len(pairs))
    chunks = [pairs[k * step : (len(pairs) if k == n_chunks - 1 else (k + 1) * step)] for k in range(n_chunks)]

    client_lists: list[list[int]] = []
    remaining = num_clients
    for chunk in chunks:
        k = min(chunk_clients, remaining)
        remaining -= chunk_clients
        chunk = np.asarray(chunk, dtype=np.int64).reshape(-1, 2)
        per_class = [chunk[chunk[:, 1] == c, 0] for c in range(len(class_lists))]
        client_lists += _balanced_dirichlet(per_class, k, alpha, rng, min_size=int(0.50 * len(chunk) / k))
    flat = np.asarray([i for client in client_lists for i in client], dtype=np.int64)
    return _equal_consecutive_parts(flat, num_clients)


def dirichlet_partition(
    class_lists: list[np.ndarray], num_clients: int, alpha: float, seed: int, min_client_size: int
) -> list[np.ndarray]:
    """NIID-Bench label-skew split: per-class Dirichlet shares with the balancing rule."""
    rng = np.random.RandomState(seed)
    total = sum(len(c) for c in class_lists)
    min_size = min(min_client_size, total // num_clients)
    lists = _balanced_dirichlet(
        [rng.permutation(c) for c in class_lists], num_clients, alpha, rng, min_size=min_size
    )
    return [np.asarray(client, dtype=np.int64) for client in lists]


def iid_partition(class_lists: list[np.ndarray], num_clients: int, seed: int) -> list[np.ndarray]:
    """A seeded shuffle of all kept images cut into equal consecutive parts."""
    flat = np.concatenate([np.asarray(c, dtype=np.int64) for c in class_lists])
    return _equal_consecutive_parts(np.random.RandomState(seed).permutation(flat), num_clients)


def _balanced_dirichlet(per_class, k: int, alpha: float, rng, min_size: int) -> list[list[int]]:
    """Split each class over ``k`` clients by Dirichlet(alpha) shares; a client already above the
    average gets nothing more; redraw all until the smallest client holds ``min_size``."""
    total = sum(len(c) for c in per_class)
    for _ in range(MAX_REDRAWS):
        clients: list[list[int]] = [[] for _ in range(k)]
        smallest = 0
        for indices in per_class:
            shares = rng.dirichlet(np.repeat(alpha, k))
            shares = np.array([p * (len(c) < total / k) for p, c in zip(shares, clients)])
            if shares.sum() == 0:  # every client at the average: the class is empty
                continue
            cuts = (np.cumsum(shares / shares.sum()) * len(indices)).astype(int)[:-1]
            clients = [c + part.tolist() for c, part in zip(clients, np.split(indices, cuts))]
            smallest = min(len(c) for c in clients)
        if smallest >= min_size:
            return clients
    raise ValueError(
        f"could not split {total} images over {k} clients with alpha={alpha} so that each holds "
        f"at least {min_size} after {MAX_REDRAWS} draws; use fewer clients or a larger alpha"
    )


def _equal_consecutive_parts(flat: np.ndarray, parts: int) -> list[np.ndarray]:
    """Cut into ``parts`` consecutive pieces; the first ``len % parts`` are one longer."""
    size, extra = divmod(len(flat), parts)
    bounds = np.cumsum([0] + [size + (p < extra) for p in range(parts)])
    return [flat[bounds[p] : bounds[p + 1]] for p in range(parts)]
