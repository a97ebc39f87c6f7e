"""How runs use a CPU's cores: a fixed thread count per run, and several runs at once.

A CPU result depends on torch's intra-op thread count: oneDNN and ATen split sums across threads,
so 1 and 2 threads round differently. ``cpu_threads`` in the config fixes it for a run (0 leaves
torch's default, one thread per core, so results then depend on the machine), which makes a
profile's numbers the same on any number of cores. A machine with more cores than one run uses
then runs several at once (``run_many``): on 2 cores two 1-thread runs together train 1.1-1.5x
faster than two 2-thread runs one after another, since small models leave a second thread idle.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from tqdm import tqdm

WORKERS_ENV = "FL_CORE_WORKERS"

_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pool_key: tuple = ()


@contextmanager
def cpu_threads(threads: int):
    """Run the block with torch's intra-op thread count at ``threads`` (0: as it is); restores it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute_setting(threads: int, device: torch.device | str) -> dict:
    """For the keys of cached CPU computations: a fixed thread count decides their rounding (with
    0, the machine's default, the keys stay as they were before ``cpu_threads`` existed)."""
    return {"threads": threads} if threads and torch.device(device).type == "cpu" else {}


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(threads: int, on_cpu: bool) -> int:
    """Runs at once: ``$FL_CORE_WORKERS`` if set, else as many as the cores hold at ``threads`` each
    (one at a time where a run takes all cores, ``threads=0``, or runs on a GPU)."""
    value = os.environ.get(WORKERS_ENV, "auto")
    if value != "auto":
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{WORKERS_ENV}={value!r} is not valid: 'auto' or a whole number >= 1")
        return int(value)
    if not on_cpu or threads == 0:
        return 1
    return max(1, available_cores() // threads)


def run_many(job: Callable, items: Sequence, workers: int, desc: str = "runs", progress: bool = True) -> list:
    """``[job(item) for item in items]``, on ``workers`` processes when more than one (``job`` must
    be a module-level function; its results come back in the order of ``items``). The worker
    processes are kept for the next call, so their imports and data caches are paid once."""
    if workers <= 1 or len(items) <= 1:
        return [job(item) for item in tqdm(items, desc=desc, disable=not progress or len(items) <= 1, leave=False)]
    pool = _worker_pool(workers)
    futures = [pool.submit(job, item) for item in items]
    try:
        with tqdm(total=len(futures), desc=f"{desc} ({workers} at once)", disable=not progress, leave=False) as bar:
            for _ in concurrent.futures.as_completed(futures):
                bar.update(1)
        return [f.result() for f in futures]
    except concurrent.futures.process.BrokenProcessPool as err:
        shutdown_workers()
        raise RuntimeError(
            "a worker process died: out of memory, or a script that starts runs at import (worker processes "
            "import the main script: put its work under `if __name__ == \"__main__\":`). Finished runs are kept "
            f"and interrupted ones resume; {WORKERS_ENV}=1 runs them one at a time in this process") from err
    except BaseException:  # an interrupt, or a run's error: stop the others too (they resume later)
        shutdown_workers(kill=True)
        raise


def _worker_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    global _pool, _pool_key
    # workers read where runs and caches go from the environment they started with
    key = (workers, sorted((k, v) for k, v in os.environ.items() if k.startswith(("FL_CORE_", "HF_"))))
    if _pool is None or _pool_key != key:
        shutdown_workers()
        # spawn: a fork of a process whose torch already started its thread pool can hang
        _pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                       initializer=_ignore_interrupts)
        _pool_key = key
    return _pool


def _ignore_interrupts() -> None:
    # Ctrl-C (or a notebook kernel's interrupt) reaches the whole process group; the caller decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def shutdown_workers(kill: bool = False) -> None:
    """Stop the kept worker processes (they stop with the interpreter too): after their current
    runs, or at once with ``kill`` (a killed run resumes after its last completed round)."""
    global _pool, _pool_key
    if _pool is not None:
        processes = list(getattr(_pool, "_processes", {}).values())  # no public way before Python 3.14
        _pool.shutdown(wait=not kill, cancel_futures=True)
        if kill:
            for process in processes:
                process.kill()
    _pool, _pool_key = None, ()
