"""One call from a config to a finished run record: what the CLI and the notebooks use."""

from __future__ import annotations

import os
from pathlib import Path

from fl_core.config import ExperimentConfig, make_config
from fl_core.data.federated import build_federated_data
from fl_core.fl.engine import Engine, check_same_config, resolve_device
from fl_core.methods import make_method
from fl_core.results import RECORD_NAME, load_record


def runs_root() -> Path:
    """Where runs go by default: ``$FL_CORE_RUNS``, else ``./runs``."""
    return Path(os.environ.get("FL_CORE_RUNS", "runs"))


def default_run_dir(cfg: ExperimentConfig) -> Path:
    """``<runs root>/<method>-<config fingerprint>``: one directory per distinct setting."""
    return runs_root() / f"{cfg.method.name}-{cfg.fingerprint()}"


def run_experiment(cfg: ExperimentConfig, run_dir: Path | str | None = None, progress: bool = True) -> dict:
    """Run ``cfg`` in ``run_dir`` and return its record: a finished run is reused as it is, an
    interrupted one resumes after its last completed round."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    record_path = run_dir / RECORD_NAME
    if record_path.is_file():
        record = load_record(record_path)
        check_same_config(run_dir, record["fingerprint"], record["config"], cfg)
        if record["status"] == "complete":
            return {**record, "_path": str(record_path)}
    device = resolve_device(cfg.device)
    data = build_federated_data(cfg, device)
    record = Engine(cfg, make_method(cfg), data, run_dir, device, progress).run()
    return {**record, "_path": str(record_path)}


def run(profile: str = "offline", overrides: dict | None = None, **kwargs) -> dict:
    """``run_experiment(make_config(profile, overrides))``: the notebooks' one-liner."""
    return run_experiment(make_config(profile, overrides), **kwargs)
