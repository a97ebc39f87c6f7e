"""The Flower app gives the in-process engine's results (simulation and a real loopback deployment)."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fl_core.config import make_config
from fl_core.experiment import run_experiment
from fl_core.results import load_record

from conftest import TINY, Interrupted, final_weights

flwr = pytest.importorskip("flwr")


def assert_same_run(flower_dir, reference_dir, reference):
    record = load_record(flower_dir / "record.json")
    assert record["status"] == "complete" and record["runner"] == "flower"
    assert record["fingerprint"] == reference["fingerprint"]
    assert [e["clients"] for e in record["rounds"]] == [e["clients"] for e in reference["rounds"]]
    for mine, theirs in zip(record["rounds"], reference["rounds"]):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["upload_bytes"] == theirs["upload_bytes"] and mine["client_flops"] == theirs["client_flops"]
    ours, expected = final_weights(flower_dir), final_weights(reference_dir)
    for key in expected:
        assert torch.allclose(ours[key].float(), expected[key].float(), atol=1e-5), key
    assert record["final"]["top1"] == pytest.approx(reference["final"]["top1"], abs=0.005)
    return record


@pytest.mark.slow
# mllm_fl: stage 1 before start, alignment in aggregate_train; creff: the re-trained classifier goes
# out with the model, per-class gradients come back with it
@pytest.mark.parametrize("method", ["fedprox", "mllm_fl", "creff"])
def test_flower_simulation_equals_in_process_engine(method, tiny_config, tmp_path):
    from flwr.simulation import run_simulation

    from fl_core.flower import make_client_app, make_server_app

    cfg = tiny_config(method__name=method)
    # the smoke profile's cpu_threads=1 holds in the simulation's actors too: the same float reduction order
    assert cfg.cpu_threads == 1
    reference = run_experiment(cfg, tmp_path / "in-process", progress=False)
    run_simulation(make_server_app(cfg, tmp_path / "flower"), make_client_app(), num_supernodes=cfg.data.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    assert_same_run(tmp_path / "flower", tmp_path / "in-process", reference)


# -- a real deployment on loopback: one SuperLink and a SuperNode per partition, separate processes --
REPO = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackDeployment:
    """``flower-superlink`` and one ``flower-supernode`` per partition, started as the README shows
    (insecure on loopback, no runtime dependency installation); every process is stopped on close."""

    def __init__(self, workdir: Path, partitions: int):
        self.workdir, self.port = workdir, free_port()
        home = workdir / "flwr-home"
        home.mkdir(parents=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        self.processes = [self._start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                      "--port", str(self.port), "--database", str(workdir / "superlink.db"))]
        self._wait_for_port(self.port)
        self.nodes = {k: self._start(f"supernode{k}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                     "--port", str(free_port()), "--node-config", f"partition-id={k} num-partitions={partitions}")
                      for k in range(partitions)}
        self.processes += list(self.nodes.values())

    def _start(self, name, *command):
        log = open(self.workdir / f"{name}.log", "w")
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    @staticmethod
    def _wait_for_port(port, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"SuperLink did not open port {port} in {timeout} s")

    def submit(self, run_config: str, stream: bool):
        command = ["flwr", "run", str(REPO), "loopback", "--run-config", run_config] + (["--stream"] if stream else [])
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=600)

    def kill_node(self, k: int) -> None:
        os.killpg(self.nodes[k].pid, signal.SIGKILL)  # the SuperNode and any ClientApp it runs

    def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


DEPLOYED = {"data.num_clients": 3, "fl.clients_per_round": 2}


def run_config(tiny: dict, run_dir: Path, **extra) -> str:
    pairs = " ".join(f"{k}={v}" for k, v in tiny.items())
    return " ".join([f'profile="smoke"', f'set="{pairs}"', f'run-dir="{run_dir}"', *(f"{k}={v}" for k, v in extra.items())])


@pytest.fixture
def deployment(tmp_path):
    federation = LoopbackDeployment(tmp_path / "deployment", partitions=DEPLOYED["data.num_clients"])
    yield federation
    federation.close()


@pytest.mark.slow
def test_loopback_deployment_equals_in_process_engine(deployment, tiny_config, tmp_path):
    tiny = {**TINY, **DEPLOYED}
    reference = run_experiment(make_config("smoke", tiny), tmp_path / "in-process", progress=False)
    done = deployment.submit(run_config(tiny, tmp_path / "flower"), stream=True)
    assert (tmp_path / "flower" / "record.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    assert_same_run(tmp_path / "flower", tmp_path / "in-process", reference)


@pytest.mark.slow
def test_a_supernode_killed_mid_run_is_recorded_as_failed_and_the_run_completes(deployment, tmp_path):
    tiny = {**TINY, **DEPLOYED, "fl.clients_per_round": 3, "fl.rounds": 3}
    run_dir = tmp_path / "flower"
    # round 1 includes each SuperNode starting its ClientApp process (imports, data): ~20 s alone on 2
    # cores, over 30 s when the suite runs beside it, so the timeout leaves room for that
    submitted = deployment.submit(run_config(tiny, run_dir, **{"client-timeout": 60}), stream=False)
    assert submitted.returncode == 0, submitted.stderr
    record_path = run_dir / "record.json"
    deadline = time.monotonic() + 300
    while not (record_path.is_file() and load_record(record_path)["rounds"]):
        assert time.monotonic() < deadline, "round 1 did not complete"
        time.sleep(1)
    deployment.kill_node(2)
    while load_record(record_path)["status"] != "complete":
        assert time.monotonic() < deadline, "the run did not complete after a SuperNode was killed"
        time.sleep(1)
    rounds = load_record(record_path)["rounds"]
    assert sorted(rounds[0]["clients"]) == [0, 1, 2] and "failed_clients" not in rounds[0]
    assert len(rounds) == 3
    later = rounds[-1]
    assert 2 not in later["clients"] and "2" in later["failed_clients"]
    assert sorted(later["clients"]) == [0, 1]


@pytest.mark.slow
def test_a_flower_run_whose_server_stopped_resumes_to_the_in_process_record(tiny_config, tmp_path, monkeypatch):
    """The ServerApp started again on the same run directory goes on from the last checkpoint:
    CReFF's federated features and re-trained classifier come back from it and go out again."""
    from flwr.simulation import run_simulation

    from fl_core.fl.engine import Engine
    from fl_core.flower import make_client_app, make_server_app

    cfg = tiny_config(method__name="creff", fl__rounds=3)
    reference = run_experiment(cfg, tmp_path / "in-process", progress=False)
    complete_round = Engine.complete_round

    def stop_in_round_2(self, round_idx, *args, **kwargs):
        if round_idx == 2:
            raise Interrupted  # the server dies after round 2's clients replied
        return complete_round(self, round_idx, *args, **kwargs)

    def simulate():
        run_simulation(make_server_app(cfg, tmp_path / "flower"), make_client_app(), num_supernodes=cfg.data.num_clients,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})

    with monkeypatch.context() as patch:
        patch.setattr(Engine, "complete_round", stop_in_round_2)
        with pytest.raises(Interrupted):  # run_simulation raises what stopped the ServerApp
            simulate()
    partial = load_record(tmp_path / "flower" / "record.json")
    assert partial["status"] == "running" and len(partial["rounds"]) == 1
    simulate()
    record = assert_same_run(tmp_path / "flower", tmp_path / "in-process", reference)
    assert record["timing"]["resumed_after_rounds"] == [1]
