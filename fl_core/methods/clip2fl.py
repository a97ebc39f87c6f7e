"""CLIP2FL (Shi et al., AAAI 2024): CReFF plus CLIP knowledge on both sides.

- Clients add ``weight * KL(softmax(t / T) || softmax(s / T)) * T^2`` (``batchmean``; T = 3, weight 1)
  between their logits and CLIP's zero-shot logits of the *un-augmented* image. Those teacher logits
  are constant per image, so they are computed once per client image (and cached) instead of on
  every batch as the public code does; the training losses are identical. Weight 1 is DESIGN.md's
  reading; the public code's ``options.py`` defaults this weight (``--alpha``) to 2
  (``method.clip2fl_kd_weight=2`` runs that).
- The server adds CLIP2FL's prototype-contrastive loss (weight 0.001, the public code's current
  default; an earlier version had 0.5 and its README's example run sets 0.1; temperature 0.1) pulling
  the federated features to the text embedding of their class while it learns them.
- The student is ResNet-8 with CLIP2FL's linear layer to the text dimension (256 -> 512 for
  CLIP ViT-B/32). On the offline profile the CLIP role is played by the offline encoder
  (EfficientNet-Lite0 + MiniLM, text dimension 384), whose image->text map was fitted on the
  MLLM-captioned web pool: so offline, CLIP2FL too profits from that pool, indirectly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fl_core.methods.base import ClientResult
from fl_core.methods.creff import CReFF, text_contrastive_loss

# CLIP2FL's public code embeds one prompt per class, the dataset's own class name in "a photo of a {}"
# (no full stop), and uses it for the clients' teacher logits and the server's contrastive loss alike
PROMPT = ("a photo of a {}",)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss as CLIP2FL computes it: batchmean KL times T^2. Logits
    ``(..., batch, classes)``; one value per leading index (a scalar for one batch)."""
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1), F.softmax(teacher_logits / temperature, dim=-1),
                  reduction="none")
    return kl.sum(-1).mean(-1) * temperature**2


class CLIP2FL(CReFF):
    name = "clip2fl"
    default_arch = "resnet8_clip2fl"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._encoder = None
        self._teacher_logits: dict[int, torch.Tensor] = {}
        self._text: torch.Tensor | None = None

    @staticmethod
    def projection_dim(cfg) -> int:
        from fl_core.teachers import text_embedding_dim

        return text_embedding_dim(cfg.teacher)

    def encoder(self, engine):
        """The CLIP-role encoder (no MLLM: the offline encoder's fit is the only use of the captions)."""
        if self._encoder is None:
            from fl_core.teachers.server import build_clip_encoder

            self._encoder = build_clip_encoder(self.cfg, engine.data, engine.device, engine.progress)
        return self._encoder

    def teacher_logits(self, engine, client_id: int) -> torch.Tensor:
        """CLIP zero-shot logits of the client's un-augmented images (cached per image on disk)."""
        if client_id not in self._teacher_logits:
            encoder = self.encoder(engine)
            images = engine.data.clients[client_id].images
            self._teacher_logits[client_id] = encoder.zero_shot_logits(images, engine.data.dataset.class_names,
                                                                       templates=PROMPT).to(engine.device)
        return self._teacher_logits[client_id]

    def text_embeddings(self, engine) -> torch.Tensor:
        if self._text is None:
            encoder = self.encoder(engine)
            self._text = encoder.class_embeddings(engine.data.dataset.class_names, templates=PROMPT).to(engine.device)
        return self._text

    def client_targets(self, engine, client_id: int) -> torch.Tensor:
        return self.teacher_logits(engine, client_id)

    def client_extra_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        m = self.cfg.method
        return m.clip2fl_kd_weight * kd_loss(logits, targets, m.clip2fl_temperature)

    def client_result(self, engine, client_id, state, stats) -> ClientResult:
        result = super().client_result(engine, client_id, state, stats)
        # plus one teacher forward per image (the public code runs it on every batch of every epoch)
        result.flops += self.encoder(engine).forward_flops_per_image() * stats.num_samples
        return result

    def feature_loss_extra(self, engine, features: torch.Tensor) -> torch.Tensor:
        m = self.cfg.method
        return m.clip2fl_contrast_weight * text_contrastive_loss(
            features, self.feature_labels(engine), self.text_embeddings(engine), m.clip2fl_contrast_temperature)

    def describe(self) -> dict:
        m = self.cfg.method
        info = {k: getattr(m, k) for k in ("clip2fl_kd_weight", "clip2fl_temperature", "clip2fl_contrast_weight",
                                           "clip2fl_contrast_temperature")}
        teacher = "offline encoder (EfficientNet-Lite0 + MiniLM, not CLIP)" if self.cfg.teacher.clip == "offline" else "open_clip"
        return {**super().describe(), "name": self.name, **info, "clip_role": teacher}
