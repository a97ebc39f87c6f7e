import json
import os
import signal
import subprocess

import numpy as np
import pytest
import torch

from fl_core import report
from fl_core.data import ImagePipeline, ImageSplit
from fl_core.experiment import default_run_dir, run_experiment
from fl_core.fl import RunDirectoryConflict, SGDSettings, client_schedule, local_sgd, weighted_average
from fl_core.metrics import group_accuracy, per_class_accuracy, predict
from fl_core.models import ResNet8
from fl_core.results import CHECKPOINT_NAME, cpu_model, load_record

from conftest import stable, start_tiny_run, wait_for_file


def test_weighted_average_is_sample_weighted():
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([3.0, 1.0]), "n": torch.tensor(5)}
    avg = weighted_average([a, b], [1, 2])
    assert torch.allclose(avg["w"], torch.tensor([2.0, 2.0]))
    assert avg["n"].dtype == torch.int64 and int(avg["n"]) == 4
    with pytest.raises(ValueError, match="zero client states"):
        weighted_average([], [])


def test_client_schedule_is_the_peers_random_state_stream():
    rng = np.random.RandomState(7)
    expected = [rng.choice(list(range(20)), 8, replace=False) for _ in range(5)]
    schedule = client_schedule(7, 20, 8, 5)
    assert all(np.array_equal(a, b) for a, b in zip(schedule, expected))
    assert all(len(set(s.tolist())) == 8 for s in schedule)


def small_client():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 12, 12), generator=g, dtype=torch.uint8)
    return ImageSplit(images, torch.arange(40) % 3), ImagePipeline((0.5,), (0.5,), crop_padding=1)


def test_local_sgd_is_deterministic_and_counts_steps():
    data, pipe = small_client()

    def train(seed, mu=0.0):
        torch.manual_seed(0)
        model = ResNet8(3, 1, 0.125)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        stats = local_sgd(model, data, pipe, torch.Generator().manual_seed(seed), SGDSettings(2, 16, 0.1, prox_mu=mu))
        return model.state_dict(), start, stats

    a, start, stats = train(1)
    b, _, _ = train(1)
    c, _, _ = train(2)
    assert stats.steps == 2 * 3 and stats.num_samples == 40  # 40 = 16 + 16 + 8: short last batch kept
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    prox, _, _ = train(1, mu=1.0)

    def drift(state):
        return sum(float((state[k].float() - start[k].float()).pow(2).sum()) for k in state if "weight" in k)

    assert drift(prox) < drift(a)  # the proximal term holds clients near the global model


@pytest.mark.slow
def test_predict_matches_a_plain_forward_and_leaves_the_model_trainable():
    data, pipe = small_client()
    torch.manual_seed(0)
    model = ResNet8(3, 1, 0.125)
    local_sgd(model, data, pipe, torch.Generator().manual_seed(0), SGDSettings(1, 16, 0.1))  # non-trivial BN stats
    model.eval()
    with torch.no_grad():
        expected = model(pipe.normalize(data.images))[1].argmax(1)
    model.train()
    assert torch.equal(predict(model, data, pipe, batch_size=16), expected)  # BN folded, channels-last on CPU
    assert model.training
    assert all(p.is_contiguous() and not p.is_inference() for p in model.parameters())
    local_sgd(model, data, pipe, torch.Generator().manual_seed(1), SGDSettings(1, 16, 0.1))  # still trains


def test_group_accuracy_averages_the_classes_with_test_images():
    per_class = per_class_accuracy(torch.tensor([0, 1, 1, 3]), torch.tensor([0, 1, 2, 3]), num_classes=5)
    assert per_class[:4].tolist() == [1.0, 1.0, 0.0, 1.0] and np.isnan(per_class[4])  # class 4: no test image
    groups = {"head": np.array([0, 1]), "middle": np.array([2, 4]), "tail": np.array([4]), "none": np.array([], int)}
    # a group whose classes have no test image has no accuracy (None, not NaN: records are JSON)
    assert group_accuracy(per_class, groups) == {"head": 1.0, "middle": 0.0, "tail": None, "none": None}


