import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from fl_core.data import class_groups, federated_split, long_tail_class_lists, long_tail_counts

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "creff_partition_c10.json"
FIXTURE_LOCAL = Path(__file__).resolve().parent / "fixtures" / "creff_partition_c10.json"


def load_fixture():
    path = FIXTURE if FIXTURE.is_file() else FIXTURE_LOCAL
    return json.loads(path.read_text())["c10like"]


def fixture_labels(fx):
    return np.random.RandomState(0).permutation(np.tile(np.arange(fx["num_classes"]), fx["per_class"]))


def test_creff_partition_reproduces_the_public_code_exactly():
    fx = load_fixture()
    labels = fixture_labels(fx)
    clients = federated_split(
        labels, num_classes=fx["num_classes"], imbalance_factor=fx["imbalance_factor"],
        num_clients=fx["clients"], alpha=fx["alpha"], seed=fx["seed"], method="creff",
    )
    counts = [np.bincount(labels[c], minlength=fx["num_classes"]).tolist() for c in clients]
    assert counts == fx["client_class_counts"]
    assert sum(len(c) for c in clients) == fx["total"]
    digest = hashlib.sha256(json.dumps([[int(i) for i in c] for c in clients]).encode()).hexdigest()
    assert digest == fx["sha256_client_lists"]


def test_long_tail_counts_follow_the_exponential_profile():
    fx = load_fixture()
    assert long_tail_counts(50_000, 10, 100) == fx["lt_counts"]
    assert long_tail_counts(50_000, 10, 1) == [5000] * 10
    counts = long_tail_counts(50_000, 100, 50)
    assert counts[0] == 500 and counts[-1] == 10 and counts == sorted(counts, reverse=True)


def test_long_tail_keeps_all_of_a_short_class_and_warns():
    labels = np.array([0] * 3 + [1] * 20 + [2] * 20)  # n_max = 43 / 3 = 14.3; class 0 has only 3
    with pytest.warns(UserWarning, match="class 0: 3 < 14"):
        kept = long_tail_class_lists(labels, 3, 1.0, seed=0)
    assert [len(k) for k in kept] == [3, 14, 14]
    assert all((labels[k] == c).all() for c, k in enumerate(kept))


def test_a_short_class_is_reported_once_per_process():
    labels = np.array([0] * 2 + [1] * 20 + [2] * 20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):  # catch_warnings in between resets Python's own once-per-location rule
            with warnings.catch_warnings():
                long_tail_class_lists(labels, 3, 1.0, seed=0)
    assert [str(w.message) for w in caught if "class 0: 2 < 14" in str(w.message)] == [
        "long tail: some classes have fewer images than asked, all kept (class 0: 2 < 14)"]


@pytest.mark.parametrize("method", ["creff", "dirichlet", "iid"])
@pytest.mark.parametrize("num_clients", [3, 10, 15, 20])
def test_partitions_are_disjoint_cover_the_long_tail_and_are_seeded(method, num_clients):
    labels = np.random.RandomState(1).randint(0, 10, 20_000)
    kwargs = dict(num_classes=10, imbalance_factor=10, num_clients=num_clients, alpha=0.5, method=method)
    clients = federated_split(labels, seed=3, **kwargs)
    assert len(clients) == num_clients and all(len(c) > 0 for c in clients)
    flat = np.concatenate(clients)
    assert len(flat) == len(set(flat.tolist()))
    expected = long_tail_class_lists(labels, 10, 10, seed=3)
    assert sorted(flat.tolist()) == sorted(np.concatenate(expected).tolist())
    again = federated_split(labels, seed=3, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(clients, again))
    other = federated_split(labels, seed=4, **kwargs)
    assert not all(np.array_equal(a, b) for a, b in zip(clients, other))


def test_equal_size_recut_of_creff():
    labels = np.random.RandomState(1).randint(0, 10, 5003)
    sizes = [len(c) for c in federated_split(labels, num_classes=10, imbalance_factor=1, num_clients=7, alpha=1, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_smaller_alpha_is_more_skewed():
    labels = np.random.RandomState(1).randint(0, 10, 20_000)

    def mean_classes_per_client(alpha):
        clients = federated_split(labels, num_classes=10, imbalance_factor=1, num_clients=20, alpha=alpha,
                                  seed=0, method="dirichlet")
        return np.mean([len(np.unique(labels[c])) for c in clients])

    assert mean_classes_per_client(0.1) < mean_classes_per_client(100.0)


def test_impossible_dirichlet_split_fails_clearly():
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(ValueError, match="use fewer clients or a larger alpha"):
        federated_split(labels, num_classes=2, imbalance_factor=1, num_clients=5, alpha=0.01, seed=0,
                        method="dirichlet", min_client_size=4)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(num_clients=0), "num_clients=0"),
        (dict(alpha=0.0), "alpha=0.0"),
        (dict(imbalance_factor=0.5), "imbalance_factor=0.5"),
        (dict(num_clients=10_000), "only .* training images"),
        (dict(method="shards"), "choose one of: creff, dirichlet, iid"),
    ],
)
def test_bad_split_arguments(kwargs, pattern):
    args = dict(num_classes=10, imbalance_factor=10, num_clients=5, alpha=0.5, seed=0) | kwargs
    with pytest.raises(ValueError, match=pattern):
        federated_split(np.arange(1000) % 10, **args)


def test_class_groups():
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50, 19]
    groups = class_groups(counts)
    assert groups["many"].tolist() == list(range(8))
    assert groups["medium"].tolist() == [8, 9] and groups["few"].tolist() == [10]
    assert groups["head"].tolist() == [0, 1, 2, 3] and groups["middle"].tolist() == [4, 5, 6, 7]
    assert groups["tail"].tolist() == [8, 9, 10]
    shuffled = class_groups([10, 500, 30])
    assert shuffled["head"].tolist() == [1] and shuffled["tail"].tolist() == [0]
    assert class_groups(counts, many_threshold=1000, few_threshold=100)["few"].tolist() == [8, 9, 10]
