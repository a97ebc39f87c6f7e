"""Tables and figures for the notebooks, built from federated data and run records only."""

from __future__ import annotations

import itertools
import textwrap
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from fl_core.config import config_from_dict
from fl_core.data.federated import FederatedData
from fl_core.metrics import GROUP_NAMES, group_accuracy, per_class_accuracy

GROUP_LABELS = {"many": "many (>{many})", "medium": "medium ({few}-{many})", "few": "few (<{few})"}
METHOD_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "creff": "CReFF", "clip2fl": "CLIP2FL", "mllm_fl": "MLLM-FL"}
# one colour per method in every figure, from seaborn's colour-blind palette: FedProx in a lighter
# shade of FedAvg's blue (it is FedAvg plus a proximal term), the others far apart
METHOD_COLORS = dict(zip(METHOD_NAMES, [sns.color_palette("colorblind")[i] for i in (0, 9, 2, 1, 4)]))
# every method as a grid's variants ({label: overrides}), for the comparison pages
METHOD_VARIANTS = {name: {"method.name": method} for method, name in METHOD_NAMES.items()}


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


def partition_table(feds: dict[str, list[FederatedData]], share: float = 0.1) -> pd.DataFrame:
    """How differently partitions (e.g. Dirichlet alphas) split the data: per key of ``feds`` (its
    label), over the clients of all its federations (e.g. one per seed), the clients' sizes and the
    medians of the classes a client holds, of those holding at least ``share`` of its images, and of
    its largest class's share."""
    rows = {}
    for label, federations in feds.items():
        cc = np.concatenate([fed.client_class_counts for fed in federations])
        sizes = cc.sum(axis=1)
        rows[label] = {"clients": len(cc), "images / client": f"{sizes.min()}-{sizes.max()}",
                       "classes (median)": float(np.median((cc > 0).sum(axis=1))),
                       f"classes >= {share:.0%} (median)": float(np.median((cc >= share * sizes[:, None]).sum(axis=1))),
                       "largest class % (median)": round(float(np.median(100 * cc.max(axis=1) / sizes)), 1)}
    return pd.DataFrame.from_dict(rows, orient="index")


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


LAST_ROUNDS = 3  # the final round's accuracy moves by several points between rounds; also report a mean
LAST_COLUMN = f"top1 last {LAST_ROUNDS}"
GROUP_NOTE = ("many/medium/few: classes with >{many}, {few}-{many}, <{few} training images; head/middle/tail: "
              "thirds of the classes ranked by training count; " + LAST_COLUMN + ": top-1 averaged over the last "
              f"{LAST_ROUNDS} rounds. Accuracies in %, mean (and std over seeds) of the final round unless said.")


def last_rounds_top1(record: dict, k: int = LAST_ROUNDS) -> float:
    """Mean top-1 (%) over the last ``k`` evaluated rounds of a run."""
    values = [e["top1"] for e in record["rounds"] if e.get("top1") is not None][-k:]
    return 100 * float(np.mean(values))


def _variant(record: dict) -> str:
    """The record's variant name in a grid (``"_variant"``), or its method's."""
    return record.get("_variant", record["method"]["name"])


def results_frame(records: list[dict]) -> pd.DataFrame:
    """One row per run: variant, seed, final top-1 and group accuracies (%), client cost."""
    rows = []
    for r in records:
        final = r["final"]
        rows.append({"variant": _variant(r), "method": r["method"]["name"],
                     "seed": r["config"]["seed"],
                     **{k: (None if final[k] is None else 100 * final[k]) for k in ("top1", *GROUP_NAMES)},
                     LAST_COLUMN: last_rounds_top1(r),
                     "upload MB/client/round": r["cost"]["upload_bytes_per_client_per_round"] / 1e6,
                     "client GFLOPs/round": r["cost"]["client_flops_per_round"] / 1e9})
    return pd.DataFrame(rows)


ACCURACIES = ("top1", LAST_COLUMN, *GROUP_NAMES)


def results_stats(records: list[dict]) -> dict[str, dict]:
    """Per variant, in order of first appearance: ``seeds`` (its number of runs) and, per accuracy of
    ``ACCURACIES`` (%), ``(mean, std over seeds)``; the std is ``None`` for one run, both are ``None``
    for a group without classes."""
    frame = results_frame(records)
    stats = {}
    for variant in dict.fromkeys(frame["variant"]):
        runs = frame[frame["variant"] == variant]
        row: dict = {"seeds": len(runs)}
        for k in ACCURACIES:
            values = runs[k].dropna()
            std = float(values.std(ddof=1)) if len(values) > 1 else None
            row[k] = (None, None) if values.empty else (float(values.mean()), std)
        stats[variant] = row
    return stats


