import numpy as np
import pytest
import seaborn as sns

from fl_core import report
from fl_core.config import make_config


def record(variant: str, seed: int, top1: float, tail: float | None, round_top1=(0.5, 0.6, 0.7)) -> dict:
    final = {"top1": top1, "many": 0.9, "medium": 0.4, "few": None, "head": 0.9, "middle": 0.5, "tail": tail}
    return {"_variant": variant, "method": {"name": "fedavg"}, "config": {"seed": seed}, "final": final,
            "rounds": [{"top1": t} for t in round_top1],
            "cost": {"upload_bytes_per_client_per_round": 1e5, "client_flops_per_round": 2e9}}


def test_results_stats_and_table_agree_on_means_stds_and_missing_groups():
    records = [record("A", 7, 0.30, 0.10), record("A", 8, 0.40, 0.20), record("B", 7, 0.90, None)]
    stats = report.results_stats(records)
    assert list(stats) == ["A", "B"] and stats["A"]["seeds"] == 2 and stats["B"]["seeds"] == 1
    mean, std = stats["A"]["top1"]
    assert mean == pytest.approx(35.0) and std == pytest.approx(7.0710678)
    assert stats["A"][report.LAST_COLUMN] == (pytest.approx(60.0), pytest.approx(0.0))
    assert stats["B"]["top1"] == (pytest.approx(90.0), None)  # one seed: no std
    assert stats["B"]["tail"] == (None, None) and stats["A"]["few"] == (None, None)  # a group without classes
    table = report.results_table(records)
    assert table.loc["A", "top1"] == "35.0 ± 7.1" and table.loc["B", "top1"] == "90.0"
    assert table.loc["B", "tail"] == "n/a" and table.loc["A", "tail"] == "15.0 ± 7.1"


@pytest.mark.parametrize("overrides, label", [
    ({"method.name": "fedavg"}, "FedAvg"),
    ({"method.name": "creff"}, "CReFF"),
    ({"method.name": "clip2fl"}, "CLIP2FL (offline encoder)"),
    ({"method.name": "clip2fl", "teacher.clip": "open_clip"}, "CLIP2FL"),
    ({"method.name": "mllm_fl"}, "MLLM-FL (simulated MLLM, offline encoder)"),
    ({"method.name": "mllm_fl", "method.stage1": False}, "MLLM-FL (simulated MLLM)"),  # no encoder without stage 1
    ({"method.name": "mllm_fl", "teacher.mllm": "hf", "teacher.clip": "open_clip"}, "MLLM-FL"),
])
def test_method_label_names_the_substitute_teachers(overrides, label):
    assert report.method_label({"config": make_config("smoke", overrides).to_dict()}) == label


def test_sweep_table_puts_each_settings_columns_side_by_side():
    grids = {"alpha 0.1": [record("A", 7, 0.30, 0.10), record("B", 7, 0.50, 0.20)],
             "alpha 0.5": [record("A", 7, 0.40, 0.30), record("B", 7, 0.80, 0.60)]}
    table = report.sweep_table(grids, ["top1", "tail"])
    assert list(table.columns) == [("alpha 0.1", "top1"), ("alpha 0.1", "tail"), ("alpha 0.5", "top1"), ("alpha 0.5", "tail")]
    assert list(table.index) == ["A", "B"]
    assert table.loc["B", ("alpha 0.5", "tail")] == "60.0" and table.loc["A", ("alpha 0.1", "top1")] == "30.0"
    assert report.sweep_table(grids).columns.get_level_values(1).tolist()[:3] == ["top1", report.LAST_COLUMN, "tail"]


def test_plot_sweep_draws_one_bar_per_variant_and_setting():
    grids = {"x": [record("A", 7, 0.3, 0.1), record("A", 8, 0.5, 0.1), record("B", 7, 0.5, 0.2)],
             "y": [record("A", 7, 0.4, 0.3), record("B", 7, 0.8, 0.6)]}
    ax = report.plot_sweep(grids)
    widths = sorted(round(bar.get_width(), 6) for bar in ax.patches if bar.get_width() > 0)
    assert widths == [40.0, 40.0, 50.0, 80.0]  # A under x is the mean of two seeds
    assert ax.get_xlabel() == "final top1 %, mean ± std over 1-2 seeds"


