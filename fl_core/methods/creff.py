"""CReFF (Shang et al., IJCAI 2022): classifier re-training with federated features.

Each sampled client computes, with its backbone frozen (eval mode), the gradient of the current
re-trained classifier on each class it holds (10 repetitions of 32 DSA-augmented images per class)
and uploads them with its FedAvg model. The server averages the gradients per class, learns 100
federated features per class whose classifier gradients match them (layer-wise ``1 - cos``, 100
SGD steps, lr 0.1), and re-trains a fresh linear classifier on the features (300 epochs, lr 0.01,
batch 32). The re-trained classifier replaces the FedAvg one for evaluation only; the next round
starts from the FedAvg model, and clients compute gradients of the re-trained classifier.

The softmax-regression gradients are written out (``classifier_gradients``), which is exactly
what autograd gives for ``CrossEntropyLoss`` on a linear layer, and lets all classes be handled
in one batched pass (tested against autograd).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from fl_core.data.augment import DSA_FAMILIES, dsa_augment
from fl_core.fl.sampling import client_generator
from fl_core.methods.base import ClientResult, Method
from fl_core.metrics import tensor_bytes
from fl_core.models import inference_batch, inference_model

SERVER_STREAM = 2_000_003  # client-id slot of the server's generator


def classifier_gradients(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group ``g``: gradient of ``mean CE(features[g] @ W.T + b, labels[g])`` wrt ``(W, b)``.

    Returns ``(num_groups, C, d)`` and ``(num_groups, C)``; differentiable wrt ``features``.
    """
    probs = torch.softmax(features @ weight.T + bias, dim=1)
    residual = probs - F.one_hot(labels, weight.shape[0]).to(probs.dtype)  # dCE/dlogits per sample
    counts = torch.bincount(groups, minlength=num_groups).clamp(min=1).to(probs.dtype)
    residual = residual / counts[groups].unsqueeze(1)
    # each sample's residual in its group's block of columns, so every group's grad W is one product
    # (an outer product per sample plus index_add, forward and backward, was ~10x slower)
    blocks = F.one_hot(groups, num_groups).to(probs.dtype).unsqueeze(2) * residual.unsqueeze(1)  # (N, G, C)
    grad_w = (blocks.flatten(1).T @ features).view(num_groups, *weight.shape)
    grad_b = blocks.sum(0)
    return grad_w, grad_b


def match_distance(grad_w_syn, grad_b_syn, grad_w_real, grad_b_real) -> torch.Tensor:
    """CReFF's layer-wise distance, per group: ``sum over rows of W (1 - cos)`` plus ``1 - cos`` of
    the bias vector (with their 1e-6 in the denominator)."""
    def one_minus_cos(a, b):
        return 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)

    return one_minus_cos(grad_w_syn, grad_w_real).sum(-1) + one_minus_cos(grad_b_syn, grad_b_real)


def text_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """CLIP2FL's prototype-contrastive loss (their ``SupConLoss_text``): anchor ``i`` is scored
    against one text embedding per feature, ``text[labels[j]]`` for every ``j != i``; the ones of its
    own class are its positives.

    Every column ``j`` is one of the ``C`` class embeddings, so the ``N x N`` logits they build are
    ``N x C`` logits repeated by class count: computed that way, exactly, in ``O(N C)``.
    """
    logits = features @ text.T / temperature  # (N, C)
    counts = torch.bincount(labels, minlength=text.shape[0]).to(logits.dtype)
    present = counts > 0
    shift = logits.masked_fill(~present, float("-inf")).max(dim=1, keepdim=True).values.detach()
    own = logits.gather(1, labels.view(-1, 1)).squeeze(1) - shift.squeeze(1)
    denominator = ((logits - shift).exp() * counts).sum(1) - own.exp()  # all j != i
    has_positive = counts[labels] > 1
    log_prob = own - torch.log(denominator)
    return -(log_prob * has_positive).sum() / has_positive.sum().clamp(min=1)


