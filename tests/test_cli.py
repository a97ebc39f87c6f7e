import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY, start_tiny_run, wait_for_file

GROUPS = ("many", "medium", "few", "head", "middle", "tail")
# the teachers' and server's work cut down, for whole runs of every method in seconds
SMALL = {"method.creff_match_steps": 5, "method.creff_retrain_epochs": 2, "data.web_pool_limit": 300,
         "teacher.align_steps": 20, "method.stage1_epochs": 1}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fl_core", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedavg", "fedprox", "creff", "clip2fl", "mllm_fl"])
def test_run_prints_metrics_and_the_record_path_as_last_line(tmp_path, method, monkeypatch):
    monkeypatch.setenv("FL_CORE_CACHE", str(tmp_path / "cache"))
    sets = [f"--set={k}={v}" for k, v in {**TINY, **SMALL}.items()]
    done = cli("run", "--profile", "smoke", "--method", method, "--run-dir", str(tmp_path / "r"), "--no-progress", *sets)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 <= summary["top1"] <= 1
    for group in GROUPS:
        assert summary[group] is None or 0 <= summary[group] <= 1
    record = json.loads(open(summary["run_record"]).read())
    assert record["method"]["name"] == method and record["status"] == "complete"
    assert record["config"]["fl"]["rounds"] == 2 and len(record["rounds"]) == 2
    assert record["commit"] and record["device"].startswith("cpu")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "data.alpha=0"], "data.alpha=0.0 is invalid"),
        (["--set", "fl.round=3"], "unknown config key 'fl.round'"),
        (["--method", "scaffold"], "method.name='scaffold' is not valid; choose one of"),
        (["--profile", "fast"], "profile='fast' is not a known profile"),
        (["--set", "data.imbalance_factor=0.1"], "data.imbalance_factor=0.1 is invalid"),
    ],
)
def test_bad_input_fails_at_once_with_a_clear_message(args, message):
    start = time.monotonic()
    done = cli("run", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - start < 10


def test_one_set_takes_several_overrides_and_repeats_add_to_them(tmp_path, monkeypatch, capsys):
    from fl_core.cli import main

    monkeypatch.setenv("FL_CORE_RUNS", str(tmp_path))
    assert main(["config", "--profile", "smoke", "--set", "fl.rounds=4", "data.alpha=0.1", "--set", "seed=3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["overrides"] == ["data.alpha", "fl.rounds", "seed"]
    assert (summary["config"]["fl.rounds"], summary["config"]["data.alpha"], summary["config"]["seed"]) == (4, 0.1, 3)
    assert main(["config", "--profile", "smoke", "--set", "fl.rounds=4", "fl.round=5"]) == 2
    assert "unknown config key 'fl.round'" in capsys.readouterr().err


def test_ctrl_c_says_what_is_kept_and_how_to_resume(tmp_path):
    # its own process group, which Ctrl-C signals as a whole; SIGINT handled as in a terminal even where
    # the tests themselves run with it ignored (a background job of a non-interactive shell)
    _, proc = start_tiny_run(tmp_path / "run", 50, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    record = tmp_path / "run" / "record.json"
    wait_for_file(record, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted: completed rounds" in stderr and "the same command resumes" in stderr
    assert "Traceback" not in stderr
    assert json.loads(record.read_text())["status"] == "running"


def test_folders_that_cannot_be_written_fail_before_the_run(tmp_path, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    done = cli("run", "--profile", "smoke", "--run-dir", str(a_file / "run"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot create the folder {a_file / 'run'}: {a_file} is not a folder; pass a --run-dir you can write" in done.stderr
    monkeypatch.setenv("FL_CORE_CACHE", str(a_file / "cache"))
    done = cli("compare", "--profile", "smoke", "--methods", "fedavg")
    assert done.returncode == 2 and "set FL_CORE_CACHE to a folder you can write" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_data_fails_within_seconds(tmp_path):
    start = time.monotonic()
    done = cli("run", "--profile", "paper-cifar10", "--set", f"data.root={tmp_path}")
    assert done.returncode == 2 and "cifar10 was not found under" in done.stderr and "data.download=true" in done.stderr
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_compare_runs_methods_by_seeds_prints_the_table_and_reuses_the_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_CORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FL_CORE_RUNS", str(tmp_path / "runs"))
    sets = [f"--set={k}={v}" for k, v in {**TINY, **SMALL}.items()]
    args = ("compare", "--profile", "smoke", "--methods", "fedavg", "mllm_fl", "--seeds", "7", "8", "--no-progress", *sets)
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    label = "MLLM-FL (simulated MLLM, offline encoder)"  # substitutes named beside their numbers
    assert list(summary["results"]) == ["FedAvg", label] and summary["seeds"] == [7, 8]
    assert any(line.startswith(label) for line in lines) and lines[-2].startswith("profile smoke; seeds [7, 8]; 4 runs")
    for variant, method in (("FedAvg", "fedavg"), (label, "mllm_fl")):
        result = summary["results"][variant]
        records = [json.loads(open(path).read()) for path in result["run_records"]]
        assert [r["config"]["seed"] for r in records] == [7, 8] and {r["method"]["name"] for r in records} == {method}
        finals = [100 * r["final"]["top1"] for r in records]
        assert result["seeds"] == 2 and result["top1"] == pytest.approx(sum(finals) / 2)
        assert result["top1_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)
    again = cli(*args, "--markdown", timeout=60)  # every run finished: read back, not run again
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1]) == summary
    table = again.stdout.splitlines()[:4]
    assert table[0].startswith("| variant ") and set(table[1]) <= set("|:- ") and table[3].startswith(f"| {label} ")
    assert len(list((tmp_path / "runs").iterdir())) == 4


@pytest.mark.slow
def test_compare_sweeps_a_key_with_one_grid_per_value(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_CORE_RUNS", str(tmp_path / "runs"))
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    done = cli("compare", "--profile", "smoke", "--methods", "fedavg", "creff", "--seeds", "7",
               "--sweep", "data.alpha=0.1, 1", "--no-progress", *sets)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["sweep"] == {"key": "data.alpha", "values": ["0.1", "1"]}
    assert "data.alpha=0.1" in lines[0] and "data.alpha=1" in lines[0] and "tail" in lines[1]
    for value, alpha in (("0.1", 0.1), ("1", 1.0)):
        assert list(summary["results"][value]) == ["FedAvg", "CReFF"]
        for result in summary["results"][value].values():
            record = json.loads(open(result["run_records"][0]).read())
            assert record["config"]["data"]["alpha"] == alpha and record["method"]["name"] == result["method"]
            assert result["top1"] == pytest.approx(100 * record["final"]["top1"]) and result["top1_std"] is None
    assert len(list((tmp_path / "runs").iterdir())) == 4


@pytest.mark.parametrize("args, message", [
    (["--sweep", "data.alpha"], "--sweep 'data.alpha' is not of the form KEY=V1,V2,..."),
    (["--sweep", "data.alpha=0.1,x"], "data.alpha='x' is not a valid float"),
    (["--sweep", "fl.round=1,2"], "unknown config key 'fl.round'"),
    (["--sweep", "seed=1,2"], "--sweep cannot vary seed: compare varies it already, use --seeds or --methods"),
    (["--methods", "scaffold"], "invalid choice: 'scaffold'"),
    (["--seeds", "seven"], "invalid int value: 'seven'"),
    (["--seeds", "7", "8", "7"], "seeds [7, 8, 7] are invalid: give one or more seeds, each once (7 repeated)"),
    (["--seeds", "-1"], "seed=-1 is invalid: it must be in 0..4294967295"),
    (["--set", "fl.round=3"], "unknown config key 'fl.round'"),
    (["--set", "data.alpha=0"], "data.alpha=0.0 is invalid"),
])
def test_compare_rejects_bad_input_before_any_run(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("FL_CORE_RUNS", str(tmp_path / "runs"))
    done = cli("compare", "--profile", "smoke", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_config_prints_each_key_where_it_was_set_what_it_means_and_the_run(tmp_path, monkeypatch, capsys):
    from fl_core.cli import main
    from fl_core.config import make_config
    from fl_core.experiment import run_experiment

    monkeypatch.setenv("FL_CORE_RUNS", str(tmp_path))
    overrides = {**TINY, "data.alpha": 0.1}
    args = ["config", "--profile", "smoke", "--method", "creff", *(f"--set={k}={v}" for k, v in overrides.items())]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    cfg = make_config("smoke", {**overrides, "method.name": "creff"})
    assert summary["config"] == cfg.flat() and summary["fingerprint"] == cfg.fingerprint() and summary["status"] is None
    assert lines[-2] == f"run directory: {tmp_path / f'creff-{cfg.fingerprint()}'} (not run yet)"
    by_key = {line.split("=", 1)[0]: line for line in lines[:-2]}
    assert list(by_key) == list(cfg.flat())
    assert re.fullmatch(r"data\.alpha=0\.1 +--set +# Dirichlet concentration of the non-IID split", by_key["data.alpha"])
    assert re.fullmatch(r"cpu_threads=1 +profile +# torch's threads .*", by_key["cpu_threads"])
    assert re.fullmatch(r"fl\.lr=0\.1 +# the clients' SGD learning rate", by_key["fl.lr"])  # the default
    assert by_key["method.align_rounds"].endswith("the last only (one of: every, last)")  # and its valid values
    assert by_key["data.augment"].startswith("data.augment=true ")  # as --set takes it

    run_experiment(cfg, progress=False)
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1])["status"] == "complete"
    assert re.fullmatch(r"run directory: .* \(finished \(2 rounds, top-1 \d+\.\d%\): `run` reuses it\)", lines[-2])
    # a damaged record in the run's directory: one line saying so, as `run` gives, not a traceback
    (tmp_path / f"creff-{cfg.fingerprint()}" / "record.json").write_text("{")
    assert main(args) == 2
    assert "record.json cannot be read as a run record" in capsys.readouterr().err