def test_seeds_note_says_what_a_figure_averages_over():
    assert report.seeds_note(["A", "A", "B", "B"]) == ", mean ± std over 2 seeds"
    assert report.seeds_note(["A", "A", "A", "B"], spread=False) == ", mean over 1-3 seeds"
    assert report.seeds_note(["A", "B"]) == "" and report.seeds_note([]) == ""  # one run each: nothing averaged


def test_plot_round_curves_draws_the_mean_in_a_band_of_one_std_over_seeds():
    def with_rounds(r):
        return {**r, "rounds": [{**e, "round": i + 1} for i, e in enumerate(r["rounds"])]}

    records = [with_rounds(record("A", 7, 0.7, 0.1, round_top1=(0.5, 0.6, 0.7))),
               with_rounds(record("A", 8, 0.9, 0.1, round_top1=(0.7, 0.8, 0.9)))]
    ax = report.plot_round_curves(records)
    assert ax.get_title() == "Test top1 of the global model after each round, mean ± std over 2 seeds"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [60.0, 70.0, 80.0])
    band = ax.collections[0].get_paths()[0].vertices
    at_round_1 = band[band[:, 0] == 1, 1]
    std = 100 * np.std([0.5, 0.7], ddof=1)  # the tables' std (ddof 1), not a bootstrap interval
    np.testing.assert_allclose([at_round_1.min(), at_round_1.max()], [60.0 - std, 60.0 + std])


def test_methods_keep_their_colour_in_every_figure_and_other_variants_get_colours_of_their_own():
    def of(variant, method):
        return {**record(variant, 7, 0.5, 0.1), "method": {"name": method}, "data": {
            "train_class_counts": [30, 20, 10], "class_names": ["a", "b", "c"]}}

    methods = [of("MLLM-FL (simulated MLLM)", "mllm_fl"), of("FedAvg", "fedavg")]
    assert report.variant_palette(methods) == {"MLLM-FL (simulated MLLM)": report.METHOD_COLORS["mllm_fl"],
                                               "FedAvg": report.METHOD_COLORS["fedavg"]}
    for m in methods:
        m["final"]["per_class"] = [0.9, 0.5, 0.1]
    ax = report.plot_per_class_compare(methods)
    bars = sns.desaturate(report.METHOD_COLORS["mllm_fl"], 0.75)  # seaborn's bars are a little desaturated
    np.testing.assert_allclose([p.get_facecolor()[:3] for p in ax.patches[:3]], [bars] * 3)
    assert len(set(report.METHOD_COLORS.values())) == len(report.METHOD_COLORS)
    ablations = report.variant_palette([of("full", "mllm_fl"), of("no DWD", "mllm_fl"), of("FedAvg", "fedavg"),
                                        of("FedAvgM", "fedavgm")])  # variants of one method, a method of our own
    assert ablations["full"] == report.METHOD_COLORS["mllm_fl"] and ablations["FedAvg"] == report.METHOD_COLORS["fedavg"]
    assert len(set(ablations.values())) == 4 and not {ablations["no DWD"], ablations["FedAvgM"]} & set(
        report.METHOD_COLORS.values())


def test_partition_table_describes_how_the_clients_data_differs():
    from types import SimpleNamespace

    skewed = SimpleNamespace(client_class_counts=np.array([[50, 50, 0], [90, 5, 5]]))
    even = SimpleNamespace(client_class_counts=np.array([[34, 33, 33]]))
    table = report.partition_table({"skewed": [skewed], "even": [even, even]})
    assert table.loc["skewed", "clients"] == 2 and table.loc["even", "clients"] == 2  # pooled over federations
    assert table.loc["skewed", "images / client"] == "100-100"
    assert table.loc["skewed", "classes (median)"] == 2.5
    assert table.loc["skewed", "classes >= 10% (median)"] == 1.5  # 50/50 holds two, 90/5/5 one
    assert table.loc["skewed", "largest class % (median)"] == 70.0
    assert table.loc["even", "classes >= 10% (median)"] == 3.0


