"""The server's open image pool ("web data"), which no client ever sees.

Sources (``data.web_pool``):

- ``heldout``: a split of the dataset kept from every client: MNIST's 10k validation images, or for
  CIFAR the training images the long-tail sampling dropped. Its labels are *hidden*: only the
  simulated MLLM and the code that measures annotation accuracy may read them.
- a folder of images, with an optional ``captions.jsonl`` (``{"file": ..., "caption": ...}`` lines);
- a glob of WebDataset / img2dataset ``.tar`` shards (``.jpg``/``.png`` + ``.txt`` alt text + ``.json``).

Images are converted to the dataset's channel count and size, so the student can train on them.
An unreadable image or a corrupt shard is skipped and counted, never fatal.
"""

from __future__ import annotations

import glob
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fl_core.data.datasets import Dataset, DataNotFoundError
from fl_core.notices import warn_once

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"}
HIDDEN_LABEL_READERS = {"simulated-mllm", "measure-annotation-accuracy"}


@dataclass
class WebPool:
    images: torch.Tensor  # uint8 (N, C, H, W) in the dataset's format
    source: str
    alt_texts: list[str | None]
    skipped: int = 0  # unreadable images or shards left out
    _hidden_labels: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_hidden_labels(self) -> bool:
        return self._hidden_labels is not None

    def hidden_labels(self, reader: str) -> torch.Tensor:
        """The true labels of a held-out pool, for the simulated MLLM and for measuring annotation
        accuracy only (``reader`` names which); no method may train on them."""
        if reader not in HIDDEN_LABEL_READERS:
            raise PermissionError(f"hidden pool labels are for {sorted(HIDDEN_LABEL_READERS)} only, not {reader!r}")
        if self._hidden_labels is None:
            raise ValueError(f"the web pool from {self.source} has no labels to hide (it is not a held-out split)")
        return self._hidden_labels

    def head(self, n: int) -> "WebPool":
        """The first ``n`` images (all when ``n`` is 0)."""
        if not n or n >= len(self):
            return self
        labels = None if self._hidden_labels is None else self._hidden_labels[:n]
        return WebPool(self.images[:n], self.source, self.alt_texts[:n], self.skipped, labels)


def load_web_pool(spec: str, dataset: Dataset, kept_train_indices: np.ndarray | None = None, limit: int = 0) -> WebPool:
    """The pool named by ``spec`` (see the module docstring), at most ``limit`` images."""
    channels, size = dataset.train.images.shape[1], dataset.train.images.shape[-1]
    if spec == "heldout":
        pool = heldout_pool(dataset, kept_train_indices)
    elif Path(spec).expanduser().is_dir():
        pool = folder_pool(Path(spec).expanduser(), channels, size)
    elif glob.glob(str(Path(spec).expanduser())):
        pool = webdataset_pool(sorted(glob.glob(str(Path(spec).expanduser()))), channels, size)
    else:
        raise DataNotFoundError(
            f"data.web_pool={spec!r} is neither 'heldout', an existing folder of images, nor a glob matching "
            ".tar shards; e.g. --set data.web_pool=/data/web/{00000..00009}.tar is not expanded, use /data/web/*.tar"
        )
    if pool.skipped:
        warn_once(f"web pool {pool.source}: {pool.skipped} unreadable images or shards skipped")
    if len(pool) == 0:
        raise DataNotFoundError(f"the web pool from {pool.source} holds no readable image")
    return pool.head(limit)


def heldout_pool(dataset: Dataset, kept_train_indices: np.ndarray | None) -> WebPool:
    """MNIST's validation split, or the training images the long tail dropped (CIFAR)."""
    if dataset.heldout is not None:
        split = dataset.heldout
        source = f"{dataset.name} held-out validation split"
    else:
        if kept_train_indices is None:
            raise ValueError(f"{dataset.name} has no held-out split: pass the long-tail's kept indices")
        dropped = np.setdiff1d(np.arange(len(dataset.train)), kept_train_indices)
        if len(dropped) == 0:
            raise ValueError(f"the long tail kept every {dataset.name} training image: no held-out pool left; "
                             "use data.web_pool=PATH")
        split = dataset.train.subset(dropped)
        source = f"{dataset.name} training images dropped by the long tail"
    return WebPool(split.images.cpu(), source, [None] * len(split), 0, split.labels.cpu())


def _to_array(image, channels: int, size: int) -> np.ndarray:
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _stack(arrays: list[np.ndarray], channels: int, size: int) -> torch.Tensor:
    if not arrays:
        return torch.zeros((0, channels, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays))


def folder_pool(folder: Path, channels: int, size: int) -> WebPool:
    from PIL import Image

    captions = {}
    jsonl = folder / "captions.jsonl"
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                captions[entry["file"]] = entry.get("caption")
    arrays, texts, skipped = [], [], 0
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as im:
                arrays.append(_to_array(im, channels, size))
        except Exception:  # unreadable or truncated image: skip and count
            skipped += 1
            continue
        texts.append(captions.get(str(path.relative_to(folder))))
    return WebPool(_stack(arrays, channels, size), f"image folder {folder}", texts, skipped)


def webdataset_pool(shards: list[str], channels: int, size: int) -> WebPool:
    import webdataset as wds
    from PIL import Image

    failures = []

    def count_and_continue(exn):
        failures.append(repr(exn))
        return True

    arrays, texts = [], []
    for shard in shards:  # one pipeline per shard: a broken shard costs only itself
        samples = wds.WebDataset(shard, shardshuffle=False, handler=count_and_continue, empty_check=False)
        for sample in samples:
            key = next((k for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            if key is None:
                continue
            try:
                with Image.open(io.BytesIO(sample[key])) as im:
                    arrays.append(_to_array(im, channels, size))
            except Exception:
                failures.append(f"{sample.get('__key__')}: unreadable image")
                continue
            text = sample.get("txt")
            texts.append(text.decode("utf-8", "replace").strip() if text is not None else None)
    return WebPool(_stack(arrays, channels, size), f"{len(shards)} WebDataset shards", texts, len(failures))