def retrain_classifier(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       generator: torch.Generator, *, epochs: int, lr: float, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SGD on a linear classifier with mean cross-entropy, reshuffled each epoch, last batch kept:
    the updates of ``nn.Linear`` + ``CrossEntropyLoss`` + ``SGD``, written out (no autograd) because
    the 300 epochs of tiny steps per round are bound by per-operation overhead."""
    weight, bias = weight.clone(), bias.clone()
    onehot = F.one_hot(labels, weight.shape[0]).to(features.dtype)
    n = len(features)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(features.device)
        xs, ys = features[order], onehot[order]
        for start in range(0, n, batch_size):
            x, y = xs[start : start + batch_size], ys[start : start + batch_size]
            residual = torch.softmax(torch.addmm(bias, x, weight.T), dim=1).sub_(y)
            weight.sub_(residual.T @ x, alpha=lr / len(x))
            bias.sub_(residual.sum(0), alpha=lr / len(x))
    return weight, bias


class CReFF(Method):
    name = "creff"

    def __init__(self, cfg):
        self.cfg = cfg
        self.features: torch.Tensor | None = None  # (C * K, d) federated features
        self.classifier: tuple[torch.Tensor, torch.Tensor] | None = None  # the re-trained (W, b)
        self._gradients: list[dict] = []
        self._eval_model: nn.Module | None = None

    def setup(self, engine) -> None:
        m, c = self.cfg.method, engine.data.num_classes
        gen = client_generator(self.cfg.seed, 0, SERVER_STREAM)
        d = engine.model.feature_dim
        self.features = torch.randn(c * m.creff_num_features, d, generator=gen).to(engine.device)
        fresh = _fresh_linear(d, c, self.cfg.seed, 0)
        self.classifier = (fresh.weight.detach().to(engine.device), fresh.bias.detach().to(engine.device))

    def feature_labels(self, engine) -> torch.Tensor:
        k = self.cfg.method.creff_num_features
        return torch.arange(engine.data.num_classes, device=engine.device).repeat_interleave(k)

    # -- client ---------------------------------------------------------------------------------
    def client_update(self, engine, client_id: int, generator: torch.Generator) -> ClientResult:
        gradients = self.client_class_gradients(engine, inference_model(engine.model), client_id, generator)
        return self._with_gradients(super().client_update(engine, client_id, generator), *gradients)

    def train_together(self, engine, client_ids: list[int], generators: list[torch.Generator]) -> list[ClientResult]:
        # each client draws its class gradients' batches first, as it does alone
        backbone = inference_model(engine.model)
        gradients = [self.client_class_gradients(engine, backbone, k, g) for k, g in zip(client_ids, generators)]
        results = super().train_together(engine, client_ids, generators)
        return [self._with_gradients(result, *pair) for result, pair in zip(results, gradients)]

    @staticmethod
    def _with_gradients(result: ClientResult, grads: dict, flops: int) -> ClientResult:
        result.extras["class_gradients"] = grads
        result.upload_bytes += tensor_bytes([t for pair in grads.values() for t in pair])
        result.flops += flops
        return result

    @torch.no_grad()
    def client_class_gradients(self, engine, backbone: nn.Module, client_id: int,
                               generator: torch.Generator) -> tuple[dict, int]:
        """{class: (grad W, grad b)} of the re-trained classifier on the client's classes, averaged
        over repetitions; each repetition draws up to ``creff_grad_batch`` images per class and
        DSA-augments them (one family and one parameter draw per class). ``backbone``: the global
        model in its inference form (``inference_model``), which gives the features."""
        m, data = self.cfg.method, engine.data.clients[client_id]
        weight, bias = self.classifier
        classes = torch.unique(data.labels).tolist()
        families = DSA_FAMILIES if engine.data.pipeline.flip else tuple(f for f in DSA_FAMILIES if f != "flip")
        by_class = [(data.labels == c).nonzero().flatten() for c in classes]
        reps = m.creff_grad_reps
        # all repetitions in one batch: group r * len(classes) + g is class g's batch of repetition r
        picks = [idx[torch.randperm(len(idx), generator=generator)[: m.creff_grad_batch].to(idx.device)]
                 for _ in range(reps) for idx in by_class]
        groups = torch.cat([torch.full((len(p),), g, device=weight.device) for g, p in enumerate(picks)])
        idx = torch.cat(picks)
        x = dsa_augment(engine.data.pipeline.normalize(data.images[idx]), groups, generator, families)
        chunk = engine.cfg.fl.eval_batch_size  # a few thousand images: in chunks, 1.25x faster on CPU
        feats = torch.cat([backbone(inference_batch(x[i : i + chunk]))[0] for i in range(0, len(x), chunk)])
        gw, gb = classifier_gradients(feats, data.labels[idx], weight, bias, groups, len(picks))
        gw = gw.view(reps, len(classes), *weight.shape).mean(0)
        gb = gb.view(reps, len(classes), weight.shape[0]).mean(0)
        grads = {c: (gw[g], gb[g]) for g, c in enumerate(classes)}
        return grads, len(idx) * engine.forward_flops_per_image

    # -- server ---------------------------------------------------------------------------------
    def aggregate(self, engine, results: list[ClientResult]) -> None:
        self._gradients = [r.extras["class_gradients"] for r in results]
        super().aggregate(engine, results)

    def after_aggregation(self, engine, round_idx: int) -> dict:
        m = self.cfg.method
        gen = client_generator(self.cfg.seed, round_idx, SERVER_STREAM)
        match = self.learn_features(engine)
        fresh = _fresh_linear(self.features.shape[1], engine.data.num_classes, self.cfg.seed, round_idx)
        self.classifier = retrain_classifier(
            self.features.detach(), self.feature_labels(engine), fresh.weight.detach().to(engine.device),
            fresh.bias.detach().to(engine.device), gen, epochs=m.creff_retrain_epochs, lr=m.creff_retrain_lr,
            batch_size=m.creff_retrain_batch,
        )
        self._gradients = []
        return {"feature_match_loss": match}

    def feature_loss_extra(self, engine, features: torch.Tensor) -> torch.Tensor | None:
        """Extra term on the federated features (CLIP2FL's text-contrastive loss)."""
        return None

    def learn_features(self, engine) -> float:
        """Gradient matching: move the federated features so that the current classifier's
        gradients on them match the clients' averaged per-class gradients."""
        m, c = self.cfg.method, engine.data.num_classes
        real = {}
        for grads in self._gradients:
            for cls, pair in grads.items():
                real.setdefault(cls, []).append(pair)
        present = sorted(real)
        real_w = torch.stack([torch.stack([w for w, _ in real[cls]]).mean(0) for cls in present])
        real_b = torch.stack([torch.stack([b for _, b in real[cls]]).mean(0) for cls in present])
        k = m.creff_num_features
        rows = torch.cat([torch.arange(cls * k, (cls + 1) * k) for cls in present]).to(engine.device)
        groups = torch.arange(len(present), device=engine.device).repeat_interleave(k)
        labels = torch.tensor(present, device=engine.device).repeat_interleave(k)
        weight, bias = self.classifier
        features = self.features.detach().requires_grad_(True)
        optimizer = torch.optim.SGD([features], lr=m.creff_feature_lr)
        loss_value = 0.0
        everyone = len(present) == c  # then skip the gather (its backward is a scatter every step)
        for _ in range(m.creff_match_steps):
            syn_w, syn_b = classifier_gradients(features if everyone else features[rows], labels, weight, bias, groups,
                                                len(present))
            loss = match_distance(syn_w, syn_b, real_w, real_b).sum()
            extra = self.feature_loss_extra(engine, features)
            if extra is not None:
                loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = loss.detach()
        self.features = features.detach()
        return float(loss_value)

    def evaluation_model(self, engine) -> nn.Module:
        """The FedAvg model with the re-trained classifier."""
        if self._eval_model is None:
            self._eval_model = copy.deepcopy(engine.model)
        self._eval_model.load_state_dict(engine.model.state_dict())
        with torch.no_grad():
            self._eval_model.classifier.weight.copy_(self.classifier[0])
            self._eval_model.classifier.bias.copy_(self.classifier[1])
        return self._eval_model

    def client_broadcast(self) -> dict[str, torch.Tensor]:
        return {"weight": self.classifier[0], "bias": self.classifier[1]}  # clients take gradients of it

    def receive_broadcast(self, state: dict[str, torch.Tensor]) -> None:
        self.classifier = (state["weight"], state["bias"])

    def pack_extras(self, extras: dict) -> dict[str, torch.Tensor]:
        grads = extras["class_gradients"]
        return {**{f"weight.{c}": w for c, (w, _) in grads.items()}, **{f"bias.{c}": b for c, (_, b) in grads.items()}}

    def unpack_extras(self, tensors: dict[str, torch.Tensor]) -> dict:
        classes = sorted(int(key.split(".")[1]) for key in tensors if key.startswith("weight."))
        return {"class_gradients": {c: (tensors[f"weight.{c}"], tensors[f"bias.{c}"]) for c in classes}}

    def state_dict(self) -> dict:
        return {"features": self.features, "classifier": self.classifier}

    def load_state_dict(self, state: dict) -> None:
        self.features, self.classifier = state["features"], state["classifier"]

    def describe(self) -> dict:
        m = self.cfg.method
        keys = ("creff_num_features", "creff_match_steps", "creff_feature_lr", "creff_retrain_epochs",
                "creff_retrain_lr", "creff_grad_reps", "creff_grad_batch")
        return {"name": self.name, **{k: getattr(m, k) for k in keys}}


def _fresh_linear(d: int, c: int, seed: int, round_idx: int) -> nn.Linear:
    """A newly initialised ``nn.Linear(d, c)`` (PyTorch's default init), seeded by round."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + round_idx)
        return nn.Linear(d, c)
