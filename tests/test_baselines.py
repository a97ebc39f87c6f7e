import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fl_core.data import ImagePipeline, ImageSplit
from fl_core.data.augment import dsa_augment
from fl_core.experiment import run_experiment
from fl_core.fl import SGDSettings, local_sgd
from fl_core.methods.clip2fl import kd_loss
from fl_core.methods.creff import classifier_gradients, match_distance, retrain_classifier, text_contrastive_loss

from conftest import TINY_BASELINE


def test_classifier_gradients_equal_autograd_per_group():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    groups = torch.tensor([0] * 5 + [1] * 7)
    lin = nn.Linear(5, 3)
    gw, gb = classifier_gradients(feats, labels, lin.weight, lin.bias, groups, 2)
    for k in range(2):
        loss = F.cross_entropy(lin(feats[groups == k]), labels[groups == k])
        aw, ab = torch.autograd.grad(loss, [lin.weight, lin.bias])
        assert torch.allclose(gw[k], aw, atol=1e-6) and torch.allclose(gb[k], ab, atol=1e-6)


def test_match_distance_is_creffs_layerwise_cosine():
    g = torch.Generator().manual_seed(1)
    a_w, b_w, a_b, b_b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, generator=g), torch.randn(3, generator=g)

    def distance_wb(gwr, gws):  # their distance_wb for a linear weight (2-d) and a bias (1-d)
        if gwr.dim() == 1:
            gwr, gws = gwr.reshape(1, -1), gws.reshape(1, -1)
        return torch.sum(1 - torch.sum(gwr * gws, dim=-1) / (torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1) + 0.000001))

    expected = distance_wb(b_w, a_w) + distance_wb(b_b, a_b)
    assert torch.allclose(match_distance(a_w[None], a_b[None], b_w[None], b_b[None])[0], expected)


def test_matching_features_recover_a_known_classifier_gradient():
    g = torch.Generator().manual_seed(2)
    c, k, d = 3, 20, 6
    weight, bias = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    labels = torch.arange(c).repeat_interleave(k)
    groups = labels.clone()
    hidden = torch.randn(c * k, d, generator=g) + 2 * torch.eye(c, d)[labels]  # features behind the "real" gradients
    real_w, real_b = classifier_gradients(hidden, labels, weight, bias, groups, c)
    syn = torch.randn(c * k, d, generator=g).requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=0.1)
    start = match_distance(*classifier_gradients(syn, labels, weight, bias, groups, c), real_w, real_b).sum().item()
    for _ in range(300):
        loss = match_distance(*classifier_gradients(syn, labels, weight, bias, groups, c), real_w, real_b).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * start


