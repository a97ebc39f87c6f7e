"""Your own images in class folders (``data.dataset=imagefolder``): ``data.root/train/<class>/*``
and ``data.root/test/<class>/*``, torchvision's ``ImageFolder`` layout. What the folders hold is
read here without decoding an image (the config's validation needs the class and image counts), and
cached per process by the folders' modification times, which change when files are added, removed
or renamed."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_folder_classes(root: str, split: str) -> dict[str, list[str]]:
    """``{class: sorted image file names}`` of ``root/split/<class>/``, classes sorted by name;
    ``ValueError`` saying what to put where if the folder is missing, or a class has no images."""
    folder = Path(root).expanduser().resolve() / split
    return dict(_image_folder_classes(folder, _folder_state(folder)))


def image_folder_signature(root: str) -> str:
    """Hash of the image files under ``root/train`` and ``root/test`` (names, sizes, modification
    times): part of a run's fingerprint, so that runs on other images are never reused."""
    folders = [Path(root).expanduser().resolve() / split for split in ("train", "test")]
    return _image_folder_signature(tuple(folders), tuple(_folder_state(f) for f in folders))


def _folder_state(folder: Path) -> tuple:
    """The modification times of ``folder`` and its subfolders: they change when files are added,
    removed or renamed, so the caches below, keyed by them, see that within one process."""
    if not folder.is_dir():
        return ()
    return (folder.stat().st_mtime_ns, *((e.name, e.stat().st_mtime_ns) for e in os.scandir(folder) if e.is_dir()))


@functools.lru_cache(maxsize=8)
def _image_folder_signature(folders: tuple[Path, ...], states: tuple) -> str:
    digest = hashlib.sha256()
    for folder, state in zip(folders, states):
        for name, files in _image_folder_classes(folder, state):
            for file in files:
                stat = (folder / name / file).stat()
                digest.update(f"{folder.name}/{name}/{file}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _image_folder_classes(folder: Path, state: tuple) -> tuple:
    layout = (f"data.dataset=imagefolder reads data.root/train/<class>/*.png (and .jpg, ...) and "
              f"data.root/test/<class>/*; point data.root at that folder (--set data.root=PATH)")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder. {layout}")
    classes = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            files = sorted(f.name for f in entry.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f"class folder {entry} holds no images ({', '.join(IMAGE_EXTENSIONS)}). {layout}")
            classes.append((entry.name, files))
    if len(classes) < 2:
        raise ValueError(f"{folder} holds {len(classes)} class folder(s); a classifier needs at least 2. {layout}")
    return tuple(classes)
