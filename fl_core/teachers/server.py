"""The server's teacher context: the web pool, its MLLM annotation and the fitted CLIP-role encoder."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fl_core.config import ExperimentConfig
from fl_core.data.federated import FederatedData
from fl_core.data.webpool import WebPool, load_web_pool
from fl_core.teachers.annotate import Annotation, annotate_pool
from fl_core.teachers.cache import TeacherCache


@dataclass
class ServerContext:
    pool: WebPool
    annotation: Annotation
    encoder: object  # ImageTextEncoder, fitted to the captioned pool
    encoder_fit: dict
    cache: TeacherCache


def build_server_context(cfg: ExperimentConfig, fed: FederatedData, device: torch.device | str,
                         progress: bool = True) -> ServerContext:
    """Load the pool, annotate it with the MLLM and fit the encoder (all teacher work cached)."""
    from fl_core.teachers import build_encoder

    cache = TeacherCache()
    pool, annotation = annotated_pool(cfg, fed, cache, device, progress)
    encoder = build_encoder(cfg, cache, device, progress)
    fit = encoder.fit(pool.images, annotation.captions, cfg.seed)
    return ServerContext(pool, annotation, encoder, fit, cache)


def annotated_pool(cfg: ExperimentConfig, fed: FederatedData, cache: TeacherCache, device: torch.device | str,
                   progress: bool = True) -> tuple[WebPool, Annotation]:
    """The server's web pool and its MLLM annotation (cached)."""
    from fl_core.teachers import build_mllm

    ds = fed.dataset
    pool = load_web_pool(cfg.data.web_pool, ds, np.concatenate(fed.client_indices), cfg.data.web_pool_limit)
    mllm = build_mllm(cfg, pool, ds.prompt_names, device)
    annotation = annotate_pool(pool, ds.prompt_names, mllm, cache, cfg.teacher.caption_prompt,
                               cfg.teacher.batch_size, progress)
    return pool, annotation


def build_clip_encoder(cfg: ExperimentConfig, fed: FederatedData, device: torch.device | str, progress: bool = True):
    """The CLIP-role encoder alone, for methods that need no MLLM (CLIP2FL). Only an encoder that
    must first be fitted to a captioned pool (the offline one) costs the pool's annotation."""
    from fl_core.teachers import build_encoder

    cache = TeacherCache()
    encoder = build_encoder(cfg, cache, device, progress)
    if encoder.needs_fit:
        pool, annotation = annotated_pool(cfg, fed, cache, device, progress)
        encoder.fit(pool.images, annotation.captions, cfg.seed)
    return encoder
