"""One call from a config to a finished run record: what the CLI and the notebooks use."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

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


def annotate(cfg: ExperimentConfig, progress: bool = True, samples: int = 5) -> dict:
    """Annotate the web pool with the MLLM, fit the CLIP-role encoder, score it zero-shot on the
    test set. Teacher outputs are cached, so a second call does no model work."""
    from fl_core.teachers.server import build_server_context

    tic = time.perf_counter()
    device = resolve_device(cfg.device)
    fed = build_federated_data(cfg, device)
    ds = fed.dataset
    server = build_server_context(cfg, fed, device, progress)
    pool, annotation, encoder, fit, cache = server.pool, server.annotation, server.encoder, server.encoder_fit, server.cache
    logits = encoder.zero_shot_logits(ds.test.images, ds.class_names)
    zero_shot = float((logits.argmax(1) == ds.test.labels.cpu()).float().mean())
    return {
        "annotation_accuracy": annotation.accuracy,
        "zero_shot_top1": zero_shot,
        "seconds": time.perf_counter() - tic,
        "cached": not cache.stats.model_work and fit.get("cached", True),
        "pool": {"source": pool.source, "images": len(pool), "skipped": pool.skipped},
        "mllm": annotation.mllm,
        "encoder": encoder.name,
        "encoder_fit": fit,
        "cache": {"hits": cache.stats.hits, "computed": cache.stats.computed, "corrupt": cache.stats.corrupt,
                  "path": str(cache.path)},
        "label_counts": np.bincount(annotation.labels.numpy(), minlength=ds.num_classes).tolist(),
        "sample_captions": [
            {"caption": annotation.captions[i], "mllm_label": ds.class_names[int(annotation.labels[i])],
             **({"true_label": ds.class_names[int(pool.hidden_labels("measure-annotation-accuracy")[i])]}
                if pool.has_hidden_labels else {})}
            for i in range(min(samples, len(pool)))
        ],
    }


def run_grid(profile: str, variants: dict[str, dict], seeds: list[int], base: dict | None = None,
             progress: bool = True) -> list[dict]:
    """Run each named variant (a dict of overrides) for each seed; finished runs are reused.
    Each returned record carries its variant name under ``"_variant"``."""
    records = []
    for name, overrides in variants.items():
        for seed in seeds:
            cfg = make_config(profile, {**(base or {}), **overrides, "seed": seed})
            records.append({**run_experiment(cfg, progress=progress), "_variant": name})
    return records