def results_table(records: list[dict], digits: int = 1) -> pd.DataFrame:
    """Mean ± std over seeds of each variant's final accuracies (a group without classes: n/a)."""
    def cell(mean, std):
        if mean is None:
            return "n/a"
        return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"

    out = {variant: {"seeds": row["seeds"], **{k: cell(*row[k]) for k in ACCURACIES}}
           for variant, row in results_stats(records).items()}
    table = pd.DataFrame.from_dict(out, orient="index")
    table.index.name = "variant"
    return table


def sweep_table(grids: dict[str, list[dict]], columns=("top1", LAST_COLUMN, "tail")) -> pd.DataFrame:
    """``results_table``'s ``columns`` for each setting side by side, one column group per key of
    ``grids`` (its label, e.g. ``"IF 10"``), rows in order of first appearance."""
    if not grids:
        return pd.DataFrame()
    return pd.concat({label: results_table(records)[list(columns)] for label, records in grids.items()}, axis=1)


def seeds_note(groups, spread: bool = True) -> str:
    """What a figure's marks are over seeds, given one group label (e.g. variant) per run: ", mean
    ± std over 3 seeds" (``spread=False``: ", mean over 3 seeds") when a group has more than one run,
    else ""; "2-3 seeds" when groups differ."""
    counts = sorted(set(Counter(groups).values()))
    if not counts or counts[-1] == 1:
        return ""
    seeds = f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else f"{counts[0]}"
    return f", mean{' ± std' if spread else ''} over {seeds} seeds"


def plot_sweep(grids: dict[str, list[dict]], metric: str = "top1", ax=None):
    """Final ``metric`` of each variant (bars: mean, lines: ± std over seeds) under each setting of
    ``grids`` ({label: records}), as grouped horizontal bars."""
    frame = pd.concat([results_frame(records).assign(setting=label) for label, records in grids.items()])
    ax = ax or plt.subplots(figsize=(8, 0.5 * frame["variant"].nunique() * len(grids) + 1))[1]
    sns.barplot(data=frame, y="variant", x=metric, hue="setting", errorbar="sd", orient="h", ax=ax)
    note = seeds_note(zip(frame["variant"], frame["setting"]))
    ax.set(ylabel="", xlabel=f"final {metric} %{note}", xlim=(0, 100))
    _legend_outside(ax)
    return ax


SIMULATED_MLLM, OFFLINE_ENCODER = "simulated MLLM", "offline encoder"
SUBSTITUTE_TEACHERS = (SIMULATED_MLLM, OFFLINE_ENCODER)


def teachers_of(cfg: dict) -> dict[str, str]:
    """The teachers a run's numbers came from (a config as a dict), by role: ``mllm`` (MLLM-FL) and
    ``clip`` (CLIP2FL, MLLM-FL's stage 1), substitutes named as such (``SUBSTITUTE_TEACHERS``)."""
    name, teacher = cfg["method"]["name"], cfg["teacher"]
    teachers = {}
    if name == "mllm_fl":
        teachers["mllm"] = SIMULATED_MLLM if teacher["mllm"] == "simulated" else teacher["mllm_model"]
    if name == "clip2fl" or (name == "mllm_fl" and cfg["method"]["stage1"]):
        teachers["clip"] = (OFFLINE_ENCODER if teacher["clip"] == "offline"
                            else f"{teacher['clip_model']} ({teacher['clip_pretrained']})")
    return teachers


def method_label(record: dict) -> str:
    """The method's name and the substitute teachers its numbers came from, e.g. ``MLLM-FL
    (simulated MLLM, offline encoder)``: substitutes are named wherever their numbers appear."""
    cfg = record["config"]
    substitutes = [t for t in teachers_of(cfg).values() if t in SUBSTITUTE_TEACHERS]
    name = METHOD_NAMES.get(cfg["method"]["name"], cfg["method"]["name"])  # a method added later: its config name
    return name + (f" ({', '.join(substitutes)})" if substitutes else "")


def label_methods(records: list[dict]) -> list[dict]:
    """The records, each with its ``method_label`` as its variant name (the rows of a table)."""
    return [{**r, "_variant": method_label(r)} for r in records]


def cost_table(records: list[dict]) -> pd.DataFrame:
    """What one client uploads and computes per round, per variant (identical across seeds)."""
    frame = results_frame(records).groupby("variant", sort=False)[["upload MB/client/round", "client GFLOPs/round"]]
    return frame.mean().round(3)


