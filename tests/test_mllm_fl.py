import json
import math

import pytest
import torch
import torch.nn.functional as F

from fl_core.config import make_config
from fl_core.experiment import run_experiment
from fl_core.methods.align import align_model, alignment_loss, build_alignment_set
from fl_core.methods.mllm_fl import stage1_cache_path, stage1_fingerprint
from fl_core.methods.pretrain import dwd_loss, dwd_weight, fold_projection, multi_positive_info_nce
from fl_core.data import ImagePipeline
from fl_core.models import ResNet8

from conftest import MLLM_TINY, stable


def test_dwd_weight_hands_over_from_teacher_to_student():
    total = 101
    for schedule in ("cosine", "linear"):
        weights = [dwd_weight(k, total, 0.8, schedule) for k in range(total)]
        assert weights[0] == pytest.approx(0.8) and weights[-1] == pytest.approx(0.0, abs=1e-12)
        assert all(a >= b for a, b in zip(weights, weights[1:]))
    assert dwd_weight(50, total, 0.8, "cosine") == pytest.approx(0.4)
    assert dwd_weight(70, total, 0.3, "constant") == 0.3
    with pytest.raises(ValueError, match="cosine, linear, constant"):
        dwd_weight(0, 10, 1.0, "step")


def test_multi_positive_info_nce_reduces_to_info_nce_and_shares_duplicates():
    g = torch.Generator().manual_seed(0)
    z, t = F.normalize(torch.randn(6, 4, generator=g), dim=1), F.normalize(torch.randn(6, 4, generator=g), dim=1)
    logits = z @ t.T / 0.1
    plain = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert multi_positive_info_nce(z, t, torch.arange(6), 0.1) == pytest.approx(float(plain))
    # two images with one identical caption: either caption is a right answer for either image
    ids = torch.tensor([0, 0, 1])
    t2 = torch.stack([t[0], t[0], t[1]])
    soft = multi_positive_info_nce(z[:3], t2, ids, 0.1)
    targets = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
    l2 = z[:3] @ t2.T / 0.1
    assert soft == pytest.approx(float((F.cross_entropy(l2, targets) + F.cross_entropy(l2.T, targets)) / 2))


def test_dwd_loss_follows_its_definition():
    g = torch.Generator().manual_seed(1)
    s, v, t = (F.normalize(torch.randn(5, 8, generator=g), dim=1) for _ in range(3))
    ids = torch.arange(5)
    loss, parts = dwd_loss(s, v, t, ids, lam=0.3, temperature=0.07, gamma=2.0)
    z = F.normalize(0.3 * v + 0.7 * s, dim=1)
    expected = multi_positive_info_nce(z, t, ids, 0.07) + 2.0 * 0.3 * (1 - (s * v).sum(1)).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    teacher_only, _ = dwd_loss(s, v, t, ids, lam=1.0, temperature=0.07, gamma=0.0)
    assert float(teacher_only) == pytest.approx(float(multi_positive_info_nce(v, t, ids, 0.07)), rel=1e-5)
    no_dwd, parts = dwd_loss(s, None, t, ids, lam=0.0, temperature=0.07, gamma=1.0)
    assert float(no_dwd) == pytest.approx(float(multi_positive_info_nce(s, t, ids, 0.07)), rel=1e-5)
    assert float(parts["distill"]) == 0.0


def test_folding_projection_into_the_classifier_keeps_the_function():
    torch.manual_seed(0)
    student = ResNet8(5, 1, 0.125, projection_dim=12).eval()
    plain = ResNet8(5, 1, 0.125).eval()
    plain.load_state_dict(fold_projection(student.state_dict(), plain.state_dict()))
    x = torch.randn(4, 1, 16, 16)
    assert torch.allclose(student(x)[1], plain(x)[1], atol=1e-5)


def test_alignment_set_is_class_balanced_by_mllm_label():
    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 30)
    probs = F.one_hot(labels, 3).float() * 0.5 + 0.5 / 3
    probs[torch.arange(0, 50, 7), 0] = 0.99
    aset = build_alignment_set(labels, probs, 3, per_class=10, seed=0)
    assert aset.per_class == [10, 5, 10] and len(aset) == 25
    assert torch.equal(aset.labels, labels[aset.indices])
    again = build_alignment_set(labels, probs, 3, per_class=10, seed=0)
    assert (again.indices == aset.indices).all()
    confident = build_alignment_set(labels, probs, 3, per_class=8, seed=0, select="confident")
    assert set(confident.indices[:8].tolist()) == set(range(0, 50, 7))


def test_alignment_loss_is_ce_plus_beta_kl():
    g = torch.Generator().manual_seed(2)
    logits, q = torch.randn(4, 3, generator=g), torch.softmax(torch.randn(4, 3, generator=g), 1)
    y = q.argmax(1)
    p = torch.softmax(logits, 1)
    kl = (q * (q.log() - p.log())).sum(1).mean()
    expected = F.cross_entropy(logits, y) + 0.5 * kl
    assert float(alignment_loss(logits, y, q, 0.5)) == pytest.approx(float(expected), rel=1e-5)


