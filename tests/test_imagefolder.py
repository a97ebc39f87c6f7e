import os

import numpy as np
import pytest
import torch
from PIL import Image

from fl_core.config import make_config
from fl_core.data import load_dataset
from fl_core.data.datasets import channel_statistics
from fl_core.experiment import run_experiment

from conftest import TINY

CLASSES = ("cat", "dog", "fox")


def make_folder(root, train=(24, 12, 6), test=4, seed=0):
    """Class folders of small images of several sizes and formats, each class its own brightness."""
    rng = np.random.RandomState(seed)
    for split, counts in (("train", train), ("test", (test,) * len(CLASSES))):
        for c, (name, n) in enumerate(zip(CLASSES, counts)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = rng.randint(20, 48, 2)
                pixels = (rng.rand(h, w, 3) * 60 + 80 * c).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{('png', 'jpg')[i % 2]}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def folder_config(root, **overrides):
    return make_config("smoke", {**TINY, "data.dataset": "imagefolder", "data.root": str(root), "data.train_limit": 0,
                                 "data.test_limit": 0, "data.num_clients": 3, "fl.clients_per_round": 2, **overrides})


def test_imagefolder_reads_your_images_as_classes_named_by_their_folders(tmp_path):
    root = make_folder(tmp_path / "images")
    cfg = folder_config(root, **{"data.imbalance_factor": 1.0, "data.image_size": 16})
    ds = load_dataset(cfg.data)
    assert ds.class_names == list(CLASSES) and ds.channels == 3
    assert tuple(ds.train.images.shape) == (42, 3, 16, 16) and tuple(ds.test.images.shape) == (12, 3, 16, 16)
    assert np.bincount(ds.train.labels.numpy()).tolist() == [24, 12, 6]  # the text file is no image
    # normalized by the training images' own statistics; each class is brighter than the last
    pixels = ds.train.images.double() / 255
    assert ds.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist())
    means = [float(ds.test.images[ds.test.labels == c].double().mean()) for c in range(3)]
    assert means == sorted(means)
    assert ds.flip and ds.heldout is None
    # decoded once: a second load reads the cache and gives the same bytes
    again = load_dataset(cfg.data)
    assert (again.train.images == ds.train.images).all() and (again.test.labels == ds.test.labels).all()
    # the training images come with the classes mixed, so that a profile's train_limit takes from every class
    head = load_dataset(folder_config(root, **{"data.train_limit": 12}).data)
    assert set(head.train.labels.tolist()) == {0, 1, 2}


def test_channel_statistics_are_exact_in_chunks():
    images = torch.randint(0, 256, (37, 3, 5, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    mean, std = channel_statistics(images, chunk=8)
    pixels = images.double() / 255
    assert mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(pixels.std(dim=(0, 2, 3), correction=0).tolist(), abs=1e-12)


def test_imagefolder_fingerprint_follows_the_images(tmp_path):
    root = make_folder(tmp_path / "images")
    before = folder_config(root).fingerprint()
    assert folder_config(root).fingerprint() == before
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "train" / "dog" / "new.png")
    assert folder_config(root).fingerprint() != before  # a run on other images is another run


def test_imagefolder_imbalance_factor_one_keeps_your_own_tail(tmp_path):
    root = make_folder(tmp_path / "images")
    kept = run_experiment(folder_config(root, **{"data.imbalance_factor": 1.0, "data.web_pool": str(root / "test" / "fox")}),
                          tmp_path / "as-is", progress=False)
    assert kept["data"]["train_class_counts"] == [24, 12, 6]
    sampled = run_experiment(folder_config(root, **{"data.imbalance_factor": 4.0}), tmp_path / "tail", progress=False)
    assert sampled["data"]["train_class_counts"] == [14, 7, 3]  # 42 / 3 = 14 at the head, / 4 at the tail


@pytest.mark.slow
def test_mllm_fl_runs_on_your_images(tmp_path):
    root = make_folder(tmp_path / "images")
    record = run_experiment(folder_config(root, **{"method.name": "mllm_fl", "data.imbalance_factor": 4.0}),
                            tmp_path / "run", progress=False)
    assert record["status"] == "complete" and record["data"]["class_names"] == list(CLASSES)
    pool = record["method"]["teachers"]["pool"]
    assert pool == {"source": "imagefolder training images dropped by the long tail", "images": 42 - 24, "skipped": 0}


@pytest.mark.parametrize("breakage, message", [
    (lambda root: os.rename(root / "train", root / "training"), "is not a folder"),
    (lambda root: (root / "train" / "owl").mkdir(), "holds no images"),
    (lambda root: (root / "test" / "owl").mkdir() or Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(
        root / "test" / "owl" / "0.png"), "no training folder: owl"),
])
def test_imagefolder_says_what_is_wrong_with_the_folders(tmp_path, breakage, message):
    root = make_folder(tmp_path / "images")
    breakage(root)
    with pytest.raises(ValueError, match=message):
        load_dataset(folder_config(root).data)
