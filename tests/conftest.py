import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# without a GPU, fl_core's Triton kernels (fl.grouped_conv=triton) run in Triton's CPU interpreter,
# which is chosen when they are defined
TEST_DEVICE = os.environ.get("FL_CORE_TEST_DEVICE", "cpu")  # =cuda: on a GPU (benchmarks/device_check.sh)
if TEST_DEVICE != "cuda":
    os.environ["TRITON_INTERPRET"] = "1"
NEEDS_CUDA = pytest.mark.skipif(TEST_DEVICE != "cuda", reason="needs CUDA")

from fl_core.config import make_config  # noqa: E402

# A federation small enough for a test: real MNIST, a few hundred images, two rounds.
TINY = {
    "data.train_limit": 3000,
    "data.test_limit": 500,
    "data.imbalance_factor": 10.0,
    "data.num_clients": 6,
    "fl.clients_per_round": 3,
    "fl.rounds": 2,
    "fl.local_epochs": 1,
    "model.width": 0.125,
}
# ... and each method's server work cut down to match (CReFF/CLIP2FL; MLLM-FL's stage 1 and alignment)
TINY_BASELINE = {"method.creff_num_features": 10, "method.creff_match_steps": 5, "method.creff_retrain_epochs": 3,
                 "method.creff_grad_reps": 2, "data.web_pool_limit": 300, "teacher.align_steps": 20}
MLLM_TINY = {"method.name": "mllm_fl", "data.web_pool_limit": 400, "teacher.align_steps": 30, "method.stage1_epochs": 2,
             "method.align_per_class": 10}


class Interrupted(Exception):
    """Raised from inside a run by a test, to stop it as a crash would."""


def stable(record: dict) -> dict:
    """A record without what legitimately differs between runs (timings, paths)."""
    record = json.loads(json.dumps(record))
    record.pop("timing"), record.pop("_path", None)
    for entry in record["rounds"]:
        entry.pop("seconds"), entry.pop("seconds_by_part")
    return record


def final_weights(run_dir: Path) -> dict:
    """The global model's state in ``run_dir``'s checkpoint (after its last completed round)."""
    import torch

    from fl_core.results import CHECKPOINT_NAME

    return torch.load(Path(run_dir) / CHECKPOINT_NAME, weights_only=False)["model"]


def start_tiny_run(run_dir: Path, rounds: int, **popen) -> tuple[list[str], subprocess.Popen]:
    """``python -m fl_core run`` of the TINY federation for ``rounds`` rounds into ``run_dir``, started in the
    background: (its command, its process)."""
    sets = [f"--set={k}={v}" for k, v in {**TINY, "fl.rounds": rounds}.items()]
    cmd = [sys.executable, "-m", "fl_core", "run", "--profile", "smoke", "--no-progress", "--run-dir", str(run_dir), *sets]
    return cmd, subprocess.Popen(cmd, **popen)


def wait_for_file(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until ``path`` exists, ``proc`` has ended or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)


@pytest.fixture
def tiny_config():
    """``make(settings, **overrides)``: the smoke profile with TINY, then ``settings`` (a dict of dotted
    keys, e.g. MLLM_TINY), then keyword overrides (``fl__rounds=3`` for ``fl.rounds``)."""
    def make(settings: dict | None = None, /, **overrides):
        return make_config("smoke", {**TINY, **(settings or {}), **{k.replace("__", "."): v for k, v in overrides.items()}})

    return make


@pytest.fixture
def teacher_cache(tmp_path, monkeypatch):
    """A teacher cache (and stage-1 cache) of the test's own."""
    monkeypatch.setenv("FL_CORE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def runs_dir(tmp_path, monkeypatch):
    path = tmp_path / "runs"
    monkeypatch.setenv("FL_CORE_RUNS", str(path))
    return path
