import io
import json
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fl_core.config import make_config
from fl_core.data import DataNotFoundError, ImageSplit, load_dataset
from fl_core.data.datasets import Dataset
from fl_core.data.webpool import load_web_pool


def jpeg_bytes(seed, size=(40, 30)):
    buffer = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def fake_dataset(channels=3, size=32, n=50):
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = ImageSplit(images, torch.arange(n) % 5)
    return Dataset("fake", [f"c{i}" for i in range(5)], split, split, None, (0.5,) * channels, (0.5,) * channels, 4, True)


def test_mnist_heldout_pool_hides_its_labels():
    ds = load_dataset(make_config("smoke").data)
    pool = load_web_pool("heldout", ds, limit=100)
    assert len(pool) == 100 and pool.images.shape[1:] == (1, 28, 28) and pool.has_hidden_labels
    assert torch.equal(pool.hidden_labels("simulated-mllm"), ds.heldout.labels[:100])
    with pytest.raises(PermissionError, match="hidden pool labels"):
        pool.hidden_labels("stage1")


def test_cifar_style_heldout_pool_is_what_the_long_tail_dropped():
    ds = fake_dataset()
    kept = np.array([0, 3, 7, 10])
    pool = load_web_pool("heldout", ds, kept_train_indices=kept)
    dropped = [i for i in range(50) if i not in kept]
    assert torch.equal(pool.images, ds.train.images[dropped])
    assert torch.equal(pool.hidden_labels("measure-annotation-accuracy"), ds.train.labels[dropped])


def test_folder_pool_reads_captions_and_skips_unreadable_images(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(0))
    (tmp_path / "sub" / "b.png").write_bytes(jpeg_bytes(1))  # wrong suffix is fine: PIL sniffs the format
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.jpg", "caption": "a red square"}) + "\n")
    with pytest.warns(UserWarning, match="1 unreadable"):
        pool = load_web_pool(str(tmp_path), fake_dataset(channels=1, size=28))
    assert pool.images.shape == (2, 1, 28, 28) and pool.skipped == 1
    assert pool.alt_texts == ["a red square", None] and not pool.has_hidden_labels


def test_unreadable_images_are_reported_once_per_process(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(0))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):  # catch_warnings in between resets Python's own once-per-location rule
            with warnings.catch_warnings():
                assert load_web_pool(str(tmp_path), fake_dataset(channels=1, size=28)).skipped == 1
    assert [str(w.message) for w in caught] == [f"web pool image folder {tmp_path}: 1 unreadable images or shards skipped"]
    assert caught[0].filename == __file__  # reported where the pool was asked for


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_survive_a_corrupt_shard_and_image(tmp_path):
    write_shard(tmp_path / "00000.tar", [
        ("000", {"jpg": jpeg_bytes(0), "txt": b"a dog on grass", "json": b'{"url": "x"}'}),
        ("001", {"jpg": jpeg_bytes(1), "txt": b"a cat"}),
        ("002", {"jpg": b"garbage bytes", "txt": b"broken"}),
    ])
    write_shard(tmp_path / "00001.tar", [("003", {"jpg": jpeg_bytes(3)})])
    good = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(good[:700])  # truncated inside its first image
    with pytest.warns(UserWarning, match="unreadable"):
        pool = load_web_pool(str(tmp_path / "*.tar"), fake_dataset())
    assert pool.images.shape[1:] == (3, 32, 32)
    assert pool.alt_texts == ["a dog on grass", "a cat", None] and len(pool) == 3
    assert pool.skipped >= 2  # the bad image and the truncated shard


def test_unknown_pool_spec_fails_clearly(tmp_path):
    with pytest.raises(DataNotFoundError, match="neither 'heldout', an existing folder"):
        load_web_pool(str(tmp_path / "nothing-*.tar"), fake_dataset())


@pytest.mark.slow
def test_annotate_cli_reports_accuracy_zero_shot_and_a_cached_second_run(tmp_path):
    env = {"FL_CORE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "fl_core", "annotate", "--profile", "smoke", "--no-progress",
                           "--set", "data.web_pool_limit=600"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "simulated MLLM" in done.stdout and "offline encoder" in done.stdout
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert abs(summary["annotation_accuracy"] - 0.9) < 0.04 and summary["zero_shot_top1"] > 0.3
    assert summary["cached"] is False and summary["second_cached"] is True
    assert summary["second_seconds"] < summary["seconds"]