def test_same_config_same_record(tiny_config, tmp_path):
    cfg = tiny_config()
    first = run_experiment(cfg, tmp_path / "a", progress=False)
    second = run_experiment(cfg, tmp_path / "b", progress=False)
    assert stable(first) == stable(second)
    assert first["status"] == "complete" and len(first["rounds"]) == cfg.fl.rounds
    for entry in first["rounds"]:
        parts = entry["seconds_by_part"]
        assert set(parts) == {"clients", "server", "evaluation"} and min(parts.values()) > 0
        assert sum(parts.values()) == pytest.approx(entry["seconds"])
    final = first["final"]
    assert 0 <= final["top1"] <= 1 and len(final["per_class"]) == 10
    model = ResNet8(10, 1, 0.125)
    floats = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers() if b.is_floating_point())
    bn_layers = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    # a client uploads float32 weights and BN statistics plus one int64 batch counter per BN layer
    assert first["cost"]["upload_bytes_per_client_per_round"] == 4 * floats + 8 * bn_layers
    assert first["rounds"][0]["clients"] == client_schedule(cfg.seed, 6, 3, 2)[0].tolist()


def test_the_record_names_the_commit_found_once_per_run(tiny_config, tmp_path, monkeypatch):
    lookups = []
    monkeypatch.setattr("fl_core.fl.engine.git_commit", lambda: lookups.append(1) or {"commit": "abc", "dirty": True})
    record = run_experiment(tiny_config(), tmp_path / "run", progress=False)
    assert (record["commit"], record["dirty"]) == ("abc", True)
    assert len(lookups) == 1  # not two git processes per round
    assert load_record(tmp_path / "run")["commit"] == "abc"
    assert record["libraries"]["torch"] == torch.__version__ and record["libraries"]["numpy"] == np.__version__


def test_the_record_names_the_cpu_model_and_the_provenance_lines_show_it(tiny_config, tmp_path, monkeypatch):
    # another CPU model rounds differently, so a result must say which one it came from
    monkeypatch.setattr("fl_core.results.cpu_model", lambda: "Some CPU 9000")
    cfg = tiny_config()
    record = run_experiment(cfg, tmp_path / "run", progress=False)
    capability, threads = torch.backends.cpu.get_cpu_capability(), cfg.cpu_threads or torch.get_num_threads()
    assert record["device"] == f"cpu: Some CPU 9000 ({capability}), {threads} threads"
    assert record["device"] in report.provenance(record)
    older = {**record, "device": "cpu: x86_64, 2 threads"}
    line = report.provenance_of([record, older, record])
    assert line.startswith("profile smoke; seeds [7]; 3 runs; commit ")
    assert line.endswith(f"; on {record['device']} and {older['device']}")  # each device once, sorted


def test_cpu_model_is_the_name_linux_gives():
    cpu_model.cache_clear()
    try:
        name = cpu_model()
    finally:
        cpu_model.cache_clear()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            names = {" ".join(line.split(":", 1)[1].split()) for line in fh if line.startswith("model name")}
        assert names and name in names
    assert name


@pytest.mark.slow
def test_fedprox_runs_and_differs_from_fedavg(tiny_config):
    fedavg = run_experiment(tiny_config(), progress=False)
    fedprox = run_experiment(tiny_config(method__name="fedprox", method__prox_mu=1.0), progress=False)
    assert fedprox["method"] == {"name": "fedprox", "prox_mu": 1.0}
    assert fedprox["rounds"][-1]["train_loss"] != fedavg["rounds"][-1]["train_loss"]


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_record(tiny_config, tmp_path):
    rounds = 8
    cfg = tiny_config(fl__rounds=rounds)
    reference = run_experiment(cfg, tmp_path / "reference", progress=False)
    cmd, proc = start_tiny_run(tmp_path / "run", rounds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_file(tmp_path / "run" / CHECKPOINT_NAME, proc)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    record_path = tmp_path / "run" / "record.json"  # may not be written yet: killed right after a checkpoint
    assert not record_path.exists() or load_record(record_path)["status"] == "running"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = load_record(json.loads(done.stdout.strip().splitlines()[-1])["run_record"])
    assert resumed["timing"]["resumed_after_rounds"] and stable(resumed) == stable(reference)


@pytest.mark.slow
def test_finished_runs_are_reused_and_other_configs_refused(tiny_config):
    cfg = tiny_config()
    record = run_experiment(cfg, progress=False)
    path = default_run_dir(cfg) / "record.json"
    mtime = path.stat().st_mtime_ns
    again = run_experiment(cfg, progress=False)
    assert path.stat().st_mtime_ns == mtime and stable(again) == stable(record)
    with pytest.raises(RunDirectoryConflict, match=r"differs in \{'fl.lr': \(0.1, 0.3\)\}"):
        run_experiment(tiny_config(fl__lr=0.3), run_dir=default_run_dir(cfg), progress=False)
