"""Run records: atomic writes, provenance (commit, device, library versions), and loaders for the notebooks."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import subprocess
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

RECORD_NAME = "record.json"
CHECKPOINT_NAME = "checkpoint.pt"


def check_writable_folder(path: Path | str, how_to_change: str) -> None:
    """A ``ValueError`` naming ``path``, and ``how_to_change`` it, where that folder could not be created
    or written; creates nothing (found before a run starts, not at its first checkpoint)."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"cannot create the folder {path}: {existing} is not a folder; {how_to_change}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the folder {path}: {existing} is not writable; {how_to_change}")


def atomic_write(path: Path | str, write, text: bool = False) -> None:
    """Call ``write(file)`` on a new temporary file beside ``path``, flush it to the disk, then rename
    it over ``path``: readers see the old file or the whole new one, also after a crash of the machine.
    The file gets the permissions of any new file (the umask's), not ``mkstemp``'s owner-only ones, so
    that a group can share a runs or cache folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "x" if text else "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # before the rename: else a crash can leave the new name on an empty file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path | str, obj) -> None:
    atomic_write(path, lambda fh: json.dump(obj, fh, indent=1), text=True)


def save_torch(path: Path | str, obj) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


class DamagedFileError(ValueError):
    """A file that fl_core writes (run record, checkpoint, cached result) could not be read back."""


def damaged(path: Path | str, err: Exception, what: str, remedy: str) -> DamagedFileError:
    """The error for ``path``, which ``err`` kept from being read as ``what``, saying what to do."""
    return DamagedFileError(f"{path} cannot be read as {what} ({type(err).__name__}: {err}): it was damaged or not "
                            f"written by fl_core; {remedy}")


def load_cached(path: Path | str, what: str, load=None):
    """A result cached at ``path`` as ``load(path)`` reads it (default: ``torch.load`` to the CPU), or
    ``None`` where there is none or it cannot be read (then with a warning: the caller computes it
    again and overwrites it)."""
    if not Path(path).is_file():
        return None
    try:
        return load(path) if load is not None else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever the reader raises for a damaged file
        warnings.warn(str(damaged(path, err, what, "computing it again")), stacklevel=2)
        return None


@contextmanager
def computed_once(path: Path | str):
    """Hold a lock beside ``path`` for the block, in which the caller reads ``path`` if it exists
    and else computes and writes it: runs at once in other processes then wait for the first
    one's result instead of computing it again. (No lock where ``fcntl`` is missing.)"""
    try:
        import fcntl
    except ImportError:  # not POSIX: at worst the same result is computed twice
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_record(path: Path | str) -> dict:
    """A run record from its file or its run directory (``DamagedFileError`` if it cannot be read as one)."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    try:
        with open(path) as fh:
            record = json.load(fh)
        if not isinstance(record, dict) or not {"status", "fingerprint", "config"} <= set(record):
            raise ValueError("no status, fingerprint or config")
    except ValueError as err:  # json's JSONDecodeError and UnicodeDecodeError are ValueErrors too
        remedy = (f"delete it, and the run is restored from the {CHECKPOINT_NAME} beside it"
                  if (path.parent / CHECKPOINT_NAME).is_file() else f"delete its run directory {path.parent} to compute the run again")
        raise damaged(path, err, "a run record", remedy) from err
    return record


def find_records(root: Path | str, complete_only: bool = True) -> list[dict]:
    """All run records below ``root`` (each with its path under ``"_path"``)."""
    records = []
    for path in sorted(Path(root).rglob(RECORD_NAME)):
        record = load_record(path)
        if not complete_only or record.get("status") == "complete":
            records.append({**record, "_path": str(path)})
    return records


RESULT_PATHS = ("fl_core", "notebooks", "pyproject.toml", "constraints.txt")  # what can change a result
# besides torch, the libraries whose versions a run record names: they compute results or teachers' outputs
COMPUTING_LIBRARIES = ("torchvision", "numpy", "transformers", "sentence-transformers", "open_clip_torch", "timm",
                       "flwr")


def git_commit() -> dict:
    """Commit of the code that ran; ``dirty`` when the code or notebooks had uncommitted changes
    (edits elsewhere, e.g. the README, cannot change a result)."""
    here = Path(__file__).resolve().parent

    def git(*args) -> str:
        done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", *(f":/{p}" for p in RESULT_PATHS)))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"commit": commit or "unknown", "dirty": dirty}


def library_versions() -> dict[str, str]:
    """The versions of Python, torch (with its build, e.g. ``2.14.1+cu130``) and the installed
    ``COMPUTING_LIBRARIES``: with the commit and the device, what another machine needs to repeat a
    result (``make setup`` installs constraints.txt's)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in COMPUTING_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def device_description(device: torch.device) -> str:
    """The device a result came from, e.g. ``cpu: AMD EPYC (AVX512), 1 threads``: on a CPU its model and
    the vector instructions of torch's kernels, since other CPUs round differently (README, Results)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``), else what ``platform`` knows of it."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor, e.g. ``AuthenticAMD`` or ``GenuineIntel`` (Linux), else ``unknown``."""
    return _cpuinfo("vendor_id") or "unknown"


def _cpuinfo(field: str) -> str:
    """The first CPU's ``field`` in ``/proc/cpuinfo``; empty where there is none."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.split(":", 1)[0].strip() == field:
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return ""