def simulated_annotation_server():
    """A server whose 12-image pool the simulated MLLM labelled (every label right), with long captions."""
    from types import SimpleNamespace

    import torch

    class Pool(SimpleNamespace):
        def __len__(self):
            return 12

    labels = torch.arange(12) % 10
    pool = Pool(images=torch.zeros(12, 1, 28, 28, dtype=torch.uint8), has_hidden_labels=True,
                hidden_labels=lambda purpose: labels)
    annotation = SimpleNamespace(captions=["a simple picture of a single eight on a plain background."] * 12,
                                 labels=labels, simulated=True)
    return SimpleNamespace(pool=pool, annotation=annotation)


def test_plot_pool_samples_keeps_every_caption_clear_of_the_images_above_it():
    fig = report.plot_pool_samples(simulated_annotation_server(), [str(c) for c in range(10)])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    assert axes[0].get_title() == "a simple picture of a\nsingle eight on a plain\nbackground.\n(true: 0)"
    lowest_image_of_row_1 = min(ax.get_images()[0].get_window_extent(renderer).y0 for ax in axes[:6])
    highest_caption_of_row_2 = max(ax.title.get_window_extent(renderer).y1 for ax in axes[6:])
    assert highest_caption_of_row_2 < lowest_image_of_row_1
    assert fig.texts[0].get_text() == "Web-pool images captioned by the simulated MLLM (red: wrong label)"


def test_plot_annotation_confusion_names_the_simulated_mllm():
    ax = report.plot_annotation_confusion(simulated_annotation_server(), [str(c) for c in range(10)])
    assert ax.get_title() == "How the simulated MLLM labels the pool" and ax.get_xlabel() == "simulated MLLM label"


def test_provenance_of_names_the_teachers_the_numbers_came_from():
    def run(overrides):
        return {"profile": "smoke", "config": make_config("smoke", overrides).to_dict(), "commit": "abcdef123456",
                "device": "cpu: x86_64, 1 threads"}

    line = report.provenance_of([run({"method.name": "fedavg"}), run({"method.name": "clip2fl"}),
                                 run({"method.name": "mllm_fl"})])
    assert line == ("profile smoke; seeds [7]; 3 runs; teachers: simulated MLLM, offline encoder; commit abcdef1234; "
                    "on cpu: x86_64, 1 threads")
    alone = report.provenance_of([run({"method.name": "fedavg"})])
    assert "; 1 run; " in alone and "teachers" not in alone  # no teacher, nothing to name
    real = run({"method.name": "mllm_fl", "teacher.mllm": "hf", "teacher.clip": "open_clip"})
    assert "; teachers: llava-hf/llava-1.5-7b-hf, ViT-B-32 (openai); " in report.provenance_of([real])


def test_zero_shot_table_scores_the_teacher_per_group_as_the_student():
    from types import SimpleNamespace

    import torch

    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 0, 1, 0, 0, 2])  # class 0: 2/2, class 1: 1/2, class 2: 1/2
    encoder = SimpleNamespace(name="offline",
                              zero_shot_logits=lambda images, names: torch.nn.functional.one_hot(predicted, 3).float())
    groups = {"many": [0], "medium": [1, 2], "few": [], "head": [0], "middle": [1], "tail": [2]}
    student = {"top1": 0.5, "many": 0.9, "medium": 0.3, "few": None, "head": 0.9, "middle": 0.2, "tail": 0.4,
               "per_class": [0.9, 0.2, 0.4]}
    record = {"data": {"class_names": ["a", "b", "c"], "groups": groups}, "arch": "resnet8",
              "method": {"pretraining": {"zero_shot": student}}}
    table = report.zero_shot_table(SimpleNamespace(encoder=encoder), record, SimpleNamespace(images=None, labels=labels))
    assert table.loc["teacher: offline encoder (not CLIP)"].tolist() == [66.7, 100.0, 50.0, "n/a", 100.0, 50.0, 50.0]
    assert table.loc["student after stage 1 (ResNet-8)"].tolist() == [50.0, 90.0, 30.0, "n/a", 90.0, 20.0, 40.0]