def provenance_of(records: list[dict]) -> str:
    """Profile, seeds, teachers, commits and devices of a set of runs, for the line under a table (the
    device matters: another CPU model rounds differently)."""
    profiles = sorted({r["profile"] for r in records})
    seeds = sorted({r["config"]["seed"] for r in records})
    by_role = [teachers_of(r["config"]) for r in records]
    teachers = list(dict.fromkeys(t[role] for role in ("mllm", "clip") for t in by_role if role in t))  # MLLMs first
    commits = sorted({r["commit"][:10] + ("+dirty" if r.get("dirty") else "") for r in records})
    devices = sorted({r["device"] for r in records})
    return (f"profile {', '.join(profiles)}; seeds {seeds}; {len(records)} run{'s' if len(records) != 1 else ''}; "
            + (f"teachers: {', '.join(teachers)}; " if teachers else "")
            + f"commit {', '.join(commits)}; on {' and '.join(devices)}")


def provenance(record: dict) -> str:
    """Where a result came from: profile, seed, commit, device, record path."""
    commit = record["commit"][:10] + (" (uncommitted changes)" if record.get("dirty") else "")
    return (f"profile {record['profile']}, seed {record['config']['seed']}, commit {commit}, "
            f"device {record['device']}, config {record['fingerprint']}, "
            f"{record['timing']['train_seconds']:.0f} s of training")


def plot_pool_samples(server, class_names: list[str], n: int = 12, cols: int = 6):
    """Web-pool images with the MLLM's caption (and, for a held-out pool, the true class)."""
    pool, ann = server.pool, server.annotation
    rows = int(np.ceil(n / cols))
    # constrained layout makes room for every caption; tight_layout let a row's captions run into
    # the images above them
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.6 * rows), layout="constrained")
    truth = pool.hidden_labels("measure-annotation-accuracy") if pool.has_hidden_labels else None
    for i, ax in enumerate(np.ravel(axes)):
        ax.axis("off")
        if i >= min(n, len(pool)):
            continue
        image = pool.images[i].permute(1, 2, 0).numpy()
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray")
        wrong = truth is not None and int(truth[i]) != int(ann.labels[i])
        title = "\n".join(textwrap.wrap(ann.captions[i], 26))
        if truth is not None:
            title += f"\n(true: {class_names[int(truth[i])]})"
        ax.set_title(title, fontsize=7, color="firebrick" if wrong else "black")
    fig.suptitle(f"Web-pool images captioned by the {_annotator(ann)} (red: wrong label)", fontsize=10)
    return fig


def _annotator(annotation) -> str:
    """Who annotated the pool: "simulated MLLM", or the real MLLM's model name."""
    return SIMULATED_MLLM if annotation.simulated else annotation.mllm.get("model", "MLLM")


def plot_annotation_confusion(server, class_names: list[str], ax=None):
    """Row-normalised confusion of the MLLM's labels against the held-out pool's hidden labels."""
    pool, ann = server.pool, server.annotation
    truth = pool.hidden_labels("measure-annotation-accuracy").numpy()
    c = len(class_names)
    matrix = np.zeros((c, c))
    np.add.at(matrix, (truth, ann.labels.numpy()), 1)
    matrix = 100 * matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax = ax or plt.subplots(figsize=(6, 5))[1]
    sns.heatmap(pd.DataFrame(matrix, index=class_names, columns=class_names), annot=c <= 12, fmt=".0f",
                cmap="Blues", ax=ax, cbar_kws={"label": "% of the true class"})
    who = _annotator(ann)
    ax.set(xlabel=f"{who} label", ylabel="true class", title=f"How the {who} labels the pool")
    return ax


def plot_pretraining(record: dict, axes=None):
    """Stage 1: loss terms and the DWD teacher weight per epoch."""
    curves = pd.DataFrame(record["method"]["pretraining"]["curves"])
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    long = curves.melt(id_vars="epoch", value_vars=["loss", "contrastive", "distill"], var_name="term", value_name="value")
    sns.lineplot(data=long, x="epoch", y="value", hue="term", marker="o", ax=axes[0])
    axes[0].set(title="Stage-1 loss per epoch (mean over steps)", ylabel="loss")
    sns.lineplot(data=curves, x="epoch", y="lambda", marker="o", ax=axes[1], color="black")
    axes[1].set(title="DWD weight of the frozen image encoder", ylabel="lambda (mean over the epoch's steps)", ylim=(-0.05, 1.05))
    return axes


def variant_palette(records: list[dict]) -> dict:
    """Each variant's colour: the first variant of a built-in method in the method's colour
    (``METHOD_COLORS``, the same in every figure of the book), further variants of one method (the
    ablations) and methods without a colour of their own in the colour-blind palette's other colours."""
    others = [sns.color_palette("colorblind")[i] for i in (3, 7, 5, 8, 6)]  # vermillion, grey, brown, yellow, pink
    spare = itertools.cycle(others + sns.color_palette("dark"))
    colours, coloured_methods = {}, set()
    for r in records:
        variant, method = _variant(r), r["method"]["name"]
        if variant in colours:
            continue
        if method in METHOD_COLORS and method not in coloured_methods:
            colours[variant] = METHOD_COLORS[method]
            coloured_methods.add(method)
        else:
            colours[variant] = next(spare)
    return colours


