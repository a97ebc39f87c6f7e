import re
import sqlite3
import time

import numpy as np
import pytest
import torch

from fl_core.config import make_config
from fl_core.data import load_dataset
from fl_core.data.webpool import WebPool, load_web_pool
from fl_core.teachers import (HFMultimodalLLM, OfflineCLIP, OpenCLIPEncoder, SimulatedMLLM, TeacherCache,
                              TeacherUnavailableError, annotate_pool, text_embedding_dim)
from fl_core.teachers.cache import image_digest
from tiny_teachers import save_tiny_llava


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_CORE_CACHE", str(tmp_path / "cache"))
    return TeacherCache()


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(make_config("smoke").data)


@pytest.fixture(scope="module")
def pool(mnist):
    return load_web_pool("heldout", mnist, limit=3000)


# ---- cache -------------------------------------------------------------------------------------

def test_cache_computes_once_and_keys_on_namespace(cache):
    calls = []

    def compute(pos):
        calls.append(list(pos))
        return [f"caption {p}" if p % 2 else torch.full((3,), float(p)) for p in pos]

    digests = ["a", "b", "c", "a"]
    first = cache.map({"kind": "x", "prompt": "p"}, digests, compute, batch_size=2, progress=False)
    assert calls == [[0, 1], [2]]  # the repeated digest is computed once
    assert first[3] is first[0] or torch.equal(first[3], first[0])
    again = cache.map({"kind": "x", "prompt": "p"}, digests, compute, batch_size=2, progress=False)
    assert len(calls) == 2 and again[1] == "caption 1" and torch.equal(again[2], torch.full((3,), 2.0))
    cache.map({"kind": "x", "prompt": "other"}, ["a"], compute, batch_size=2, progress=False)
    assert len(calls) == 3
    assert cache.path.parent.name == "cache"  # FL_CORE_CACHE decides where


def test_corrupt_entry_is_detected_and_recomputed(cache):
    cache.map({"k": 1}, ["a", "b"], lambda pos: [torch.ones(4) * p for p in pos], 8, progress=False)
    with sqlite3.connect(cache.path) as db:
        key, blob = db.execute("SELECT key, value FROM entries LIMIT 1").fetchone()
        db.execute("UPDATE entries SET value = ? WHERE key = ?", (blob[:-3] + b"xyz", key))
    fresh = TeacherCache(cache.path)
    out = fresh.map({"k": 1}, ["a", "b"], lambda pos: [torch.ones(4) * p for p in pos], 8, progress=False)
    assert fresh.stats.corrupt == 1 and fresh.stats.computed == 1
    assert torch.equal(out[0], torch.zeros(4)) and torch.equal(out[1], torch.ones(4))


def test_corrupt_database_file_is_set_aside(tmp_path):
    path = tmp_path / "teachers.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.warns(UserWarning, match="corrupt"):
        cache = TeacherCache(path)
    assert cache.map({}, ["a"], lambda pos: ["x"], 1, progress=False) == ["x"]
    assert path.with_suffix(".corrupt").exists()


def test_damage_past_the_header_is_found_on_read_and_set_aside(tmp_path):
    path = tmp_path / "teachers.sqlite"
    TeacherCache(path).map({}, [str(i) for i in range(200)], lambda pos: [torch.ones(64)] * len(pos), 50, progress=False)
    with open(path, "r+b") as f:  # keep page 1 (header + schema), overwrite every table page
        f.seek(4096)
        f.write(b"\xff" * (path.stat().st_size - 4096))
    cache = TeacherCache(path)  # opening reads only the header: fast, and it looks fine
    with pytest.warns(UserWarning, match="corrupt"):
        out = cache.map({}, ["0", "1"], lambda pos: [torch.zeros(64)] * len(pos), 8, progress=False)
    assert cache.stats.computed == 2 and torch.equal(out[0], torch.zeros(64))
    assert path.with_suffix(".corrupt").exists()


# ---- simulated MLLM ----------------------------------------------------------------------------

def test_simulated_mllm_hits_its_accuracy_with_consistent_answers(pool, mnist):
    truth = pool.hidden_labels("measure-annotation-accuracy")
    mllm = SimulatedMLLM(pool, mnist.class_names, accuracy=0.9, seed=7)
    q = mllm.class_distribution(pool.images, mnist.class_names)
    assert q.shape == (3000, 10) and torch.allclose(q.sum(1), torch.ones(3000))
    labels = q.argmax(1)
    assert abs(float((labels == truth).float().mean()) - 0.9) < 0.02
    captions = mllm.caption(pool.images[:200])
    named = [[n for n in mnist.class_names if re.search(rf"\b{n}\b", c)] for c in captions]
    assert named == [[mnist.class_names[int(l)]] for l in labels[:200]]  # each caption names its answer
    assert len(set(c.split(mnist.class_names[int(l)])[0] for c, l in zip(captions, labels[:200]))) >= 5  # varied templates
    again = SimulatedMLLM(pool, mnist.class_names, accuracy=0.9, seed=7)
    assert torch.equal(again.class_distribution(pool.images[:50], mnist.class_names), q[:50])
    other = SimulatedMLLM(pool, mnist.class_names, accuracy=0.9, seed=8).class_distribution(pool.images, mnist.class_names)
    assert not torch.equal(other.argmax(1), labels)


