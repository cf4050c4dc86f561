"""Build tiny random-weight VLMs offline, with the real architectures and special tokens.

    python -m capdpo tiny --out models/tiny

writes `strong/` and `weak/` (Qwen2.5-VL), `qwen3vl/` (Qwen3-VL) and `llava/` (LLaVA-1.5): each a
`save_pretrained` folder of model + processor that loads through `capdpo.models.loading.load_vlm` exactly like a hub
checkpoint. Their captions are meaningless (random weights); they exist so every code path runs on a laptop
and in CI in seconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.config import option, require_known

# Qwen's chat format. Images are written as <|vision_start|><|image_pad|><|vision_end|>; the processor expands
# <|image_pad|> to one token per merged patch.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and add_system_prompt is not defined %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3_CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' and add_system_prompt is not defined %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    "",
)
# LLaVA-1.5 (llava-hf) format: "USER: <image>\n{text} ASSISTANT: {answer}</s>".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }} {% else %}"
    "{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}<image>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# Qwen2's pre-tokenizer split: contractions, words, single digits, punctuation runs, whitespace.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_WORDS = (
    "a an the this that there is are was on in of with and to at by near next behind under above its their "
    "yes no accurate sentence image photo picture describe description detail details rewrite answer rate "
    "number only which more A B correct wrong man woman person people child dog cat bird horse car bus truck "
    "bicycle motorcycle train boat plane table chair sofa bed bench cup bottle bowl plate pizza cake sandwich "
    "apple banana orange book clock phone laptop keyboard tv window door wall floor sky tree grass road street "
    "building house field water snow beach mountain red green blue yellow white black brown gray orange pink "
    "purple small large big tall short old young wooden metal glass round square sitting standing walking "
    "running holding wearing looking lying parked flying eating drinking playing left right front back center "
    "background foreground top bottom side one two three four five several many some coffee astronaut rocket "
    "flag suit helmet camera tabby fur whiskers rider road street sign light pole fence shadow sunny cloudy"
).split()


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) + rng.choice([".", "!", "?", ","])
        for _ in range(3000)
    ]
    lines += [" ".join(map(str, range(i, i + 20))) for i in range(0, 120, 20)]
    lines += ["Sure, here is the rewritten sentence:", "1. 2. 3. - * \"quoted\" 'single' (paren) [box]: ;"]
    lines += [w.capitalize() for w in _WORDS] + [" " + w for w in _WORDS]
    return lines


def build_tokenizer(kind: str, vocab_size: int = 1200, corpus: list[str] | None = None):
    """Train a small byte-level BPE tokenizer with the real special tokens of `kind` ('qwen' or 'llava').

    `corpus` replaces the default word soup (e.g. the closed language of `capdpo.synthetic`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = QWEN_SPECIAL_TOKENS if kind == "qwen" else LLAVA_SPECIAL_TOKENS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else _corpus(), trainer=trainer)
    state = tok.model
    vocab = tok.get_vocab()
    # Rebuild through the transformers class users get from the hub, so its encode/decode paths are the real ones.
    import json

    model_json = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    del state
    if kind == "qwen":
        from transformers import Qwen2Tokenizer

        hf = Qwen2Tokenizer(
            vocab=vocab,  # specials keep their trained ids 0..n; added again below only to mark them special
            merges=merges,
            unk_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            bos_token=None,
            errors="replace",
        )
        hf.add_special_tokens(
            {"additional_special_tokens": [t for t in specials if t not in ("<|endoftext|>", "<|im_end|>")]}
        )
        hf.add_tokens(["<|endoftext|>", "<|im_end|>"], special_tokens=True)
    else:
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
        )
        hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return hf


def _qwen_processor(tokenizer, cls_name: str, patch_size: int, template: str):
    import transformers

    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=(patch_size * 2) ** 2 * 4,
        max_pixels=(patch_size * 2) ** 2 * 16,
    )
    video_cls = "Qwen3VLVideoProcessor" if cls_name == "Qwen3VLProcessor" else "Qwen2VLVideoProcessor"
    video_processor = getattr(transformers, video_cls)(patch_size=patch_size, temporal_patch_size=2, merge_size=2)
    processor = getattr(transformers, cls_name)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=template
    )
    tokenizer.chat_template = template
    return processor


