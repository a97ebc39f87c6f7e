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
from fl_core.methods.mllm_fl import stage1_cache_path
from fl_core.parallel import cpu_threads, run_many, worker_count
from fl_core.results import RECORD_NAME, computed_once, load_record


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
    # the same run started twice at once (two notebooks, two shells): the second waits, then reuses it
    with computed_once(run_dir / RECORD_NAME):
        finished = finished_record(cfg, run_dir)
        if finished is not None:
            return finished
        device = resolve_device(cfg.device)
        with cpu_threads(cfg.cpu_threads):
            data = build_federated_data(cfg, device)
            record = Engine(cfg, make_method(cfg), data, run_dir, device, progress).run()
    return {**record, "_path": str(run_dir / RECORD_NAME)}


def finished_record(cfg: ExperimentConfig, run_dir: Path | str) -> dict | None:
    """The record of a finished run of ``cfg`` in ``run_dir``, or ``None`` (no run, or an
    interrupted one). Raises if the directory holds a run of another config."""
    record_path = Path(run_dir) / RECORD_NAME
    if not record_path.is_file():
        return None
    record = load_record(record_path)
    check_same_config(run_dir, record["fingerprint"], record["config"], cfg)
    return {**record, "_path": str(record_path)} if record["status"] == "complete" else None


def run(profile: str = "offline", overrides: dict | None = None, **kwargs) -> dict:
    """``run_experiment(make_config(profile, overrides))``: the notebooks' one-liner."""
    return run_experiment(make_config(profile, overrides), **kwargs)


def annotate(cfg: ExperimentConfig, progress: bool = True, samples: int = 5) -> dict:
    """Annotate the web pool with the MLLM, fit the CLIP-role encoder, score it zero-shot on the
    test set. Teacher outputs are cached, so a second call does no model work."""
    from fl_core.teachers.server import build_server_context

    tic = time.perf_counter()
    device = resolve_device(cfg.device)
    with cpu_threads(cfg.cpu_threads):
        fed = build_federated_data(cfg, device)
        ds = fed.dataset
        server = build_server_context(cfg, fed, device, progress)
        logits = server.encoder.zero_shot_logits(ds.test.images, ds.prompt_names)
    pool, annotation, encoder, fit, cache = server.pool, server.annotation, server.encoder, server.encoder_fit, server.cache
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
    Each returned record carries its variant name under ``"_variant"``.

    On a CPU with ``cpu_threads`` set, the runs go to worker processes, as many at once as the
    cores hold (``fl_core.parallel.worker_count``); the records are the same as one at a time.
    The workers import the main script: a script calling this needs ``if __name__ == "__main__":``.
    Several grids are best given to ``run_grids`` together."""
    return run_grids(profile, {None: (variants, seeds)}, base, progress)[None]


def run_grids(profile: str, grids: dict, base: dict | None = None, progress: bool = True) -> dict:
    """Several grids at once: ``grids`` maps a key to ``(variants, seeds)`` or ``(variants, seeds,
    overrides)`` (those over ``base``), and the result maps each key to its ``run_grid`` records.
    Their pending runs share the workers, longest first (``longest_first``), so that no core idles
    at one grid's end while the next waits; a setting that recurs, within a grid or across, runs once."""
    for _, seeds, *_ in grids.values():
        _check_seeds(list(seeds))
    named = {key: [(name, make_config(profile, {**(base or {}), **(grid[2] if len(grid) > 2 else {}), **overrides,
                                                  "seed": seed}))
                   for name, overrides in grid[0].items() for seed in grid[1]]
             for key, grid in grids.items()}
    jobs = {str(default_run_dir(cfg)): cfg for configs in named.values() for _, cfg in configs}
    threads = [cfg.cpu_threads for cfg in jobs.values()]
    on_cpu = all(resolve_device(cfg.device).type == "cpu" for cfg in jobs.values())
    done = {run_dir: record for run_dir, cfg in jobs.items() if (record := finished_record(cfg, run_dir))}
    todo = longest_first({run_dir: cfg for run_dir, cfg in jobs.items() if run_dir not in done})
    workers = min(worker_count(0 if 0 in threads else max(threads), on_cpu), len(todo))
    # one run at a time shows its own progress; runs at once would interleave their bars
    items = [(run_dir, jobs[run_dir], progress and workers == 1) for run_dir in todo]
    done.update(zip(todo, run_many(_run_grid_job, items, workers, progress=progress)))
    return {key: [{**done[str(default_run_dir(cfg))], "_variant": name} for name, cfg in configs]
            for key, configs in named.items()}


def _check_seeds(seeds: list[int]) -> None:
    # a repeated seed is the same run again: it would count twice in a mean and narrow its std
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if not seeds or repeated:
        raise ValueError(f"seeds {seeds} are invalid: give one or more seeds, each once"
                         + (f" ({', '.join(map(str, repeated))} repeated)" if repeated else ""))


# a run's duration relative to FedAvg's, by method (offline profile, one thread: FedAvg and FedProx
# ~27 s, MLLM-FL ~28 s, CReFF ~43 s, CLIP2FL ~60 s), and MLLM-FL's stage 1 (~40 s more) when a run
# must pretrain it; only the order they give matters
RELATIVE_COST = {"fedavg": 1.0, "fedprox": 1.0, "creff": 1.6, "clip2fl": 2.2, "mllm_fl": 1.0}
STAGE1_COST = 1.5


def longest_first(jobs: dict[str, ExperimentConfig]) -> list[str]:
    """The run directories of ``jobs`` (pending runs) by expected duration, longest first: on few
    workers, a long run started last leaves the other cores idle until it ends. A stage 1 that
    several runs share, and that is not cached, counts for the first of them only; the others
    follow in the order of their stage 1's first run, so that they find it done rather than wait
    for it (``computed_once``)."""
    pretraining: dict = {}  # stage-1 cache path -> the rank of the run that computes it
    ranked = []
    for index, (run_dir, cfg) in enumerate(jobs.items()):
        cost, after = RELATIVE_COST.get(cfg.method.name, 1.0) * cfg.fl.rounds * cfg.fl.local_epochs, 0
        path = stage1_cache_path(cfg)
        if path is not None and not path.is_file():
            if path not in pretraining:
                pretraining[path] = len(pretraining)
                cost += STAGE1_COST * cfg.fl.rounds * cfg.fl.local_epochs
            else:
                after = pretraining[path]
        ranked.append((-cost, after, index, run_dir))
    return [run_dir for *_, run_dir in sorted(ranked)]


def _run_grid_job(job: tuple[str, ExperimentConfig, bool]) -> dict:
    run_dir, cfg, progress = job
    return run_experiment(cfg, run_dir, progress=progress)
