import pytest

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
