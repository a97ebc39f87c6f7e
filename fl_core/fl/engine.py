"""In-process federated simulation: the round loop, checkpoint/resume and the run record.

Each round: the seeded schedule picks clients, they train from the global model through the
method's ``train_clients`` (one after another, or vectorized), the method aggregates and does its
server work, the evaluation model is scored on the test set, and a checkpoint is written. A run
started again in the same directory continues after the last completed round and ends with the same
record. ``start`` / ``complete_round`` / ``finish`` let another driver (``fl_core.flower``) run the rounds.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from tqdm import tqdm

from fl_core.allocator import allocator_setting, keep_freed_memory
from fl_core.config import ExperimentConfig, config_from_dict
from fl_core.data.federated import FederatedData
from fl_core.fl.sampling import client_generator, client_schedule
from fl_core.metrics import GROUP_NAMES, evaluate, forward_flops_per_image, training_flops_per_image
from fl_core.models import build_model, resolve_arch
from fl_core.results import (CHECKPOINT_NAME, RECORD_NAME, damaged, device_description, git_commit, library_versions,
                              save_torch, write_json)

if TYPE_CHECKING:
    from fl_core.methods.base import Method

RECORD_SCHEMA = 1


class RunDirectoryConflict(ValueError):
    """The run directory holds a run of a different config."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA device is available; use device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_client_training(mode: str, device: torch.device) -> bool:
    """Whether the round's clients are trained together (``fl.client_training``): ``vectorized`` asks
    for it on any device, ``auto`` on CUDA only: on a CPU it pays only for small models (ResNet-8
    width 0.125: 1.6x; 0.25: 1.2x; 1: 1.0x the sequential engine on 2 cores, see ``make bench``)."""
    return mode == "vectorized" or (mode == "auto" and device.type == "cuda")


def resolve_stacked_execution(fl, device: torch.device) -> dict[str, bool | str]:
    """How clients trained together run on ``device``: ``fl.cuda_graphs`` (auto: on CUDA),
    ``fl.channels_last`` (auto: on CPU), ``fl.grouped_conv`` (auto: torch's kernels) and
    ``fl.compile`` (auto: off); keyword arguments of ``train_clients_vectorized``."""
    if fl.cuda_graphs == "on" and device.type != "cuda":
        raise ValueError(f"fl.cuda_graphs=on needs a CUDA device, but the run's device is {device.type}; "
                         "use fl.cuda_graphs=auto or off")
    if fl.grouped_conv == "triton" and device.type != "cuda":
        raise ValueError(f"fl.grouped_conv=triton needs a CUDA device, but the run's device is {device.type}; "
                         "use fl.grouped_conv=auto or native")
    if fl.grouped_conv == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError("fl.grouped_conv=triton needs the triton package (it comes with torch's CUDA builds on "
                         "Linux: pip install triton); or use fl.grouped_conv=auto or native")

    def switch(mode: str, auto: bool) -> bool:
        return mode == "on" or (mode == "auto" and auto)

    return {"cuda_graphs": switch(fl.cuda_graphs, device.type == "cuda"),
            "channels_last": switch(fl.channels_last, device.type == "cpu"),
            "grouped_conv": "native" if fl.grouped_conv == "auto" else fl.grouped_conv,
            "compile_backend": "inductor" if fl.compile == "on" else None}