def test_align_classifier_only_leaves_the_backbone_alone():
    torch.manual_seed(0)
    model = ResNet8(3, 1, 0.125)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (20, 1, 12, 12), dtype=torch.uint8)
    labels = torch.arange(20) % 3
    align_model(model, images, labels, F.one_hot(labels, 3).float(), ImagePipeline((0.5,), (0.5,)),
                torch.Generator().manual_seed(0), epochs=1, batch_size=8, lr=0.1, beta=1.0, params="classifier")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("classifier."))
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_stage1_fingerprint_ignores_the_federation():
    base = make_config("smoke", {"method.name": "mllm_fl"})
    assert stage1_fingerprint(base) == stage1_fingerprint(make_config("smoke", {"method.name": "mllm_fl", "fl.rounds": 9,
                                                                           "data.alpha": 0.1, "method.beta": 0.0}))
    assert stage1_fingerprint(base) != stage1_fingerprint(make_config("smoke", {"method.name": "mllm_fl", "method.dwd": False}))
    assert stage1_fingerprint(base) != stage1_fingerprint(make_config("smoke", {"method.name": "mllm_fl", "seed": 3}))
    # MNIST's pool is its validation split: the long tail of the training set does not change it
    assert stage1_fingerprint(base) == stage1_fingerprint(make_config("smoke", {"method.name": "mllm_fl",
                                                                           "data.imbalance_factor": 10}))
    assert stage1_fingerprint(base) != stage1_fingerprint(make_config("smoke", {"method.name": "mllm_fl", "cpu_threads": 2}))
    cifar = make_config("paper-cifar10", {"method.name": "mllm_fl"})
    # settings added later (cpu_threads, fl.precision) leave the paper profiles' earlier stage-1 key as it was
    assert stage1_fingerprint(cifar) == "36cce5d41044ed70"
    assert stage1_fingerprint(cifar) != stage1_fingerprint(make_config("paper-cifar10", {"method.name": "mllm_fl",
                                                                                    "data.imbalance_factor": 10}))


@pytest.mark.slow
def test_mllm_fl_runs_three_stages_records_them_and_costs_clients_what_fedavg_does(tiny_config, teacher_cache):
    record = run_experiment(tiny_config(MLLM_TINY), progress=False)
    method = record["method"]
    assert method["teachers"]["mllm"]["backend"] == "simulated"
    assert method["teachers"]["annotation_accuracy"] == pytest.approx(0.9, abs=0.06)
    stage1 = method["pretraining"]
    assert len(stage1["curves"]["loss"]) == 2 and stage1["curves"]["lambda"][0] > stage1["curves"]["lambda"][1]
    assert 0 <= stage1["zero_shot"]["top1"] <= 1 and stage1["cached"] is False
    assert method["alignment_set"]["per_class"] == [10] * 10 or sum(method["alignment_set"]["per_class"]) <= 100
    assert all("align_loss" in entry for entry in record["rounds"])
    fedavg = run_experiment(tiny_config(), progress=False)
    assert record["cost"] == fedavg["cost"]  # same model, same client work: bytes and FLOPs equal
    assert [e["clients"] for e in record["rounds"]] == [e["clients"] for e in fedavg["rounds"]]
    # stage 1 runs once per setting: a second federation with other rounds reuses it
    again = run_experiment(tiny_config(MLLM_TINY, fl__rounds=1), progress=False)
    assert again["method"]["pretraining"]["cached"] is True
    assert again["method"]["pretraining"]["zero_shot"] == stage1["zero_shot"]


@pytest.mark.slow
@pytest.mark.parametrize("switch", [{"method.stage1": False}, {"method.dwd": False}, {"method.align": False},
                                    {"method.align_rounds": "last", "method.align_params": "classifier"}])
def test_every_switch_runs(tiny_config, teacher_cache, switch):
    settings = {**MLLM_TINY, **switch}
    record = run_experiment(tiny_config(settings), progress=False)
    method = record["method"]
    assert ("pretraining" in method) == settings.get("method.stage1", True)
    aligned = [("align_loss" in e) for e in record["rounds"]]
    if not settings.get("method.align", True):
        assert not any(aligned)
    elif settings.get("method.align_rounds") == "last":
        assert aligned == [False, True]
    if "method.dwd" in switch:
        assert method["pretraining"]["curves"]["lambda"] == [0.0, 0.0]


@pytest.mark.slow
def test_a_damaged_stage1_or_encoder_fit_in_the_cache_is_computed_again(tiny_config, teacher_cache, tmp_path):
    cfg = tiny_config(MLLM_TINY, fl__rounds=1)
    first = run_experiment(cfg, tmp_path / "first", progress=False)
    damaged = [stage1_cache_path(cfg), *(teacher_cache / "projections").glob("*.pt")]
    assert len(damaged) == 2
    for path in damaged:  # cut short, as a copy that broke off
        path.write_bytes(path.read_bytes()[:500])
    with pytest.warns(UserWarning) as warned:
        again = run_experiment(cfg, tmp_path / "again", progress=False)
    messages = " ".join(str(w.message) for w in warned)
    for path, what in zip(damaged, ("a cached stage 1", "a cached encoder fit")):
        assert f"{path} cannot be read as {what}" in messages
    assert again["method"]["pretraining"]["cached"] is False
    assert stable(again) == stable(first)
