"""A real multimodal LLM through ``transformers`` (``AutoProcessor`` + ``AutoModelForImageTextToText``),
by default LLaVA-1.5-7B. Batched, left-padded, bf16 on GPU.

- ``caption``: greedy generation from a configurable prompt.
- ``class_distribution``: one forward pass of a multiple-choice prompt listing the classes as
  lettered options; the next-token logits of the option letters, softmaxed, are the distribution.
  More than 26 classes are asked in groups of at most 26 (one forward pass per group) and the raw
  option logits of all groups are softmaxed together, which assumes the logits of different
  prompts are on one scale (the usual reading; say so when reporting ImageNet-LT numbers).
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch

MC_INSTRUCTION = "Which of the following does the image show?"
MC_ANSWER_HINT = "Answer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase


class TeacherUnavailableError(RuntimeError):
    """A teacher's weights cannot be loaded; the message says which and how to provide them."""


class HFMultimodalLLM:
    simulated = False

    def __init__(self, model, processor, name: str, device: torch.device | str = "cpu", batch_size: int = 8,
                 max_new_tokens: int = 40):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues from the last real token
        self.name = name
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    @classmethod
    def load(cls, model_id: str, revision: str = "main", device: str = "cpu", batch_size: int = 8,
             allow_download: bool = False) -> "HFMultimodalLLM":
        """Load from a local path or the local Hugging Face cache (or the hub when ``allow_download``)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        how = ("Point teacher.mllm_model at a local folder holding its weights and processor "
               "(--set teacher.mllm_model=/path/to/llava-1.5-7b-hf), or allow the download with "
               "--set teacher.allow_download=true")
        if model_id.startswith(("/", ".", "~")) and not Path(model_id).expanduser().is_dir():
            raise TeacherUnavailableError(f"the MLLM folder {model_id!r} does not exist. {how}")
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        try:
            processor = AutoProcessor.from_pretrained(model_id, revision=revision, local_files_only=not allow_download)
            model = AutoModelForImageTextToText.from_pretrained(
                model_id, revision=revision, local_files_only=not allow_download, dtype=dtype
            ).to(device)
        except (OSError, ValueError) as err:
            raise TeacherUnavailableError(
                f"the MLLM {model_id!r} (revision {revision}) is not available offline ({str(err).splitlines()[0]}). {how}"
            ) from None
        return cls(model, processor, name=f"hf:{model_id}@{revision}", device=device, batch_size=batch_size)

    def describe(self) -> dict:
        return {"backend": "hf", "model": self.name}

    def _chat(self, question: str) -> str:
        """The model's own chat template around one image and ``question``; LLaVA-1.5's otherwise."""
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return f"USER: {self.processor.image_token}\n{question} ASSISTANT:"

    def _inputs(self, images: torch.Tensor, prompts: list[str]) -> dict:
        from PIL import Image

        pil = [Image.fromarray(_hwc(im)) for im in images]
        inputs = self.processor(images=pil, text=prompts, padding=True, return_tensors="pt")
        inputs.pop("token_type_ids", None)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if k == "pixel_values" else v.to(self.device)) for k, v in inputs.items()}

    @torch.inference_mode()
    def caption(self, images: torch.Tensor, prompt: str) -> list[str]:
        """Greedy captions, one per image (uint8 (N, C, H, W))."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            inputs = self._inputs(batch, [self._chat(prompt)] * len(batch))
            generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            new = generated[:, inputs["input_ids"].shape[1] :]
            out += [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return out

    def multiple_choice_prompt(self, class_names: list[str]) -> str:
        options = "\n".join(f"{LETTERS[i]}. {name}" for i, name in enumerate(class_names))
        return self._chat(f"{MC_INSTRUCTION}\n{options}\n{MC_ANSWER_HINT}")

    def option_token_ids(self, count: int) -> list[list[int]]:
        """Token ids that start the answer 'A', 'B', ... (with and without a leading space)."""
        ids = []
        for letter in LETTERS[:count]:
            variants = {self.tokenizer(text, add_special_tokens=False).input_ids[-1] for text in (letter, f" {letter}")}
            ids.append(sorted(variants))
        return ids

    @torch.inference_mode()
    def option_logits(self, images: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        """(N, len(class_names)) next-token logits of the option letters, one forward pass per batch."""
        if not 1 <= len(class_names) <= len(LETTERS):
            raise ValueError(f"a multiple-choice prompt takes 1..{len(LETTERS)} options, got {len(class_names)}")
        prompt = self.multiple_choice_prompt(class_names)
        option_ids = self.option_token_ids(len(class_names))
        rows = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            logits = self.model(**self._inputs(batch, [prompt] * len(batch))).logits[:, -1, :].float()
            rows.append(torch.stack([torch.logsumexp(logits[:, ids], dim=1) for ids in option_ids], dim=1))
        return torch.cat(rows).cpu()

    def class_distribution(self, images: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        """(N, C) distribution over ``class_names``; groups of 26 options beyond 26 classes."""
        groups = [class_names[i : i + len(LETTERS)] for i in range(0, len(class_names), len(LETTERS))]
        logits = torch.cat([self.option_logits(images, group) for group in groups], dim=1)
        return torch.softmax(logits, dim=1)


def _hwc(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) -> (H, W, 3) for PIL; grey images are repeated to RGB."""
    array = image.detach().cpu().numpy()
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return np.ascontiguousarray(array.transpose(1, 2, 0))