def plot_round_curves(records: list[dict], metric: str = "top1", ax=None):
    """One curve per variant of a per-round metric: the mean over seeds, in a band of ± one std."""
    rows = [{"variant": _variant(r), "round": e["round"], f"{metric} %": 100 * e[metric]}
            for r in records for e in r["rounds"] if e.get(metric) is not None]
    ax = ax or plt.subplots(figsize=(8, 3.8))[1]
    sns.lineplot(data=pd.DataFrame(rows), x="round", y=f"{metric} %", hue="variant", marker="o", markersize=3,
                 errorbar="sd", palette=variant_palette(records), ax=ax)
    _legend_outside(ax)
    note = seeds_note(_variant(r) for r in records)
    ax.set(title=f"Test {metric} of the global model after each round{note}", ylim=(-2, 102))
    return ax


def plot_per_class_compare(records: list[dict], ax=None):
    """Final per-class accuracy (the mean over seeds) of each variant, classes by training frequency."""
    data = records[0]["data"]
    counts = np.asarray(data["train_class_counts"])
    order = np.argsort(-counts, kind="stable")
    rows = [{"variant": _variant(r), "class": f"{data['class_names'][c]}\n(n={counts[c]})",
             "accuracy %": 100 * r["final"]["per_class"][c]} for r in records for c in order]
    ax = ax or plt.subplots(figsize=(max(9, 0.9 * len(order)), 3.8))[1]
    sns.barplot(data=pd.DataFrame(rows), x="class", y="accuracy %", hue="variant", errorbar=None,
                palette=variant_palette(records), ax=ax)
    # below the axes, not beside them: the bars of ten or more classes need the figure's whole width
    sns.move_legend(ax, "upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, frameon=False, title=None)
    ax.tick_params(axis="x", labelsize=8)
    note = seeds_note((_variant(r) for r in records), spread=False)
    ax.set(xlabel="class (training images), most frequent first", ylim=(0, 100), title=f"Per-class test accuracy{note}")
    return ax


def plot_against(records: list[dict], key: str, xlabel: str, reference: list[dict] | None = None,
                 metrics=("top1", "head", "tail"), ax=None):
    """Final accuracies of runs that differ in the config key ``key`` (the mean over seeds, in a band
    of ± one std), with the mean top-1 of ``reference`` runs (e.g. FedAvg) as a dashed line."""
    setting = [config_from_dict(r["config"]).flat()[key] for r in records]
    frame = results_frame(records).assign(setting=setting).melt(
        id_vars="setting", value_vars=list(metrics), var_name="metric", value_name="test accuracy %")
    ax = ax or plt.subplots(figsize=(7, 3.8))[1]
    sns.lineplot(data=frame, x="setting", y="test accuracy %", hue="metric", marker="o", errorbar="sd", ax=ax)
    if reference:
        name = _variant(reference[0])
        ax.axhline(100 * np.mean([r["final"]["top1"] for r in reference]), color="gray", ls="--", label=f"{name} top1")
    ax.set(xlabel=xlabel, ylabel=f"test accuracy %{seeds_note(setting)}", ylim=(-2, 102))
    ax.legend()
    _legend_outside(ax)
    return ax


def _legend_outside(ax) -> None:
    """The legend to the right of the axes, where it cannot hide curves or bars."""
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), frameon=False)


ARCH_NAMES = {"resnet8": "ResNet-8", "resnet8_clip2fl": "ResNet-8 + linear layer", "resnet50": "ResNet-50"}


def zero_shot_table(server, record: dict, test_split) -> pd.DataFrame:
    """Zero-shot accuracy (%) of the frozen CLIP-role encoder and of the student after stage 1."""
    names = record["data"]["class_names"]
    predictions = server.encoder.zero_shot_logits(test_split.images, names).argmax(1).cpu()  # a GPU encoder's too
    labels = test_split.labels.cpu()
    groups = {name: np.asarray(classes, dtype=int) for name, classes in record["data"]["groups"].items()}
    teacher = {"top1": float((predictions == labels).float().mean()),
               **group_accuracy(per_class_accuracy(predictions, labels, len(names)), groups)}
    student = record["method"]["pretraining"]["zero_shot"]
    label = "offline encoder (not CLIP)" if server.encoder.name.startswith("offline") else server.encoder.name
    rows = {f"teacher: {label}": teacher, f"student after stage 1 ({ARCH_NAMES.get(record['arch'], record['arch'])})": student}
    return pd.DataFrame.from_dict({row: {k: "n/a" if accuracies[k] is None else round(100 * accuracies[k], 1)
                                         for k in ("top1", *GROUP_NAMES)} for row, accuracies in rows.items()},
                                  orient="index")