def qwen_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The image and vision-marker token ids a Qwen-VL config needs: our tokenizer's, not the library's defaults
    (151655, ... belong to the hub tokenizer)."""
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def tiny_vision(out_hidden: int, patch: int, **family: Any) -> dict[str, Any]:
    """A two-block vision tower config (32 wide, two heads) projecting to `out_hidden`; `family`: the family's own
    keys (windows, deepstack layers, ...)."""
    return dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=patch,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=out_hidden,
        **family,
    )


def build_qwen25vl(out: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL (the default strong/weak architecture)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer("qwen")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    heads = 4
    head_dim = hidden // heads
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # temporal, height, width; sums to head_dim / 2
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=tiny_vision(hidden, 14, window_size=56, fullatt_block_indexes=[1]),
        **qwen_token_ids(ids),
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    processor = _qwen_processor(tokenizer, "Qwen2_5_VLProcessor", 14, QWEN_CHAT_TEMPLATE)
    return _save(model, processor, out, [ids["<|im_end|>"], ids["<|endoftext|>"]], ids["<|endoftext|>"])


def build_qwen3vl(out: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A tiny Qwen3-VL."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = build_tokenizer("qwen")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = 16
    half = head_dim // 2
    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=head_dim,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
                "mrope_interleaved": True,
            },
            tie_word_embeddings=False,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=tiny_vision(hidden, 16, num_position_embeddings=64, deepstack_visual_indexes=[0]),
        **qwen_token_ids(ids),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    processor = _qwen_processor(tokenizer, "Qwen3VLProcessor", 16, QWEN3_CHAT_TEMPLATE)
    return _save(model, processor, out, [ids["<|im_end|>"], ids["<|endoftext|>"]], ids["<|endoftext|>"])


def build_llava(out: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A tiny LLaVA-1.5 (CLIP vision tower, MLP projector, Llama text model)."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = build_tokenizer("llava")
    image_size, patch = 56, 14
    cfg = LlavaConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            projection_dim=32,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return _save(model, processor, out, [tokenizer.eos_token_id], tokenizer.pad_token_id)


def _sentence_prior(model, tokenizer, eos_ids: list[int]) -> None:
    """Make random generations look like sentences: words, then a period now and then, then the end of turn.

    Every token embedding gets a constant first dimension, so after the final RMSNorm the hidden state carries
    a near-constant component; the output matrix's first column turns it into a per-token prior (space-led
    words likely, "." less, the end-of-turn token rarely, byte fragments almost never). The other columns
    stay random and large enough that the text, and every score read from the logits, still depends on the
    image and the prompt. The outputs remain meaningless.
    """
    import re

    import torch

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    hidden = emb.shape[1]
    prior = torch.full((head.shape[0],), -8.0)
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid])
        if re.fullmatch(r" [a-z]{2,}", text):
            prior[tid] = 0.0
        elif re.fullmatch(r"[0-9]| ?(?:yes|no|Yes|No|A|B)", text):
            prior[tid] = -2.0  # answers and digits: reachable, not dominant
    n_words = int((prior == 0).sum())
    prior[tokenizer.convert_tokens_to_ids(".")] = float(torch.log(torch.tensor(n_words / 6.0)))
    prior[tokenizer.convert_tokens_to_ids(",")] = float(torch.log(torch.tensor(n_words / 30.0)))
    for eos in eos_ids[:1]:
        prior[eos] = float(torch.log(torch.tensor(n_words / 40.0)))
    with torch.no_grad():
        emb[:, 0] = 1.0
        head.normal_(0.0, 1.0)
        head[:, 0] = prior / hidden**0.5  # the normalised constant dimension is about sqrt(hidden)


def _save(model, processor, out: Path, eos_ids: list[int], pad_id: int) -> Path:
    _sentence_prior(model, processor.tokenizer, eos_ids)
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, key, None)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "README.md").write_text(
        "Tiny random-weight model built offline by `python -m capdpo tiny`. Its outputs are meaningless: it "
        "exists to run capdpo's code paths quickly, not to describe images.\n"
    )
    return out


BUILDERS = {
    "strong": lambda out: build_qwen25vl(out, hidden=64, layers=2, seed=1),
    "weak": lambda out: build_qwen25vl(out, hidden=48, layers=2, seed=2),
    "qwen3vl": lambda out: build_qwen3vl(out, seed=3),
    "llava": lambda out: build_llava(out, seed=4),
}


def build_all(out: str | Path, names: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Build the tiny models into `out/<name>`; existing complete folders are kept unless `force`."""
    out = Path(out)
    built = {}
    for name in names or list(BUILDERS):
        target = out / name
        if force or not (target / "model.safetensors").exists():
            tmp = out / f".{name}.tmp"
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            BUILDERS[name](tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)  # a half-written model folder never looks finished
        built[name] = target
    return built


@dataclass
class TinyOptions:
    """`python -m capdpo tiny`: build the tiny random-weight models."""

    out: str = option("Folder for the models.", "models/tiny")
    only: list[str] = option(f"Build only these of {', '.join(BUILDERS)} (default: all).", factory=list)
    force: bool = option("Rebuild folders that already exist.", False)

    def __post_init__(self) -> None:
        require_known("--only", self.only, BUILDERS)


def main(argv: list[str] | None = None) -> None:
    from capdpo.cli import parse_options, run_cli

    def _run(args: list[str] | None) -> None:
        opts = parse_options(TinyOptions, args, __doc__.split("\n\n")[0])
        for name, path in build_all(opts.out, opts.only or None, opts.force).items():
            print(f"{name}: {path}")

    run_cli(_run, argv)
