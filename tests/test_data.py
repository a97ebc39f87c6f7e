import time

import numpy as np
import pytest
import torch

from fl_core.config import make_config
from fl_core.data import DataNotFoundError, ImagePipeline, ImageSplit, build_federated_data, load_dataset
from fl_core.data.datasets import Dataset
from fl_core.fl import plan_client_steps


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(make_config("offline", {"data.test_limit": 0}).data)


def test_mnist_is_the_real_thing(mnist):
    assert (len(mnist.train), len(mnist.heldout), len(mnist.test)) == (50_000, 10_000, 10_000)
    assert mnist.train.images.dtype == torch.uint8 and mnist.train.images.shape[1:] == (1, 28, 28)
    assert np.bincount(mnist.train.labels.numpy()).tolist() == [4932, 5678, 4968, 5101, 4859, 4506, 4951, 5175, 4842, 4988]
    assert int(mnist.train.images.max()) == 255 and mnist.flip is False


def test_mnist_decoded_once_per_machine_reads_back_the_same_bytes(tmp_path, monkeypatch):
    from fl_core.data import datasets

    monkeypatch.setenv("FL_CORE_CACHE", str(tmp_path))
    datasets._mnist_splits.cache_clear()  # as in a fresh process
    decoded = datasets._mnist_splits()
    assert len(list((tmp_path / "datasets").glob("mnist-*.npz"))) == 1
    datasets._mnist_splits.cache_clear()
    loaded = datasets._mnist_splits()
    # a damaged copy (a copy of the cache cut short) is decoded again, with a warning naming it
    cached = next((tmp_path / "datasets").glob("mnist-*.npz"))
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    datasets._mnist_splits.cache_clear()
    with pytest.warns(UserWarning, match=f"{cached} cannot be read as decoded MNIST .*computing it again"):
        redecoded = datasets._mnist_splits()
    datasets._mnist_splits.cache_clear()
    for again in (loaded, redecoded, datasets._mnist_splits()):  # the last one from the rewritten cache
        for (images, labels), (images_again, labels_again) in zip(decoded, again):
            assert images_again.dtype == np.uint8 and labels_again.dtype == np.int64
            assert np.array_equal(images, images_again) and np.array_equal(labels, labels_again)
    datasets._mnist_splits.cache_clear()


def test_limits_take_the_head_of_train_and_a_stratified_test(mnist):
    ds = load_dataset(make_config("smoke", {"data.train_limit": 1234, "data.test_limit": 105}).data)
    assert torch.equal(ds.train.labels, mnist.train.labels[:1234])
    assert np.bincount(ds.test.labels.numpy()).tolist() == [11] * 5 + [10] * 5


def test_federated_data_matches_the_partition():
    cfg = make_config("smoke")
    fed = build_federated_data(cfg)
    assert len(fed.clients) == cfg.data.num_clients
    counts = fed.client_class_counts
    for k, client in enumerate(fed.clients):
        assert np.bincount(client.labels.numpy(), minlength=10).tolist() == counts[k].tolist()
    assert fed.train_class_counts.tolist() == counts.sum(0).tolist()
    assert fed.train_class_counts[0] > 50 * fed.train_class_counts[-1]
    summary = fed.summary()
    assert set(summary["groups"]) == {"many", "medium", "few", "head", "middle", "tail"}


