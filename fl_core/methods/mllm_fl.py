"""MLLM-FL (MLLM-LLaVA-FL, Zhang et al., WACV 2025) in three stages, as DESIGN.md section 4 reads it.

1. ``setup``: the server captions its web pool with the MLLM and pretrains the student on the
   image-text pairs with dynamic weighted distillation from the frozen image encoder
   (``fl_core.methods.pretrain``); the classifier starts as the class-prompt text embeddings.
   The pretrained weights are cached by the settings that determine them, so stage 1 runs once.
2. Rounds: plain FedAvg (or FedProx) clients; nothing else runs on a client.
3. ``after_aggregation``: the server fine-tunes the global model on a class-balanced set of web
   images labelled by the MLLM with ``CE(y, p) + beta * KL(q || p)`` (``fl_core.methods.align``);
   the aligned model is what the next round sends out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from fl_core.config import ExperimentConfig, data_content, dataset_facts, omitted_from_fingerprint
from fl_core.fl.sampling import client_generator
from fl_core.methods.align import AlignmentSet, align_model, build_alignment_set
from fl_core.methods.base import Method
from fl_core.methods.pretrain import fold_projection, pretrain_student, text_classifier
from fl_core.metrics import GROUP_NAMES
from fl_core.models import build_model, resolve_arch
from fl_core.results import computed_once, load_cached, save_torch

ALIGN_STREAM = 1_000_003  # client-id slot of the server's alignment generator (never a real client)
STAGE1_METHOD_KEYS = ("stage1_epochs", "stage1_batch_size", "stage1_lr", "dwd", "lambda0", "lambda_schedule",
                      "temperature", "gamma")
PARTITION_ONLY_KEYS = ("data.num_clients", "data.alpha", "data.partition", "data.min_client_size")
# the federated model's architecture with a linear layer ``pi`` before the classifier: stage 1's student
WITH_PROJECTION = {"resnet8": "resnet8_clip2fl", "resnet50": "resnet50"}


def stage1_cache_path(cfg: ExperimentConfig) -> Path | None:
    """Where a run of ``cfg`` finds or leaves its stage 1; ``None`` for runs without one."""
    from fl_core.teachers.cache import cache_root

    if cfg.method.name != "mllm_fl" or not cfg.method.stage1:
        return None
    return cache_root() / "stage1" / f"{stage1_fingerprint(cfg)}.pt"


def stage1_fingerprint(cfg: ExperimentConfig) -> str:
    """Hash of every setting stage 1 depends on (not the federation's)."""
    flat = cfg.flat()
    ignored = set(PARTITION_ONLY_KEYS)
    if cfg.data.web_pool == "heldout" and dataset_facts(cfg.data).heldout_split:
        ignored |= {"data.imbalance_factor", "data.train_limit"}  # the pool does not depend on the long tail
    keys = [k for k in flat if k.startswith(("data.", "model.", "teacher.")) and k not in ignored] + ["cpu_threads"]
    # settings added later, at the value earlier runs had, are left out: those runs keep their stage 1
    keys = [k for k in keys if not omitted_from_fingerprint(k, flat[k])]
    keys += ["seed", "device"] + [f"method.{k}" for k in STAGE1_METHOD_KEYS]
    settings = {**{k: flat[k] for k in keys}, **data_content(cfg.data)}
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stage1_student(cfg: ExperimentConfig, num_classes: int, channels: int, text_dim: int) -> nn.Module:
    """Stage 1's student ``W o pi o g``: the federated model's architecture (ResNet-8, or ResNet-50 on
    ImageNet-LT) with a projection ``pi`` to the text width, which ``fold_projection`` folds into the
    classifier afterwards; weights drawn from ``cfg.seed``."""
    arch = resolve_arch(cfg.model, cfg.data.dataset)
    if arch not in WITH_PROJECTION:
        raise ValueError(f"model.arch={arch!r} has no stage-1 student: MLLM-FL pretrains {', '.join(WITH_PROJECTION)}")
    model_cfg = dataclasses.replace(cfg.model, arch=WITH_PROJECTION[arch])
    return build_model(model_cfg, cfg.data.dataset, num_classes, channels, cfg.seed, projection_dim=text_dim)


class MLLMFL(Method):
    name = "mllm_fl"

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.prox_mu = cfg.method.prox_mu if cfg.method.stage2 == "fedprox" else 0.0
        self.info: dict = {}
        self._server = None
        self._align_set: AlignmentSet | None = None
        self._align_images: torch.Tensor | None = None

    # -- server context (teacher outputs are cached: rebuilding it on resume is cheap) ----------
    def server(self, engine):
        if self._server is None:
            from fl_core.teachers.server import build_server_context

            self._server = build_server_context(self.cfg, engine.data, engine.device, engine.progress)
        return self._server

    def setup(self, engine) -> None:
        server = self.server(engine)
        ann = server.annotation
        self.info["teachers"] = {
            "mllm": ann.mllm,
            "encoder": server.encoder.name,
            "encoder_fit": server.encoder_fit,
            "pool": {"source": server.pool.source, "images": len(server.pool), "skipped": server.pool.skipped},
            "annotation_accuracy": ann.accuracy,
        }
        if self.cfg.method.stage1:
            state, info = self.pretrained_state(engine, server)
            engine.model.load_state_dict(state)
            self.info["pretraining"] = info
            zero_shot = engine.evaluate(engine.model)
            self.info["pretraining"]["zero_shot"] = {k: zero_shot[k] for k in ("top1", *GROUP_NAMES, "per_class")}
        if self.cfg.method.align:
            self.alignment_set(engine)

    def pretrained_state(self, engine, server) -> tuple[dict, dict]:
        """Stage 1 (or its cached result): the folded state of the federated model and the curves."""
        path = stage1_cache_path(self.cfg)
        key = path.stem
        with computed_once(path):
            saved = load_cached(path, "a cached stage 1")
            if saved is not None:
                return saved["state"], {**saved["info"], "cached": True}
            return self.pretrain(engine, server, key, path)

    def pretrain(self, engine, server, key: str, path: Path) -> tuple[dict, dict]:
        """Run stage 1 and save its result under ``path``."""
        m = self.cfg.method
        ann, encoder, pool = server.annotation, server.encoder, server.pool
        captions = ann.captions
        caption_emb = encoder.encode_text(captions)
        unique = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        caption_ids = torch.tensor([unique[c] for c in captions])
        teacher_emb = encoder.encode_image(pool.images) if m.dwd else None
        images = pool.images.to(engine.device)
        data = engine.data
        student = stage1_student(self.cfg, data.num_classes, data.dataset.channels, caption_emb.shape[1]).to(engine.device)
        curves = pretrain_student(
            student, images, caption_emb, caption_ids, teacher_emb, data.pipeline,
            client_generator(self.cfg.seed, 0, ALIGN_STREAM + 1),
            epochs=m.stage1_epochs, batch_size=m.stage1_batch_size, lr=m.stage1_lr, lambda0=m.lambda0,
            schedule=m.lambda_schedule, temperature=m.temperature, gamma=m.gamma, progress=engine.progress,
        )
        class_emb = encoder.class_embeddings(data.dataset.prompt_names).to(engine.device)
        text_classifier(student, class_emb, images, data.pipeline, m.temperature)
        state = fold_projection({k: v.cpu() for k, v in student.state_dict().items()}, engine.model.state_dict())
        info = {"fingerprint": key, "curves": curves, "dwd": m.dwd, "lambda_schedule": m.lambda_schedule,
                "text_dim": int(caption_emb.shape[1]), "unique_captions": len(unique), "cached": False}
        save_torch(path, {"state": state, "info": info})
        return state, info

    def alignment_set(self, engine) -> AlignmentSet:
        if self._align_set is None:
            server = self.server(engine)
            ann, m = server.annotation, self.cfg.method
            aset = build_alignment_set(ann.labels, ann.class_probs, engine.data.num_classes, m.align_per_class,
                                       self.cfg.seed, m.align_select)
            self._align_set = aset
            self._align_images = server.pool.images[torch.as_tensor(aset.indices)].to(engine.device)
            accuracy = None
            if server.pool.has_hidden_labels:
                truth = server.pool.hidden_labels("measure-annotation-accuracy")[torch.as_tensor(aset.indices)]
                accuracy = float((aset.labels == truth).float().mean())
            self.info["alignment_set"] = {"size": len(aset), "per_class": aset.per_class, "label_accuracy": accuracy,
                                          "select": m.align_select}
        return self._align_set

    def after_aggregation(self, engine, round_idx: int) -> dict:
        m = self.cfg.method
        if not m.align or (m.align_rounds == "last" and round_idx != self.cfg.fl.rounds):
            return {}
        aset = self.alignment_set(engine)
        loss = align_model(
            engine.model, self._align_images, aset.labels, aset.probs, engine.data.pipeline,
            client_generator(self.cfg.seed, round_idx, ALIGN_STREAM),
            epochs=m.align_epochs, batch_size=m.align_batch_size, lr=m.align_lr, beta=m.beta, params=m.align_params,
        )
        return {"align_loss": loss}

    def state_dict(self) -> dict:
        return {"info": self.info}

    def load_state_dict(self, state: dict) -> None:
        self.info = state["info"]

    def describe(self) -> dict:
        m = self.cfg.method
        switches = {k: getattr(m, k) for k in ("stage1", "dwd", "align", "beta", "align_per_class", "align_rounds",
                                              "align_params", "stage2")}
        return {"name": self.name, **switches, "prox_mu": self.prox_mu, **self.info}

