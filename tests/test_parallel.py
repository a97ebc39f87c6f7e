import threading
import time

import pytest
import torch

from fl_core.config import make_config
from fl_core.experiment import longest_first, run_grid, run_grids
from fl_core.parallel import cpu_threads, shutdown_workers, worker_count
from fl_core.results import computed_once
from tests.conftest import TINY


def test_cpu_threads_sets_and_restores_the_thread_count():
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(0):  # 0: as it is
        assert torch.get_num_threads() == before


def test_worker_count(monkeypatch):
    monkeypatch.delenv("FL_CORE_WORKERS", raising=False)
    monkeypatch.setattr("fl_core.parallel.available_cores", lambda: 8)
    assert worker_count(1, on_cpu=True) == 8
    assert worker_count(3, on_cpu=True) == 2
    assert worker_count(0, on_cpu=True) == 1  # a run on all cores: one at a time
    assert worker_count(1, on_cpu=False) == 1  # one GPU
    monkeypatch.setenv("FL_CORE_WORKERS", "3")
    assert worker_count(1, on_cpu=True) == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("FL_CORE_WORKERS", bad)
        with pytest.raises(ValueError, match=r"FL_CORE_WORKERS=.* is not valid: 'auto' or a whole number >= 1"):
            worker_count(1, on_cpu=True)


def test_computed_once_makes_concurrent_computations_wait_for_the_first(tmp_path):
    path, computed = tmp_path / "result.txt", []

    def compute_or_read():
        with computed_once(path):
            if not path.exists():
                computed.append(1)
                time.sleep(0.2)  # the others arrive while this one computes
                path.write_text("done")

    threads = [threading.Thread(target=compute_or_read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert computed == [1] and path.read_text() == "done"


@pytest.mark.slow
def test_grid_in_worker_processes_equals_one_run_after_another(tmp_path, monkeypatch):
    variants = {"FedAvg": {"method.name": "fedavg"}, "CReFF": {"method.name": "creff"},
                "FedAvg again": {"method.name": "fedavg"}}  # the same runs again: run once, reused

    def grid(workers: str, runs: str):
        monkeypatch.setenv("FL_CORE_WORKERS", workers)
        monkeypatch.setenv("FL_CORE_RUNS", str(tmp_path / runs))
        return run_grid("smoke", variants, [7, 8], base=TINY, progress=False)

    try:
        together = grid("2", "together")
    finally:
        shutdown_workers()
    alone = grid("1", "alone")
    assert [r["_variant"] for r in together] == [name for name in variants for _ in (7, 8)]
    assert len({r["_path"] for r in together}) == 4
    for a, b in zip(together, alone):
        assert a["device"].endswith("1 threads") and a["config"] == b["config"]
        assert len(a["rounds"]) == 2
        assert [(r["train_loss"], r["top1"]) for r in a["rounds"]] == [(r["train_loss"], r["top1"]) for r in b["rounds"]]
        assert a["final"] == b["final"]


def test_longest_runs_go_first_and_a_shared_stage1_counts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_CORE_CACHE", str(tmp_path / "cache"))  # nothing pretrained yet
    jobs = {name: make_config("smoke", {**TINY, **overrides}) for name, overrides in [
        ("fedavg", {"method.name": "fedavg"}),
        ("mllm beta 0", {"method.name": "mllm_fl", "method.beta": 0.0}),  # stage 1 of seed 0...
        ("mllm beta 2", {"method.name": "mllm_fl", "method.beta": 2.0}),  # ...shared: found done
        ("creff", {"method.name": "creff"}),
        ("mllm no stage 1", {"method.name": "mllm_fl", "method.stage1": False}),
        ("clip2fl", {"method.name": "clip2fl"}),
        ("mllm seed 1", {"method.name": "mllm_fl", "seed": 1}),  # another stage 1
    ]}
    assert longest_first(jobs) == ["mllm beta 0", "mllm seed 1", "clip2fl", "creff", "fedavg", "mllm beta 2",
                                   "mllm no stage 1"]


def test_grids_run_together_give_each_grid_its_records(monkeypatch, runs_dir):
    monkeypatch.setenv("FL_CORE_WORKERS", "1")
    fedavg = {"FedAvg": {"method.name": "fedavg"}}
    records = run_grids("smoke", {"one seed": (fedavg, [7]), "two seeds": (fedavg, [7, 8]),
                                  "other clients": (fedavg, [7], {"data.num_clients": 5})}, base=TINY, progress=False)
    assert list(records) == ["one seed", "two seeds", "other clients"]
    assert [r["config"]["seed"] for r in records["two seeds"]] == [7, 8]
    assert records["one seed"][0]["_path"] == records["two seeds"][0]["_path"]  # the same setting, run once
    assert records["other clients"][0]["config"]["data"]["num_clients"] == 5
    assert all(r["_variant"] == "FedAvg" for grid in records.values() for r in grid)
    assert len(list(runs_dir.iterdir())) == 3


def test_the_same_run_started_twice_at_once_runs_once(tiny_config, monkeypatch):
    from fl_core.experiment import run_experiment
    from fl_core.fl.engine import Engine

    runs, engine_run = [], Engine.run
    monkeypatch.setattr(Engine, "run", lambda self: runs.append(1) or engine_run(self))
    cfg = tiny_config(method__name="fedavg")
    records = []
    threads = [threading.Thread(target=lambda: records.append(run_experiment(cfg, progress=False))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert runs == [1] and records[0]["rounds"] == records[1]["rounds"]
