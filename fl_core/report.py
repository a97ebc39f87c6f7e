"""Tables and figures for the notebooks, built from federated data and run records only."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from fl_core.data.federated import FederatedData
from fl_core.metrics import GROUP_NAMES

GROUP_LABELS = {"many": "many (>{many})", "medium": "medium ({few}-{many})", "few": "few (<{few})"}
METHOD_COLORS = dict(zip(("fedavg", "fedprox", "creff", "clip2fl", "mllm_fl"), sns.color_palette("colorblind", 5)))


def _group_of(groups: dict, names) -> dict[int, str]:
    return {int(c): name for name in names for c in groups[name]}


def class_table(fed: FederatedData, many_threshold: int = 100, few_threshold: int = 20) -> pd.DataFrame:
    """One row per class: training images after the long tail, share, clients holding it, groups."""
    counts = fed.train_class_counts
    groups = fed.groups(many_threshold, few_threshold)
    by_count, by_rank = _group_of(groups, ("many", "medium", "few")), _group_of(groups, ("head", "middle", "tail"))
    holders = (fed.client_class_counts > 0).sum(axis=0)
    return pd.DataFrame(
        {
            "class": fed.dataset.class_names,
            "train images": counts,
            "share %": np.round(100 * counts / counts.sum(), 2),
            "clients holding it": holders,
            "count group": [by_count[c] for c in range(len(counts))],
            "rank group": [by_rank[c] for c in range(len(counts))],
        }
    ).sort_values("train images", ascending=False, kind="stable").set_index("class")


def group_table(fed: FederatedData, many_threshold: int = 100, few_threshold: int = 20) -> pd.DataFrame:
    """Classes and images in each group (many/medium/few by count, head/middle/tail by rank)."""
    counts = fed.train_class_counts
    groups = fed.groups(many_threshold, few_threshold)
    rows = [{"group": g, "classes": len(groups[g]), "train images": int(counts[groups[g]].sum())} for g in GROUP_NAMES]
    return pd.DataFrame(rows).set_index("group")


def client_table(fed: FederatedData) -> pd.DataFrame:
    """Size, classes present and largest class share of every client."""
    cc = fed.client_class_counts
    sizes = cc.sum(axis=1)
    return pd.DataFrame(
        {"images": sizes, "classes present": (cc > 0).sum(axis=1), "largest class %": np.round(100 * cc.max(axis=1) / sizes, 1)},
        index=pd.RangeIndex(len(cc), name="client"),
    )


def plot_class_counts(fed: FederatedData, ax=None):
    """Training images per class (log scale), classes ordered by frequency."""
    table = class_table(fed).reset_index()
    ax = ax or plt.subplots(figsize=(8, 3.2))[1]
    sns.barplot(data=table, x="class", y="train images", hue="count group", dodge=False, ax=ax, order=table["class"])
    ax.set_yscale("log")
    ax.set(xlabel="class (ordered by training frequency)", ylabel="training images (log)", title="Long-tailed training set")
    return ax


def plot_client_heatmap(fed: FederatedData, ax=None):
    """Clients x classes image counts, classes ordered by frequency."""
    order = np.argsort(-fed.train_class_counts, kind="stable")
    cc = pd.DataFrame(fed.client_class_counts[:, order], columns=[fed.dataset.class_names[c] for c in order])
    cc.index.name = "client"
    ax = ax or plt.subplots(figsize=(7, 0.28 * len(cc) + 1.2))[1]
    sns.heatmap(np.log10(1 + cc), annot=cc.values if cc.size <= 400 else False, fmt="d", cmap="viridis",
                cbar_kws={"label": "log10(1 + images)"}, ax=ax, annot_kws={"fontsize": 7})
    ax.set(xlabel="class (ordered by training frequency)", ylabel="client", title="Images per client and class")
    return ax


def final_table(record: dict, digits: int = 3) -> pd.DataFrame:
    """Final top-1 and group accuracies (%, ``None`` for an empty group) of one run record."""
    final = record["final"]
    row = {k: (None if final[k] is None else round(100 * final[k], digits - 2)) for k in ("top1", *GROUP_NAMES)}
    return pd.DataFrame([row], index=[record["method"]["name"]])


def curves_frame(record: dict) -> pd.DataFrame:
    """Per-round metrics in long form (round, metric, value %)."""
    rows = [
        {"round": e["round"], "metric": k, "accuracy %": 100 * e[k]}
        for e in record["rounds"] if "top1" in e for k in ("top1", *GROUP_NAMES) if e.get(k) is not None
    ]
    return pd.DataFrame(rows)


def plot_curves(record: dict, axes=None):
    """Test accuracy per round (top-1 and groups) and mean client training loss."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    sns.lineplot(data=curves_frame(record), x="round", y="accuracy %", hue="metric", ax=axes[0], marker="o", markersize=3)
    axes[0].set(title="Test accuracy of the global model", ylim=(-2, 102))
    loss = pd.DataFrame([{"round": e["round"], "train loss": e["train_loss"]} for e in record["rounds"]])
    sns.lineplot(data=loss, x="round", y="train loss", ax=axes[1], marker="o", markersize=3)
    axes[1].set(title="Mean local training loss of the sampled clients")
    return axes


def plot_per_class(record: dict, ax=None):
    """Final per-class accuracy, classes ordered by training frequency, bars labelled by count."""
    data = record["data"]
    counts = np.asarray(data["train_class_counts"])
    order = np.argsort(-counts, kind="stable")
    frame = pd.DataFrame({
        "class": [f"{data['class_names'][c]}\n(n={counts[c]})" for c in order],
        "accuracy %": [100 * record["final"]["per_class"][c] for c in order],
    })
    ax = ax or plt.subplots(figsize=(max(8, 0.75 * len(order)), 3.5))[1]
    sns.barplot(data=frame, x="class", y="accuracy %", ax=ax, color=METHOD_COLORS.get(record["method"]["name"]))
    ax.tick_params(axis="x", labelsize=8)
    ax.set(xlabel="class (training images), most frequent first", ylim=(0, 100),
           title=f"Per-class test accuracy: {record['method']['name']}")
    return ax


def provenance(record: dict) -> str:
    """Where a result came from: profile, seed, commit, device, record path."""
    commit = record["commit"][:10] + (" (uncommitted changes)" if record.get("dirty") else "")
    return (f"profile {record['profile']}, seed {record['config']['seed']}, commit {commit}, "
            f"device {record['device']}, config {record['fingerprint']}, "
            f"{record['timing']['train_seconds']:.0f} s of training")
