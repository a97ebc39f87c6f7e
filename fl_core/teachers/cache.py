"""On-disk cache of teacher outputs (captions, class distributions, embeddings).

One SQLite file under ``$FL_CORE_CACHE`` (default ``~/.cache/fl_core``). An entry's key hashes
what determines the output: the kind of output, the backend and model id/revision, the prompt, and
the content of the image (or text). Each write is one transaction (atomic); each value carries a
sha256 checked on read, so a corrupt entry is detected, dropped and recomputed. A corrupt database
file is moved aside and rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm


def cache_root() -> Path:
    return Path(os.environ.get("FL_CORE_CACHE", Path.home() / ".cache" / "fl_core"))


def image_digest(image: torch.Tensor) -> str:
    """sha256 of one uint8 image's shape and bytes."""
    array = np.ascontiguousarray(image.detach().cpu().numpy())
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def encode_value(value) -> bytes:
    """Captions (str) as UTF-8 JSON, tensors/arrays as ``.npy`` bytes."""
    if isinstance(value, str):
        return b"s" + json.dumps(value).encode()
    buffer = io.BytesIO()
    np.save(buffer, torch.as_tensor(value).detach().cpu().numpy(), allow_pickle=False)
    return b"a" + buffer.getvalue()


def decode_value(blob: bytes):
    if blob[:1] == b"s":
        return json.loads(blob[1:].decode())
    return torch.from_numpy(np.load(io.BytesIO(blob[1:]), allow_pickle=False))


@dataclass
class CacheStats:
    hits: int = 0
    computed: int = 0
    corrupt: int = 0

    @property
    def model_work(self) -> bool:
        return self.computed > 0


class TeacherCache:
    """Key-value store of teacher outputs; see the module docstring."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else cache_root() / "teachers.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        # No PRAGMA quick_check: it reads the whole file (seconds for a few hundred MB, on every
        # run). A damaged header or a truncated file fails here already; damage deeper in the file
        # fails the first read that touches it, and get_many recovers the same way.
        try:
            db = sqlite3.connect(self.path, timeout=60)
            db.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, value BLOB, checksum TEXT)")
            return db
        except sqlite3.DatabaseError as err:
            return self._start_afresh(err)

    def _start_afresh(self, err: Exception) -> sqlite3.Connection:
        aside = self.path.with_suffix(".corrupt")
        warnings.warn(f"teacher cache {self.path} is corrupt ({err}); moved to {aside}, starting afresh")
        os.replace(self.path, aside)
        return self._open()

    def get_many(self, keys: Sequence[str]) -> dict:
        """Verified values of the keys present; corrupt entries are deleted (and counted), a corrupt
        database file is set aside (and nothing found)."""
        try:
            return self._get_many(keys)
        except sqlite3.DatabaseError as err:
            self._db.close()
            self._db = self._start_afresh(err)
            return {}

    def _get_many(self, keys: Sequence[str]) -> dict:
        found = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            rows = self._db.execute(
                f"SELECT key, value, checksum FROM entries WHERE key IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            for key, blob, checksum in rows:
                try:
                    if hashlib.sha256(blob).hexdigest() != checksum:
                        raise ValueError("checksum mismatch")
                    found[key] = decode_value(blob)
                except Exception:  # any damage to an entry means: recompute it
                    self.stats.corrupt += 1
                    self._db.execute("DELETE FROM entries WHERE key = ?", (key,))
        self._db.commit()
        return found

    def put_many(self, items: dict) -> None:
        rows = []
        for key, value in items.items():
            blob = encode_value(value)
            rows.append((key, blob, hashlib.sha256(blob).hexdigest()))
        with self._db:  # one transaction: all or nothing
            self._db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", rows)

    def map(self, namespace: dict, digests: Sequence[str], compute: Callable[[list[int]], list], batch_size: int,
            desc: str = "teacher", progress: bool = True) -> list:
        """Outputs for items identified by ``digests``: cached ones read, the rest computed by
        ``compute(positions) -> outputs`` in batches and stored. ``namespace`` names the backend,
        model, revision, prompt and any other setting that changes the output."""
        prefix = json.dumps(namespace, sort_keys=True)
        keys = [hashlib.sha256(f"{prefix}|{d}".encode()).hexdigest() for d in digests]
        found = self.get_many(list(dict.fromkeys(keys)))
        missing: dict[str, int] = {}
        for pos, key in enumerate(keys):
            if key not in found and key not in missing:
                missing[key] = pos
        self.stats.hits += len(keys) - len(missing)
        todo = list(missing.items())
        with tqdm(total=len(todo), desc=desc, disable=not progress or not todo, leave=False) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                outputs = compute([pos for _, pos in batch])
                new = {key: out for (key, _), out in zip(batch, outputs)}
                self.put_many(new)
                found.update(new)
                self.stats.computed += len(batch)
                bar.update(len(batch))
        return [found[key] for key in keys]

    def close(self) -> None:
        self._db.close()
