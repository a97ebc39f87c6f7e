"""Every method resumes an interrupted run to the record an uninterrupted run writes, on the test
device (``FL_CORE_TEST_DEVICE``; benchmarks/device_check.sh runs these on a GPU): the method's own
state (CReFF's federated features and re-trained classifier, MLLM-FL's stage-1 facts) comes back
from the checkpoint where the run computes."""

import os
import stat

import pytest
import torch

from fl_core import results
from fl_core.experiment import run_experiment
from fl_core.fl.engine import Engine, load_checkpoint
from fl_core.results import CHECKPOINT_NAME, DamagedFileError, load_record

from conftest import MLLM_TINY, TEST_DEVICE, TINY_BASELINE, Interrupted, stable

SETTINGS = {"fedavg": {}, "fedprox": {}, "creff": TINY_BASELINE, "clip2fl": TINY_BASELINE, "mllm_fl": MLLM_TINY}


def without_cache_flags(record: dict) -> dict:
    """``stable(record)`` less the flags that say whether stage 1 and the encoder's fit were found in
    the cache: the run computed first finds nothing there, the second everything."""
    record = stable(record)
    method = record["method"]
    method.get("pretraining", {}).pop("cached", None)
    method.get("teachers", {}).get("encoder_fit", {}).pop("cached", None)
    return record


@pytest.mark.slow
@pytest.mark.parametrize("method", SETTINGS)
def test_every_method_resumes_an_interrupted_run_to_the_same_record(method, tiny_config, teacher_cache, tmp_path,
                                                                    monkeypatch):
    settings = {**SETTINGS[method], "method.name": method, "fl.rounds": 3, "device": TEST_DEVICE}
    cfg = tiny_config(settings)
    complete_round = Engine.complete_round

    def crash_in_round_2(self, round_idx, *args, **kwargs):
        if round_idx == 2:
            raise Interrupted  # the clients of round 2 have trained; the server has done nothing with them
        return complete_round(self, round_idx, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Engine, "complete_round", crash_in_round_2)
        with pytest.raises(Interrupted):
            run_experiment(cfg, tmp_path / "run", progress=False)
    partial = load_record(tmp_path / "run")
    assert partial["status"] == "running" and len(partial["rounds"]) == 1
    resumed = run_experiment(cfg, tmp_path / "run", progress=False)
    assert resumed["timing"]["resumed_after_rounds"] == [1]
    reference = run_experiment(cfg, tmp_path / "reference", progress=False)
    assert without_cache_flags(resumed) == without_cache_flags(reference)


@pytest.mark.slow
def test_a_checkpoint_loads_onto_the_runs_device(tiny_config, teacher_cache, tmp_path):
    """Model and method state alike: a run on a GPU resumes with its state on the GPU, whatever
    device wrote the checkpoint (here the ``meta`` device stands in for another one)."""
    settings = {**TINY_BASELINE, "method.name": "creff", "fl.rounds": 1}
    cfg = tiny_config(settings)
    run_experiment(cfg, tmp_path / "run", progress=False)
    checkpoint = load_checkpoint(tmp_path / "run", cfg, torch.device("meta"))
    weight, bias = checkpoint["method"]["classifier"]
    tensors = [*checkpoint["model"].values(), checkpoint["method"]["features"], weight, bias]
    assert {t.device.type for t in tensors} == {"meta"}


@pytest.mark.slow
def test_damaged_run_files_are_named_with_what_to_do(tiny_config, tmp_path):
    """A record or checkpoint cut short (a copy that broke off) stops the run with one message naming
    the file; a damaged record beside a good checkpoint is restored from the checkpoint."""
    cfg = tiny_config(fl__rounds=1)
    run_dir = tmp_path / "run"
    reference = run_experiment(cfg, run_dir, progress=False)
    record, checkpoint = run_dir / "record.json", run_dir / CHECKPOINT_NAME
    record.write_text(record.read_text()[:100])
    with pytest.raises(DamagedFileError, match=f"{record} cannot be read as a run record .*restored from the "
                                               f"{CHECKPOINT_NAME} beside it"):
        run_experiment(cfg, run_dir, progress=False)
    record.unlink()
    restored = run_experiment(cfg, run_dir, progress=False)
    assert stable(restored) == stable(reference)
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    record.unlink()  # else the finished record is reused without reading the checkpoint
    with pytest.raises(DamagedFileError, match=f"{checkpoint} cannot be read as a run's checkpoint .*delete it"):
        run_experiment(cfg, run_dir, progress=False)
    other = tmp_path / "other"  # JSON, but not a record, and no checkpoint to restore it from
    other.mkdir()
    (other / "record.json").write_text("{}")
    with pytest.raises(DamagedFileError, match=f"no status, fingerprint or config.*delete its run directory {other}"):
        run_experiment(cfg, other, progress=False)


def test_run_files_are_on_the_disk_before_they_replace_the_old_ones(tmp_path, monkeypatch):
    """Checkpoints, records and cached results are written whole to a temporary file, flushed to the
    disk and only then renamed over the old file; a write that fails leaves the old file as it was."""
    events = []
    monkeypatch.setattr(results.os, "fsync", lambda fd: events.append("fsync"))
    replace = results.os.replace
    monkeypatch.setattr(results.os, "replace", lambda a, b: (events.append("replace"), replace(a, b)))
    results.save_torch(tmp_path / CHECKPOINT_NAME, {"w": torch.arange(3)})
    results.write_json(tmp_path / "record.json", {"status": "running"})
    assert events == ["fsync", "replace"] * 2
    umask = os.umask(0o022)
    os.umask(umask)
    for name in (CHECKPOINT_NAME, "record.json"):  # as any new file, not owner-only: a group may share runs
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
    assert torch.equal(torch.load(tmp_path / CHECKPOINT_NAME)["w"], torch.arange(3))
    with pytest.raises(TypeError):
        results.write_json(tmp_path / "record.json", {"status": object()})  # fails halfway through the dump
    assert (tmp_path / "record.json").read_text() == '{\n "status": "running"\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME, "record.json"]  # no temporary left