def test_retraining_equals_linear_cross_entropy_sgd():
    g = torch.Generator().manual_seed(3)
    feats, labels = torch.randn(70, 8, generator=g), torch.arange(70) % 4
    lin = nn.Linear(8, 4)
    w, b = retrain_classifier(feats, labels, lin.weight.detach(), lin.bias.detach(), torch.Generator().manual_seed(9),
                              epochs=3, lr=0.05, batch_size=32)
    opt, order_gen = torch.optim.SGD(lin.parameters(), lr=0.05), torch.Generator().manual_seed(9)
    for _ in range(3):
        order = torch.randperm(70, generator=order_gen)
        for s in range(0, 70, 32):
            idx = order[s : s + 32]
            loss = F.cross_entropy(lin(feats[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.allclose(w, lin.weight, atol=1e-5) and torch.allclose(b, lin.bias, atol=1e-5)


def test_text_contrastive_loss_equals_clip2fls_supcon_text():
    def supcon_text(features, labels, text_features, temperature):  # their SupConLoss_text, transcribed
        n = features.shape[0]
        labels = labels.view(-1, 1)
        mask = torch.eq(labels, labels.T).float()
        logits = features @ text_features.T / temperature
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()
        logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(n).view(-1, 1), 0)
        mask = mask * logits_mask
        single = (mask.sum(1) == 0).float()
        log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
        loss = -((mask * log_prob).sum(1) / (mask.sum(1) + single)) * (1 - single)
        return loss.sum() / (loss.shape[0] - single.sum())

    g = torch.Generator().manual_seed(4)
    feats = torch.randn(60, 7, generator=g, dtype=torch.float64, requires_grad=True)
    text = F.normalize(torch.randn(5, 7, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(5).repeat_interleave(12)
    labels[0] = 4  # class 0 keeps 11 features, class 4 gets 13
    ours, theirs = text_contrastive_loss(feats, labels, text, 0.1), supcon_text(feats, labels, text[labels], 0.1)
    assert torch.allclose(ours, theirs)
    assert torch.allclose(torch.autograd.grad(ours, feats)[0], torch.autograd.grad(theirs, feats)[0])


def test_dsa_is_siamese_within_a_group_and_seeded():
    x = torch.randn(8, 3, 16, 16)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    flipped = dsa_augment(x, groups, torch.Generator().manual_seed(0), families=("flip",))
    for members in (range(4), range(4, 8)):
        same = [torch.equal(flipped[i], x[i]) for i in members]
        assert all(same) or not any(same)  # one decision per group
    for family in ("color", "crop", "cutout", "scale", "rotate"):
        out = dsa_augment(x, groups, torch.Generator().manual_seed(1), families=(family,))
        assert out.shape == x.shape and not torch.equal(out, x)
        assert torch.equal(out, dsa_augment(x, groups, torch.Generator().manual_seed(1), families=(family,)))


def test_kd_loss_is_batchmean_kl_times_t_squared():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    p, q = F.softmax(t / 3, 1), F.log_softmax(s / 3, 1)
    assert torch.allclose(kd_loss(s, t, 3.0), (p * (p.log() - q)).sum(1).mean() * 9)


def test_teacher_logits_once_per_image_give_the_same_losses_as_per_batch():
    """CLIP2FL's teacher sees the un-augmented image: computing its logits once per image and
    indexing them gives exactly the losses of running it on every batch."""
    from fl_core.models import ResNet8

    g = torch.Generator().manual_seed(6)
    data = ImageSplit(torch.randint(0, 256, (40, 1, 12, 12), dtype=torch.uint8, generator=g), torch.arange(40) % 4)
    pipe = ImagePipeline((0.5,), (0.5,), crop_padding=2)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    calls = {"n": 0}

    def teacher_logits(images):
        calls["n"] += 1
        with torch.no_grad():
            return 10 * teacher(pipe.normalize(images))

    losses = {}
    for mode in ("once", "per batch"):
        torch.manual_seed(0)
        model = ResNet8(4, 1, 0.125)
        cached = teacher_logits(data.images) if mode == "once" else None
        recorded = []

        def extra(logits, idx, cached=cached):
            t = cached[idx] if cached is not None else teacher_logits(data.images[idx])
            loss = kd_loss(logits, t, 3.0)
            recorded.append(loss.item())
            return loss

        local_sgd(model, data, pipe, torch.Generator().manual_seed(1), SGDSettings(epochs=2, batch_size=16, lr=0.1),
                  extra_loss=extra)
        losses[mode] = recorded
    assert losses["once"] == losses["per batch"]


@pytest.mark.slow
def test_creff_and_clip2fl_runs_record_extra_upload_and_compute(tiny_config, teacher_cache):
    def cfg(method):
        return tiny_config({**TINY_BASELINE, "method.name": method})

    fedavg = run_experiment(tiny_config(), progress=False)
    creff = run_experiment(cfg("creff"), progress=False)
    clip2fl = run_experiment(cfg("clip2fl"), progress=False)
    assert creff["arch"] == "resnet8" and clip2fl["arch"] == "resnet8_clip2fl"
    assert all("feature_match_loss" in e for e in creff["rounds"] + clip2fl["rounds"])
    assert [e["clients"] for e in creff["rounds"]] == [e["clients"] for e in fedavg["rounds"]]
    # CReFF clients upload per-class classifier gradients on top of the model, and compute them
    grads_bytes = creff["cost"]["upload_bytes_per_client_per_round"] - fedavg["cost"]["upload_bytes_per_client_per_round"]
    assert 0 < grads_bytes <= 10 * (10 * 32 + 10) * 4
    assert creff["cost"]["client_flops_per_round"] > fedavg["cost"]["client_flops_per_round"]
    # CLIP2FL's clients also run the teacher once per image: more compute than CReFF's
    assert clip2fl["cost"]["client_flops_per_round"] > creff["cost"]["client_flops_per_round"]
    assert clip2fl["method"]["clip_role"].startswith("offline encoder")


def test_clip2fl_with_a_real_clip_needs_no_mllm(tiny_config, monkeypatch):
    """CLIP2FL uses only the CLIP-role encoder: with open_clip nothing annotates the pool (no MLLM work)."""
    from fl_core.data.federated import build_federated_data
    from fl_core.teachers import OpenCLIPEncoder
    from fl_core.teachers import server

    def no_mllm(*args, **kwargs):
        raise AssertionError("CLIP2FL built the MLLM context")

    monkeypatch.setattr(server, "build_server_context", no_mllm)
    cfg = tiny_config(method__name="clip2fl", teacher__clip="open_clip", teacher__clip_pretrained="")
    encoder = server.build_clip_encoder(cfg, build_federated_data(cfg, torch.device("cpu")), "cpu", progress=False)
    assert isinstance(encoder, OpenCLIPEncoder) and not encoder.needs_fit


def test_clip2fl_prompts_its_teacher_as_its_public_code(tiny_config, teacher_cache, monkeypatch):
    """CLIP2FL's code embeds "a photo of a {c}" (no full stop) with the dataset's own class names, for
    the clients' teacher logits and the server's contrastive loss alike."""
    from types import SimpleNamespace

    from fl_core.data.federated import build_federated_data
    from fl_core.methods import make_method
    from fl_core.teachers.encoders import ImageTextEncoder

    prompts = []
    embed = ImageTextEncoder.class_embeddings

    def recorded(self, class_names, templates=None):
        prompts.append([t.format(name) for name in class_names for t in templates])
        return embed(self, class_names, templates)

    monkeypatch.setattr(ImageTextEncoder, "class_embeddings", recorded)
    cfg = tiny_config(TINY_BASELINE, method__name="clip2fl")
    fed = build_federated_data(cfg, torch.device("cpu"))
    clip2fl = make_method(cfg)
    engine = SimpleNamespace(data=fed, device=torch.device("cpu"), progress=False)
    clip2fl.teacher_logits(engine, 0)
    clip2fl.text_embeddings(engine)
    assert prompts == [[f"a photo of a {name}" for name in fed.dataset.class_names]] * 2
