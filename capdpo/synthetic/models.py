"""Untrained Qwen2.5-VL-architecture models sized for the synthetic world (before SFT trains them from scratch).

Same architecture, special tokens, chat template and processor classes as `capdpo.models.tiny` (so every stage loads
them like a hub checkpoint), with a tokenizer trained on the synthetic language and every pipeline prompt, and
images fixed at 112 x 112 pixels (16 image tokens after the 2 x 2 merge). Unlike `capdpo.models.tiny`'s models, no
sentence prior is planted: training gives them their behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from capdpo.synthetic.world import IMAGE_SIZE


@dataclass(frozen=True)
class ModelSize:
    """Width and depth of the language model and the vision tower."""

    hidden: int
    layers: int
    heads: int
    vision_hidden: int
    vision_depth: int


STRONG_SIZE = ModelSize(hidden=96, layers=3, heads=4, vision_hidden=64, vision_depth=2)
WEAK_SIZE = ModelSize(hidden=80, layers=3, heads=4, vision_hidden=64, vision_depth=2)
VOCAB_SIZE = 640


def build_untrained(out: str | Path, size: ModelSize, seed: int = 0) -> Path:
    """Save a randomly initialised model + processor for the synthetic world into `out`."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from capdpo.models.tiny import (
        QWEN_CHAT_TEMPLATE,
        QWEN_SPECIAL_TOKENS,
        _qwen_processor,
        build_tokenizer,
        qwen_token_ids,
    )
    from capdpo.synthetic.tasks import tokenizer_corpus

    tokenizer = build_tokenizer("qwen", vocab_size=VOCAB_SIZE, corpus=tokenizer_corpus())
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = size.hidden // size.heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # temporal, height, width; sums to head_dim / 2
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=size.hidden,
            intermediate_size=size.hidden * 3,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.heads,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=size.vision_depth,
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_hidden * 2,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=IMAGE_SIZE,  # one window: the whole image
            fullatt_block_indexes=list(range(size.vision_depth)),
            out_hidden_size=size.hidden,
        ),
        **qwen_token_ids(ids),
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    processor = _qwen_processor(tokenizer, "Qwen2_5_VLProcessor", 14, QWEN_CHAT_TEMPLATE)
    pixels = IMAGE_SIZE * IMAGE_SIZE
    processor.image_processor.min_pixels = processor.image_processor.max_pixels = pixels
    processor.image_processor.size = {"shortest_edge": pixels, "longest_edge": pixels}
    gen = model.generation_config
    gen.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    gen.pad_token_id = ids["<|endoftext|>"]
    gen.bos_token_id = None
    gen.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        setattr(gen, key, None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
