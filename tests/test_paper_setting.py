"""The paper setting's code path end to end, at toy scale: CIFAR in torchvision's python format (random
images; torchvision's checksums patched out), the transformers MLLM (a tiny random LLaVA) and the
open_clip CLIP role (a tiny random open_clip model), both loaded from local files as a user's
weights are. What a `paper-cifar10` run does on a GPU with LLaVA-1.5 and CLIP ViT-B/32, minus scale."""

import pickle

import numpy as np
import pytest
import torch

from fl_core.config import make_config
from fl_core.data import load_dataset
from fl_core.experiment import run_experiment
from fl_core.methods.clip2fl import CLIP2FL
from tiny_teachers import TINY_CLIP_CONFIG, save_tiny_llava, save_tiny_open_clip

# torchvision's python format: folder, training files, test file, meta file and its class-name key
CIFAR_FORMAT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], "test_batch", "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_label_names"),
}


def write_fake_cifar(root, name: str, train_per_class: int, test_per_class: int, seed: int = 0) -> dict:
    """Random images of every class in ``name``'s torchvision layout under ``root``; each class's red
    channel a little brighter than the one before. Returns the class names and what each split holds."""
    folder, train_files, test_file, meta_file, names_key = CIFAR_FORMAT[name]
    num_classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True, exist_ok=True)
    names = [f"class {c}" for c in range(num_classes)]
    written = {"class_names": names, "train": [], "test": []}

    def batch(per_class: int) -> dict:
        labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        data[:, :1024] = data[:, :1024] // 4 + (labels[:, None] * 190 // num_classes).astype(np.uint8)
        return {"data": data, label_key: labels.tolist()}

    for files, per_class, split in ((train_files, train_per_class, "train"), ([test_file], test_per_class, "test")):
        for file in files:
            entry = batch(per_class // len(files))
            (root / folder / file).write_bytes(pickle.dumps(entry))
            written[split].append(entry)
    (root / folder / meta_file).write_bytes(pickle.dumps({names_key: names}))
    return written


@pytest.fixture(autouse=True)
def no_cifar_checksums(monkeypatch):
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_in_torchvision_format_loads_images_labels_and_class_names(tmp_path, name):
    written = write_fake_cifar(tmp_path, name, train_per_class=5, test_per_class=2)
    ds = load_dataset(make_config("paper-cifar10", {"data.dataset": name, "data.root": str(tmp_path)}).data)
    assert ds.class_names == written["class_names"] and ds.heldout is None
    label_key = "labels" if name == "cifar10" else "fine_labels"
    for split, entries in (("train", written["train"]), ("test", written["test"])):
        images = np.concatenate([e["data"] for e in entries]).reshape(-1, 3, 32, 32)  # CIFAR's rows: R, G, B planes
        got = getattr(ds, split)
        assert got.images.dtype == torch.uint8
        assert np.array_equal(got.images.numpy(), images)
        assert got.labels.tolist() == [label for e in entries for label in e[label_key]]


SMALL_FEDERATION = {"fl.rounds": 2, "fl.local_epochs": 1, "data.num_clients": 4, "fl.clients_per_round": 2,
                    "data.imbalance_factor": 10.0, "model.width": 0.125, "data.test_limit": 50, "device": "cpu",
                    "cpu_threads": 1, "data.web_pool_limit": 30, "teacher.batch_size": 8, "method.stage1_epochs": 1,
                    "method.align_per_class": 2, "method.creff_num_features": 5, "method.creff_match_steps": 3,
                    "method.creff_retrain_epochs": 2}


@pytest.fixture(scope="module")
def paper_overrides(tmp_path_factory):
    """The paper-cifar10 profile pointed at fake CIFAR-10 and the tiny teachers' local files."""
    root = tmp_path_factory.mktemp("paper")
    write_fake_cifar(root / "data", "cifar10", train_per_class=40, test_per_class=5)
    clip_config, clip_weights = save_tiny_open_clip(root / "clip")
    return {**SMALL_FEDERATION, "data.root": str(root / "data"), "teacher.mllm_model": str(save_tiny_llava(root / "llava")),
            "teacher.clip_model": str(clip_config), "teacher.clip_pretrained": str(clip_weights)}


@pytest.mark.slow
def test_mllm_fl_in_the_paper_setting_runs_its_three_stages_with_the_real_backends(paper_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("FL_CORE_CACHE", str(tmp_path / "cache"))
    cfg = make_config("paper-cifar10", {**paper_overrides, "method.name": "mllm_fl"})
    assert (cfg.teacher.mllm, cfg.teacher.clip) == ("hf", "open_clip")
    record = run_experiment(cfg, tmp_path / "run", progress=False)
    assert record["status"] == "complete" and len(record["rounds"]) == 2 and record["arch"] == "resnet8"
    method = record["method"]
    teachers = method["teachers"]
    assert teachers["mllm"]["backend"] == "hf" and paper_overrides["teacher.mllm_model"] in teachers["mllm"]["model"]
    assert teachers["encoder"] == f"open_clip:{paper_overrides['teacher.clip_model']}:{paper_overrides['teacher.clip_pretrained']}"
    assert teachers["encoder_fit"] == {}  # CLIP is aligned already: rho is the identity
    # the pool: training images the long tail dropped, labels hidden from the methods but there to
    # measure the MLLM's annotation accuracy
    assert teachers["pool"] == {"source": "cifar10 training images dropped by the long tail", "images": 30, "skipped": 0}
    assert 0 <= teachers["annotation_accuracy"] <= 1
    stage1 = method["pretraining"]
    assert stage1["text_dim"] == TINY_CLIP_CONFIG["embed_dim"] and stage1["dwd"] and len(stage1["curves"]["loss"]) == 1
    assert np.isfinite(stage1["curves"]["loss"]).all() and 0 <= stage1["zero_shot"]["top1"] <= 1
    aligned = method["alignment_set"]
    assert 0 < aligned["size"] == sum(aligned["per_class"]) and max(aligned["per_class"]) <= 2
    assert all(np.isfinite(entry["train_loss"]) for entry in record["rounds"])


@pytest.mark.slow
def test_clip2fl_in_the_paper_setting_distils_from_open_clip(paper_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("FL_CORE_CACHE", str(tmp_path / "cache"))
    cfg = make_config("paper-cifar10", {**paper_overrides, "method.name": "clip2fl"})
    assert CLIP2FL.projection_dim(cfg) == TINY_CLIP_CONFIG["embed_dim"]  # the student's layer to CLIP's width
    record = run_experiment(cfg, tmp_path / "run", progress=False)
    assert record["status"] == "complete" and record["arch"] == "resnet8_clip2fl"
    assert record["method"]["clip_role"] == "open_clip"
    assert all(np.isfinite(entry["train_loss"]) and np.isfinite(entry["feature_match_loss"]) for entry in record["rounds"])
    assert 0 <= record["final"]["top1"] <= 1


@pytest.mark.slow
def test_mllm_fl_on_imagenet_lt_pretrains_and_federates_resnet50_with_a_web_pool_of_its_own(paper_overrides, tmp_path,
                                                                                            monkeypatch):
    from PIL import Image

    from test_data import make_fake_imagenet_lt

    monkeypatch.setenv("FL_CORE_CACHE", str(tmp_path / "cache"))
    make_fake_imagenet_lt(tmp_path / "imagenet", per_class_train=(12, 6, 3), per_class_test=2)
    web = tmp_path / "web"  # ImageNet-LT drops no image a pool could take: the server's web images
    web.mkdir()
    rng = np.random.default_rng(0)
    for k in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(web / f"{k}.jpg")
    teachers = {k: v for k, v in paper_overrides.items() if k.startswith("teacher.")}
    cfg = make_config("paper-imagenet", {**teachers, "method.name": "mllm_fl", "data.root": str(tmp_path / "imagenet"),
                                         "data.web_pool": str(web), "data.image_size": 16, "data.num_clients": 2,
                                         "fl.clients_per_round": 2, "fl.rounds": 2, "fl.local_epochs": 1,
                                         "fl.batch_size": 4, "device": "cpu", "cpu_threads": 1,
                                         "method.stage1_epochs": 1, "method.align_per_class": 2})
    record = run_experiment(cfg, tmp_path / "run", progress=False)
    assert record["status"] == "complete" and record["arch"] == "resnet50" and len(record["rounds"]) == 2
    teachers = record["method"]["teachers"]
    assert teachers["pool"]["images"] == 12 and teachers["annotation_accuracy"] is None  # no labels to measure against
    stage1 = record["method"]["pretraining"]
    assert stage1["text_dim"] == TINY_CLIP_CONFIG["embed_dim"] and 0 <= stage1["zero_shot"]["top1"] <= 1
    assert record["method"]["alignment_set"]["label_accuracy"] is None