@pytest.mark.parametrize("accuracy", [1.0, 0.5])
def test_simulated_mllm_accuracy_setting(pool, mnist, accuracy):
    truth = pool.hidden_labels("measure-annotation-accuracy")
    labels = SimulatedMLLM(pool, mnist.class_names, accuracy, seed=1).class_distribution(pool.images, mnist.class_names).argmax(1)
    assert abs(float((labels == truth).float().mean()) - accuracy) < 0.03


def test_simulated_mllm_errors_follow_its_confusion_model(pool, mnist):
    truth = pool.hidden_labels("measure-annotation-accuracy")
    mllm = SimulatedMLLM(pool, mnist.class_names, accuracy=0.0, seed=3)
    labels = mllm.class_distribution(pool.images, mnist.class_names).argmax(1)
    assert (labels != truth).all()
    likely = torch.tensor(mllm.confusion.argmax(1))[truth]
    assert float((labels == likely).float().mean()) > 0.3  # far above the 1/9 of uniform errors


def test_simulated_mllm_only_knows_its_pool(pool, mnist):
    mllm = SimulatedMLLM(pool, mnist.class_names)
    with pytest.raises(ValueError, match="held-out pool"):
        mllm.caption(mnist.test.images[:1])
    with pytest.raises(PermissionError):
        pool.hidden_labels("training")


def test_annotation_measures_accuracy_and_reuses_the_cache(pool, mnist, cache):
    small = pool.head(300)
    mllm = SimulatedMLLM(small, mnist.class_names, 0.8, seed=0)
    ann = annotate_pool(small, mnist.class_names, mllm, cache, "Describe.", progress=False)
    assert ann.simulated and len(ann.captions) == 300 and ann.class_probs.shape == (300, 10)
    truth = small.hidden_labels("measure-annotation-accuracy")
    assert ann.accuracy == pytest.approx(float((ann.labels == truth).float().mean()))
    computed = cache.stats.computed
    again = annotate_pool(small, mnist.class_names, mllm, cache, "Describe.", progress=False)
    assert cache.stats.computed == computed and again.captions == ann.captions


def test_the_server_annotates_with_the_class_names_as_text(cache, monkeypatch):
    """Class names with underscores reach the MLLM (its options, its captions) with spaces."""
    import dataclasses

    from fl_core.data import build_federated_data
    from fl_core.teachers.server import annotated_pool

    cfg = make_config("smoke", {"data.web_pool_limit": 200})
    fed = build_federated_data(cfg)
    names = [f"digit_{name}" for name in fed.dataset.class_names]
    fed = dataclasses.replace(fed, dataset=dataclasses.replace(fed.dataset, class_names=names))
    _, annotation = annotated_pool(cfg, fed, cache, "cpu", progress=False)
    assert all(re.search(r"digit (zero|one|two|three|four|five|six|seven|eight|nine)\b", c) for c in annotation.captions)
    assert not any("_" in c for c in annotation.captions)


# ---- transformers MLLM (a tiny random LLaVA) ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


def test_hf_mllm_loads_captions_and_scores_options(tiny_llava_dir):
    mllm = HFMultimodalLLM.load(str(tiny_llava_dir), batch_size=2)  # AutoProcessor + AutoModelForImageTextToText
    assert mllm.tokenizer.padding_side == "left"
    images = torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    captions = mllm.caption(images, "Describe this image.")
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    names = ["cat", "dog", "ship", "truck"]
    q = mllm.class_distribution(images, names)
    assert q.shape == (3, 4) and torch.allclose(q.sum(1), torch.ones(3), atol=1e-5)
    # the distribution is the softmax of the next-token logits of the option letters, one forward pass
    inputs = mllm._inputs(images, [mllm.multiple_choice_prompt(names)] * 3)
    with torch.no_grad():
        last = mllm.model(**inputs).logits[:, -1, :]
    ids = mllm.option_token_ids(4)
    manual = torch.softmax(torch.stack([torch.logsumexp(last[:, i], 1) for i in ids], 1), 1)
    assert torch.allclose(q, manual, atol=1e-5)
    single = HFMultimodalLLM(mllm.model, mllm.processor, "tiny", batch_size=1).class_distribution(images, names)
    assert torch.allclose(single, q, atol=1e-4)  # batching and padding do not change answers
    grey = mllm.class_distribution(images[:, :1], names)
    assert grey.shape == (3, 4)


def test_hf_mllm_groups_more_than_26_classes(tiny_llava_dir):
    mllm = HFMultimodalLLM.load(str(tiny_llava_dir), batch_size=4)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    q = mllm.class_distribution(images, [f"class {i}" for i in range(30)])
    assert q.shape == (2, 30) and torch.allclose(q.sum(1), torch.ones(2), atol=1e-5)