class Engine:
    def __init__(self, cfg: ExperimentConfig, method: "Method", data: FederatedData, run_dir: Path | str,
                 device: torch.device, progress: bool = True):
        self.cfg, self.method, self.data = cfg, method, data
        keep_freed_memory()
        self.run_dir = Path(run_dir)
        self.device = device
        self.progress = progress
        self.groups = data.groups(cfg.data.many_threshold, cfg.data.few_threshold)
        self.arch = resolve_arch(cfg.model, cfg.data.dataset, method.default_arch)
        self.model = build_model(cfg.model, cfg.data.dataset, data.num_classes, data.dataset.channels, cfg.seed,
                                 method.projection_dim(cfg), method.default_arch).to(device)
        self._worker: nn.Module | None = None
        self.vectorized = resolve_client_training(cfg.fl.client_training, device)
        self.stacked_execution = resolve_stacked_execution(cfg.fl, device)
        self.runner = "in-process"  # or "flower" (fl_core.flower drives the rounds)
        self._schedule = client_schedule(cfg.seed, cfg.data.num_clients, cfg.fl.clients_per_round, cfg.fl.rounds)
        image_shape = tuple(data.dataset.train.images.shape[1:])
        self.train_flops_per_image = training_flops_per_image(self.model, image_shape)
        self.forward_flops_per_image = forward_flops_per_image(self.model, image_shape)

    def worker_model(self) -> nn.Module:
        """A scratch model loaded with the current global weights, for one client's training."""
        if self._worker is None:
            self._worker = copy.deepcopy(self.model)
        self._worker.load_state_dict(self.model.state_dict())
        return self._worker

    def evaluate(self, model: nn.Module | None = None) -> dict:
        model = self.method.evaluation_model(self) if model is None else model
        return evaluate(model, self.data.dataset.test, self.data.pipeline, self.groups,
                        self.data.num_classes, self.cfg.fl.eval_batch_size)

    def run(self) -> dict:
        """Run (or resume) all rounds; returns the final run record."""
        cfg, f = self.cfg, self.cfg.fl
        self.start()
        bar = tqdm(range(self.completed_rounds + 1, f.rounds + 1), desc=f"{self.method.name} rounds",
                   disable=not self.progress, initial=self.completed_rounds, total=f.rounds)
        for r in bar:
            tic = time.perf_counter()
            client_ids = self.clients_of_round(r)
            results = self.method.train_clients(self, client_ids, [client_generator(cfg.seed, r, k) for k in client_ids])
            entry = self.complete_round(r, results, tic)
            if "top1" in entry:
                bar.set_postfix(top1=f"{entry['top1']:.3f}")
        return self.finish()

    @property
    def completed_rounds(self) -> int:
        return len(self._rounds)

    def clients_of_round(self, round_idx: int) -> list[int]:
        """The clients the seeded schedule samples in round ``round_idx`` (1-based)."""
        return [int(k) for k in self._schedule[round_idx - 1]]

    def start(self) -> None:
        """Resume from the run directory's checkpoint, or do the method's setup for a fresh run."""
        checkpoint = load_checkpoint(self.run_dir, self.cfg, self.device)
        if checkpoint is None:
            self._rounds, self._resumed, self._elapsed, self._last_metrics = [], [], 0.0, None
            self._started_at = _now()
            self.method.setup(self)
        else:
            self.model.load_state_dict(checkpoint["model"])
            self.method.load_state_dict(checkpoint["method"])
            self._rounds, self._elapsed = checkpoint["rounds"], checkpoint["elapsed"]
            self._started_at, self._last_metrics = checkpoint["started_at"], checkpoint["last_metrics"]
            self._resumed = checkpoint["resumed"] + [len(self._rounds)]

    def complete_round(self, r: int, results: list, tic: float, failed: dict[int, str] | None = None) -> dict:
        """Aggregate the clients' results of round ``r`` (a round that started at ``tic``), do the
        server's work, evaluate, record and checkpoint. ``failed`` names clients that were sampled but
        did not report (and why)."""
        if not results:
            raise RuntimeError(f"round {r}: no client reported back (failed: {failed}); nothing to aggregate")
        clients_done = time.perf_counter()
        self.method.aggregate(self, results)
        server = self.method.after_aggregation(self, r)
        server_done = time.perf_counter()
        entry = {
            "round": r,
            "clients": [res.client_id for res in results],
            "train_loss": sum(res.mean_loss * res.num_samples for res in results) / sum(res.num_samples for res in results),
            "upload_bytes": {str(res.client_id): res.upload_bytes for res in results},
            "client_flops": {str(res.client_id): res.flops for res in results},
            **server,
        }
        if failed:
            entry["failed_clients"] = {str(k): why for k, why in failed.items()}
        if r % self.cfg.fl.eval_every == 0 or r == self.cfg.fl.rounds:
            self._last_metrics = self.evaluate()
            entry.update({k: self._last_metrics[k] for k in ("top1", *GROUP_NAMES)})
        done = time.perf_counter()
        entry["seconds"] = done - tic
        # where the round's time went: the clients' training (or, on Flower, waiting for them), the
        # server's aggregation and method work, and evaluation (checkpoint writing comes after)
        entry["seconds_by_part"] = {"clients": clients_done - tic, "server": server_done - clients_done,
                                    "evaluation": done - server_done}
        self._elapsed += entry["seconds"]
        self._rounds.append(entry)
        state = {"fingerprint": self.cfg.fingerprint(), "config": self.cfg.to_dict(), "model": self.model.state_dict(),
                 "method": self.method.state_dict(), "rounds": self._rounds, "elapsed": self._elapsed,
                 "started_at": self._started_at, "resumed": self._resumed, "last_metrics": self._last_metrics}
        save_torch(self.run_dir / CHECKPOINT_NAME, state)
        write_json(self.run_dir / RECORD_NAME, self._record("running"))
        return entry

    def finish(self) -> dict:
        """Write and return the final record."""
        record = self._record("complete")
        write_json(self.run_dir / RECORD_NAME, record)
        return record

    @functools.cached_property
    def _code_and_device(self) -> dict:
        """The record's commit, device and library versions, found once per run, not per round (git runs
        twice per lookup)."""
        return {**git_commit(), "device": device_description(self.device), "libraries": library_versions()}

    def _record(self, status: str) -> dict:
        cfg, rounds = self.cfg, self._rounds
        final = self._last_metrics if status == "complete" else None
        together = self.vectorized and self.runner == "in-process"  # Flower clients train one at a time
        uploads = [b for entry in rounds for b in entry["upload_bytes"].values()]
        flops = [x for entry in rounds for x in entry["client_flops"].values()]
        return {
            "schema": RECORD_SCHEMA,
            "status": status,
            "profile": cfg.profile,
            "method": self.method.describe(),
            "fingerprint": cfg.fingerprint(),
            "config": cfg.to_dict(),
            "arch": self.arch,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            **self._code_and_device,
            "runner": self.runner,
            "client_training": "vectorized" if together else "sequential",
            "stacked_execution": self.stacked_execution if together else None,
            "torch": torch.__version__,
            "data": self.data.summary(cfg.data.many_threshold, cfg.data.few_threshold),
            "rounds": rounds,
            "final": final,
            "cost": {"upload_bytes_per_client_per_round": (sum(uploads) / len(uploads)) if uploads else None,
                     "client_flops_per_round": (sum(flops) / len(flops)) if flops else None,
                     "train_flops_per_image": self.train_flops_per_image},
            "timing": {"started_at": self._started_at, "finished_at": _now() if final else None,
                       "train_seconds": self._elapsed, "resumed_after_rounds": self._resumed,
                       "malloc": allocator_setting()},
        }


def load_checkpoint(run_dir: Path, cfg: ExperimentConfig, device: torch.device | str = "cpu") -> dict | None:
    """The checkpoint in ``run_dir`` if there is one, its tensors on ``device`` (the method's state is
    used as loaded, e.g. CReFF's features and classifier); an error if it belongs to another config."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # whatever torch raises for a damaged file: RuntimeError, EOFError, ValueError, ...
        raise damaged(path, err, "a run's checkpoint",
                      f"delete it to start the run in {run_dir} afresh, or use another run directory") from err
    check_same_config(run_dir, checkpoint["fingerprint"], checkpoint["config"], cfg)
    return checkpoint


def check_same_config(run_dir: Path, fingerprint: str, stored: dict, cfg: ExperimentConfig) -> None:
    if fingerprint == cfg.fingerprint():
        return
    theirs, ours = config_from_dict(stored).flat(), cfg.flat()
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v and k != "profile"}
    raise RunDirectoryConflict(
        f"{run_dir} holds a run of another config (differs in {diff}, as (stored, asked)); "
        "use another --run-dir or delete that directory"
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