@pytest.mark.parametrize("dataset, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_cifar_fails_fast_saying_where_and_how(tmp_path, dataset, folder):
    cfg = make_config("paper-cifar10", {"data.dataset": dataset, "data.root": str(tmp_path)})
    start = time.monotonic()
    with pytest.raises(DataNotFoundError) as err:
        load_dataset(cfg.data)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert str(tmp_path) in message and folder in message and "data.download=true" in message


def test_missing_imagenet_lt_lists(tmp_path):
    cfg = make_config("paper-imagenet", {"data.root": str(tmp_path)})
    with pytest.raises(DataNotFoundError, match="ImageNet_LT_train.txt.*data.root"):
        load_dataset(cfg.data)


def make_fake_imagenet_lt(root, per_class_train=(3, 1), per_class_test=2):
    from PIL import Image

    rng = np.random.RandomState(0)
    lines = {"train": [], "test": []}
    for split, per_class in (("train", per_class_train), ("test", (per_class_test,) * 2)):
        for c, n in enumerate(per_class):
            for i in range(n):
                rel = f"{split}/n{c:08d}/img_{i}.JPEG"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.randint(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)).save(root / rel)
                lines[split].append(f"{rel} {c}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "ImageNet_LT_test.txt").write_text("\n".join(lines["test"]) + "\n")


def test_imagenet_lt_reads_the_lists_decodes_and_caches(tmp_path):
    make_fake_imagenet_lt(tmp_path)
    cfg = make_config("paper-imagenet", {"data.root": str(tmp_path), "data.image_size": 16})
    ds = load_dataset(cfg.data)
    assert ds.train.images.shape == (4, 3, 16, 16) and ds.train.labels.tolist() == [0, 0, 0, 1]
    assert len(ds.test) == 4 and len(ds.class_names) == 1000
    assert list(tmp_path.glob(".ImageNet_LT_train_16px_*.npy"))
    (tmp_path / "train/n00000000/img_0.JPEG").unlink()  # a second load needs only the cache
    assert torch.equal(load_dataset(cfg.data).train.images, ds.train.images)


def test_imagenet_lt_missing_images_are_named(tmp_path):
    make_fake_imagenet_lt(tmp_path)
    (tmp_path / "test/n00000001/img_1.JPEG").unlink()
    cfg = make_config("paper-imagenet", {"data.root": str(tmp_path), "data.image_size": 16})
    with pytest.raises(DataNotFoundError, match="1 images named in .*ImageNet_LT_test.txt are missing.*img_1"):
        load_dataset(cfg.data)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    pipe = ImagePipeline(mean=(0.0,), std=(1.0,), crop_padding=2)
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    draws = pipe.draw(torch.Generator().manual_seed(0), 2)
    out = pipe.augment(x, draws)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n in range(2):
        i, j = int(draws[n, 0]), int(draws[n, 1])
        assert torch.equal(out[n], padded[n, :, i : i + 5, j : j + 6])
    assert torch.equal(draws, pipe.draw(torch.Generator().manual_seed(0), 2))


def test_per_batch_augmentation_crops_and_flips_a_whole_batch_alike():
    """data.augment_per=batch: one crop offset and flip per batch, as torchvision's RandomCrop and
    RandomHorizontalFlip do on a batch tensor (CReFF's and CLIP2FL's code); per image by default."""
    pipe = ImagePipeline(mean=(0.0,), std=(1.0,), crop_padding=4, flip=True, per_batch=True)
    x = torch.arange(6 * 1 * 8 * 8, dtype=torch.float32).view(6, 1, 8, 8)
    draws = pipe.draw(torch.Generator().manual_seed(3), 6)
    assert draws.shape == (6, 3) and (draws == draws[0]).all()
    i, j, flip = (int(v) for v in draws[0])
    window = torch.nn.functional.pad(x, (4, 4, 4, 4))[:, :, i : i + 8, j : j + 8]
    assert torch.equal(pipe.augment(x, draws), window.flip(-1) if flip else window)
    plan = plan_client_steps(20, pipe, torch.Generator().manual_seed(0), epochs=3, batch_size=6, device="cpu")
    batches = [plan.take(step)[1] for step in range(len(plan.bounds))]
    assert all((d == d[0]).all() for d in batches)
    assert len({tuple(d[0].tolist()) for d in batches}) > 1  # a new draw every batch
    per_image = ImagePipeline(mean=(0.0,), std=(1.0,), crop_padding=4, flip=True)
    assert not (per_image.draw(torch.Generator().manual_seed(3), 6) == draws[0]).all()
    assert build_federated_data(make_config("smoke", {"data.augment_per": "batch"})).pipeline.per_batch
    assert not build_federated_data(make_config("smoke")).pipeline.per_batch


def test_random_flip_flips_about_half():
    pipe = ImagePipeline(mean=(0.0,), std=(1.0,), flip=True)
    x = torch.randn(400, 1, 4, 4)
    out = pipe.augment(x, pipe.draw(torch.Generator().manual_seed(0), 400))
    flipped = [torch.equal(o, i.flip(-1)) and not torch.equal(o, i) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and 150 < sum(flipped) < 250


def test_client_steps_drawn_ahead_are_the_steps_drawn_one_at_a_time():
    """Drawing a client's whole local training up front (one copy to the device) keeps the random
    stream of drawing each step when it comes: an epoch's permutation, then per batch its crop
    offsets and flips. This order is what makes earlier runs reproduce."""
    pipe = ImagePipeline(mean=(0.5,), std=(0.25,), crop_padding=2, flip=True)
    data = ImageSplit(torch.randint(0, 256, (37, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)),
                      torch.arange(37) % 5)
    plan = plan_client_steps(len(data), pipe, torch.Generator().manual_seed(9), epochs=2, batch_size=16, device="cpu")
    gen = torch.Generator().manual_seed(9)
    expected = []
    for _ in range(2):
        order = torch.randperm(37, generator=gen)
        expected += [(pipe.train_batch(data.images[order[s:s + 16]], gen), order[s:s + 16]) for s in range(0, 37, 16)]
    assert len(plan.bounds) == len(expected) == 6  # 16 + 16 + 5 per epoch: the short batch is kept
    for step, (x, idx) in enumerate(expected):
        got_x, got_y, got_idx = plan.batch(step, data, pipe)
        assert torch.equal(got_idx, idx) and torch.equal(got_x, x) and torch.equal(got_y, data.labels[idx])


def test_pipeline_normalizes_and_augments_only_with_a_generator():
    pipe = ImagePipeline(mean=(0.5,), std=(0.25,), crop_padding=2, flip=True)
    images = torch.full((4, 1, 8, 8), 255, dtype=torch.uint8)
    assert torch.allclose(pipe.normalize(images), torch.full((4, 1, 8, 8), 2.0))
    assert torch.equal(pipe.train_batch(images, None), pipe.normalize(images))
    augmented = pipe.train_batch(images, torch.Generator().manual_seed(1))
    # padding is zero after normalization (the mean colour), as when the peers crop normalized tensors
    assert (augmented == 0.0).any() and (augmented == 2.0).any()


def test_teachers_read_class_names_with_spaces_for_underscores():
    split = ImageSplit(torch.zeros((2, 3, 4, 4), dtype=torch.uint8), torch.tensor([0, 1]))
    ds = Dataset("cifar100", ["aquarium_fish", "maple_tree"], split, split, None, (0.5,) * 3, (0.5,) * 3, 0, True)
    assert ds.prompt_names == ["aquarium fish", "maple tree"] and ds.class_names == ["aquarium_fish", "maple_tree"]


def test_imagenet_lt_class_names_are_clips_unless_a_classnames_file_gives_them(tmp_path):
    make_fake_imagenet_lt(tmp_path)
    cfg = make_config("paper-imagenet", {"data.root": str(tmp_path), "data.image_size": 16})
    assert load_dataset(cfg.data).class_names[:3] == ["tench", "goldfish", "great white shark"]
    (tmp_path / "classnames.txt").write_text("".join(f"my class {c}\n" for c in range(1000)))
    assert load_dataset(cfg.data).class_names[999] == "my class 999"
    (tmp_path / "classnames.txt").write_text("tench\ngoldfish\n")
    with pytest.raises(ValueError, match=r"classnames\.txt names 2 classes; ImageNet-LT has 1000"):
        load_dataset(cfg.data)