def test_missing_mllm_weights_fail_fast_naming_the_model():
    start = time.monotonic()
    with pytest.raises(TeacherUnavailableError, match=r"llava-hf/llava-1.5-7b-hf.*teacher.mllm_model.*allow_download"):
        HFMultimodalLLM.load("llava-hf/llava-1.5-7b-hf")
    assert time.monotonic() - start < 10
    with pytest.raises(TeacherUnavailableError, match=r"the MLLM folder '/nowhere/llava' does not exist"):
        HFMultimodalLLM.load("/nowhere/llava")


# ---- CLIP-role encoders ------------------------------------------------------------------------

def test_open_clip_backend_with_random_weights(cache):
    clip = OpenCLIPEncoder(cache, "ViT-B-32", pretrained=None, batch_size=4, progress=False)
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    emb = clip.encode_image(images)
    assert emb.shape == (3, 512) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    text = clip.encode_text(["a photo of a cat", "a photo of a dog"])
    assert text.shape == (2, 512)
    logits = clip.zero_shot_logits(images, ["cat", "dog", "bird"])
    assert logits.shape == (3, 3)
    assert cache.stats.computed > 0
    computed = cache.stats.computed
    clip.encode_image(images)
    assert cache.stats.computed == computed


def test_open_clip_architecture_is_one_of_open_clips_or_a_config_of_your_own(tmp_path):
    from fl_core.teachers import open_clip_architecture
    from tiny_teachers import TINY_CLIP, TINY_CLIP_CONFIG, save_tiny_open_clip

    assert open_clip_architecture("ViT-B-32") == "ViT-B-32"
    config, _ = save_tiny_open_clip(tmp_path)
    assert open_clip_architecture(str(config)) == TINY_CLIP
    assert text_embedding_dim(make_config("paper-cifar10", {"teacher.clip_model": str(config)}).teacher) == \
        TINY_CLIP_CONFIG["embed_dim"]
    with pytest.raises(ValueError, match=r"teacher\.clip_model='ViT-Q-99' is not an open_clip model; .*config \.json"):
        open_clip_architecture("ViT-Q-99")
    with pytest.raises(ValueError, match=r"teacher\.clip_model='.*nope\.json' names a model config file that does not exist"):
        open_clip_architecture(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match=r"hf-hub:/local-dir: names are not taken; pass the path of the model's config"):
        open_clip_architecture("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")  # would read its config from the hub


def test_missing_open_clip_weights_fail_fast(cache):
    start = time.monotonic()
    with pytest.raises(TeacherUnavailableError, match="ViT-B-32.*openai.*teacher.clip_pretrained"):
        OpenCLIPEncoder(cache, "ViT-B-32", pretrained="openai")
    assert time.monotonic() - start < 10
    with pytest.raises(TeacherUnavailableError, match=r"checkpoint '/nowhere/clip\.pt': no such file"):
        OpenCLIPEncoder(cache, "ViT-B-32", pretrained="/nowhere/clip.pt")


def test_image_features_do_not_depend_on_what_the_cache_held(mnist, tmp_path, monkeypatch):
    """Images missing from the cache are computed in batches whose sizes depend on what was cached
    before (here a batch of 1, which rounds differently on CPU); features must not."""
    images = mnist.test.images[:9]
    features = {}
    for history in ("cold", "one image cached first"):
        monkeypatch.setenv("FL_CORE_CACHE", str(tmp_path / history))
        clip = OfflineCLIP(TeacherCache(), batch_size=8, progress=False)
        if history != "cold":
            clip.image_features(images[3:4])
        features[history] = clip.image_features(images)  # cold: batches of 8 and 1; else 8 (no 1)
    assert torch.equal(features["cold"], features["one image cached first"])


def test_offline_encoder_learns_zero_shot_from_the_captioned_pool(pool, mnist, cache):
    small = pool.head(1000)
    mllm = SimulatedMLLM(small, mnist.class_names, 0.9, seed=0)
    captions = mllm.caption(small.images)
    clip = OfflineCLIP(cache, image_size=64, align_steps=100, progress=False)
    with pytest.raises(RuntimeError, match="not fitted"):
        clip.encode_image(small.images[:2])
    info = clip.fit(small.images, captions, seed=0)
    assert info["cached"] is False and info["last_loss"] < info["first_loss"]
    acc = float((clip.zero_shot_logits(mnist.test.images[:500], mnist.class_names).argmax(1) == mnist.test.labels[:500]).float().mean())
    assert acc > 0.5  # chance is 0.1
    again = OfflineCLIP(cache, image_size=64, align_steps=100, progress=False)
    assert again.fit(small.images, captions, seed=0)["cached"] is True
    assert torch.allclose(again.encode_image(small.images[:5]), clip.encode_image(small.images[:5]))
