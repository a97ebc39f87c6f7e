"""Teachers on the server: the MLLM (real or simulated), the CLIP-role encoder (open_clip or the
offline substitute), the on-disk cache of their outputs, and pool annotation."""

from __future__ import annotations

import torch

from fl_core.config import ExperimentConfig
from fl_core.data.webpool import WebPool
from fl_core.teachers.annotate import Annotation, annotate_pool
from fl_core.teachers.cache import TeacherCache, cache_root
from fl_core.teachers.encoders import ImageTextEncoder, OfflineCLIP, OpenCLIPEncoder, open_clip_architecture
from fl_core.teachers.hf_mllm import HFMultimodalLLM, TeacherUnavailableError
from fl_core.teachers.simulated import SimulatedMLLM


def build_mllm(cfg: ExperimentConfig, pool: WebPool, class_names: list[str], device: torch.device | str = "cpu"):
    """The MLLM the config names: the simulated annotator or a transformers model."""
    t = cfg.teacher
    if t.mllm == "simulated":
        return SimulatedMLLM(pool, class_names, t.mllm_accuracy, cfg.seed)
    return HFMultimodalLLM.load(t.mllm_model, t.mllm_revision, str(device), t.batch_size, t.allow_download)


def build_encoder(cfg: ExperimentConfig, cache: TeacherCache, device: torch.device | str = "cpu",
                  progress: bool = True) -> ImageTextEncoder:
    """The CLIP-role encoder the config names (the offline one still needs ``fit`` on a captioned pool)."""
    t = cfg.teacher
    if t.clip == "offline":
        return OfflineCLIP(cache, device, t.batch_size, t.image_size, t.align_steps, progress, cfg.cpu_threads)
    return OpenCLIPEncoder(cache, t.clip_model, t.clip_pretrained, device, t.batch_size, t.allow_download, progress,
                           cfg.cpu_threads)


def text_embedding_dim(teacher) -> int:
    """Width of the text embeddings of the CLIP-role encoder a teacher config names (no weights loaded)."""
    if teacher.clip == "offline":
        return 384  # all-MiniLM-L6-v2
    import open_clip

    return int(open_clip.get_model_config(open_clip_architecture(teacher.clip_model))["embed_dim"])


__all__ = [
    "Annotation",
    "HFMultimodalLLM",
    "ImageTextEncoder",
    "OfflineCLIP",
    "OpenCLIPEncoder",
    "SimulatedMLLM",
    "TeacherCache",
    "TeacherUnavailableError",
    "annotate_pool",
    "build_encoder",
    "build_mllm",
    "cache_root",
    "text_embedding_dim",
]
