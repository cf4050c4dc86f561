"""The only place that loads a model or processor: dtype, attention kernel, image pixel limits, adapters.

Inference models (`load_vlm`, `load_role`) get capdpo's exact speed patches on CUDA (`capdpo.models.patches`);
training models (`load_for_training`) stay as the library builds them. LoRA targets are `capdpo.models.lora`'s.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.errors import ConfigError, InputError
from capdpo.models.adapters import adapter_identity
from capdpo.models.patches import tune_for_cuda_inference, use_grouped_vision_attention


@dataclass
class LoadedModel:
    """A VLM ready for inference: the model, its processor and facts the engines need."""

    model: Any
    processor: Any
    name: str  # hub id or local path as configured
    device: Any
    dtype: Any
    family: str  # qwen2_5_vl / qwen3_vl / llava / other

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def end_of_turn_ids(self) -> list[int]:
        """Token ids that end an assistant turn (generation stops at any of them)."""
        ids = self.model.generation_config.eos_token_id
        ids = list(ids) if isinstance(ids, (list, tuple)) else ([] if ids is None else [ids])
        tok = self.tokenizer
        for token in ("<|im_end|>", "<|endoftext|>", tok.eos_token):
            tid = tok.convert_tokens_to_ids(token) if token else None
            if isinstance(tid, int) and tid != tok.unk_token_id and tid not in ids:
                ids.append(tid)
        return ids


def resolve_device(device: str = "auto") -> Any:
    """`auto` picks CUDA when available; a CUDA device that is not there is a `ConfigError`."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: '{device}' asked for, but no CUDA GPU is visible; use device: cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: Any) -> Any:
    """bf16 on GPU, fp32 on CPU (bf16 matmuls on CPU are slow and change greedy outputs)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype in ("float16", "fp16"):
        raise ConfigError("dtype: float16 is refused — it overflows in Qwen-VL attention; use bfloat16")
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def resolve_attention(attn: str, device: Any) -> str:
    """The best available attention kernel: FlashAttention-2 on GPU when installed, else SDPA."""
    if attn != "auto":
        if attn.startswith("flash_attention") and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(f"attn_implementation: '{attn}' needs the flash-attn package; use sdpa")
        return attn
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def check_model_source(name_or_path: str, field: str = "model") -> None:
    """A path-looking name must exist; a hub id is left for `from_pretrained` (and its cache) to resolve."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"{field}: {path} has no config.json — not a saved model folder")
        return
    if looks_local or name_or_path.count("/") != 1:
        raise InputError(
            f"{field}: '{name_or_path}' is neither a local model folder nor a hub id (org/name); "
            "for tiny test models run `python -m capdpo tiny`"
        )


def family_of(config: Any) -> str:
    model_type = getattr(config, "model_type", "")
    if model_type in ("qwen2_5_vl", "qwen2_vl"):
        return "qwen2_5_vl"
    if model_type.startswith("qwen3_vl"):
        return "qwen3_vl"
    if model_type in ("llava",):
        return "llava"
    return model_type or "other"


def load_processor(
    name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None, trust_remote_code: bool = False
) -> Any:
    """The model's processor with image pixel limits applied (Qwen processors resize into [min, max])."""
    from transformers import AutoProcessor

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None and min_pixels and max_pixels and hasattr(image_processor, "merge_size"):
        # Qwen-style processors resize every image so its area lies in [shortest_edge, longest_edge] pixels.
        image_processor.size = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"  # generation and last-token scoring both read the final position
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return processor


def _from_pretrained(
    name_or_path: str,
    field: str,
    dtype: Any,
    attn: str,
    min_pixels: int | None,
    max_pixels: int | None,
    trust_remote_code: bool,
    **kwargs: Any,
) -> tuple[Any, Any, Any]:
    """(config, processor, model) of a saved VLM, as safetensors; a missing or unloadable model, or one that needs
    its own code, is a one-line error naming `field`."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        processor = load_processor(name_or_path, min_pixels, max_pixels, trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path,
            dtype=dtype,
            attn_implementation=attn,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{field}: cannot load '{name_or_path}' ({first})") from None
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"{field}: '{name_or_path}' needs trust_remote_code: true (only if you trust it)"
            ) from None
        raise
    return config, processor, model


def load_vlm(
    name_or_path: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "auto",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
    adapter: str | None = None,
    field: str = "model",
) -> LoadedModel:
    """Load any supported VLM (Qwen2.5-VL, Qwen3-VL, LLaVA-1.5, ...) for inference.

    Args:
        name_or_path: hub id or local folder.
        device, dtype, attn_implementation: see `CommonConfig`.
        min_pixels, max_pixels: image size bounds for Qwen processors.
        trust_remote_code: let the repo run its own code (off by default).
        adapter: optional PEFT adapter folder applied on top.
        field: config field named in errors.
    """
    check_model_source(name_or_path, field)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    attn = resolve_attention(attn_implementation, dev)
    config, processor, model = _from_pretrained(
        name_or_path, field, torch_dtype, attn, min_pixels, max_pixels, trust_remote_code
    )
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise InputError(f"adapter: {adapter} has no adapter_config.json")
        model = PeftModel.from_pretrained(model, adapter)
        model = model.merge_and_unload()  # inference only: merged weights are as fast as the base
    if attn == "sdpa":
        use_grouped_vision_attention()
    model.to(dev).eval()
    if dev.type == "cuda":
        tune_for_cuda_inference(model)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return LoadedModel(
        model=model, processor=processor, name=name_or_path, device=dev, dtype=torch_dtype, family=family_of(config)
    )


def load_checkpoint_weights(model: Any, checkpoint: str | Path) -> bool:
    """Copy the weights of a `save_pretrained` checkpoint folder into `model`; False if it holds no full weights.

    transformers' Trainer resumes a full fine-tune by loading the checkpoint's state dict non-strictly under its
    literal keys, but vision-language checkpoints are saved under the hub's key names (`model.embed_tokens...`,
    `visual...`), which differ from the in-memory ones (`model.language_model...`, `model.visual...`): nothing
    matches and training silently restarts from the original weights. Loading through `from_pretrained` applies
    the key mapping; the copy is strict, so a checkpoint of another shape fails loudly.
    """
    import torch

    folder = Path(checkpoint)
    if not any((folder / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        return False
    dtype = next(model.parameters()).dtype
    saved = type(model).from_pretrained(folder, dtype=dtype, use_safetensors=True)
    with torch.no_grad():
        model.load_state_dict(saved.state_dict(), strict=True)
    del saved
    return True


def load_role(common: Any, role: str) -> LoadedModel:
    """Load the run's `strong` or `weak` model with the run's device, dtype, attention and pixel settings.

    The strong model gets `strong_adapter` merged in when the run names one (an earlier round's trained policy).
    """
    name = common.strong_model if role == "strong" else common.weak_model
    adapter = getattr(common, "strong_adapter", "") if role == "strong" else ""
    return load_with_run_settings(common, name, adapter, field=f"{role}_model")


def load_with_run_settings(common: Any, name: str, adapter: str = "", field: str = "model") -> LoadedModel:
    """Load `name` (+ `adapter`) with the run's device, dtype, attention and pixel settings."""
    return load_vlm(
        name,
        device=common.device,
        dtype=common.dtype,
        attn_implementation=common.attn_implementation,
        min_pixels=common.min_pixels or None,
        max_pixels=common.max_pixels or None,
        trust_remote_code=common.trust_remote_code,
        adapter=adapter or None,
        field=field,
    )


def role_model_id(common: Any, role: str) -> str:
    """The strong or weak model as record ids and records name it.

    The configured name, plus `+adapter:<content hash>` when `strong_adapter` is applied, so the records of a
    model with another adapter (a later round) never mix with these.
    """
    if role != "strong":
        return common.weak_model
    adapter = getattr(common, "strong_adapter", "")
    return f"{common.strong_model}+adapter:{adapter_identity(adapter)}" if adapter else common.strong_model


def load_for_training(
    name_or_path: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "auto",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
    quantize_4bit: bool = False,
    adapter: str | None = None,
    field: str = "model",
) -> LoadedModel:
    """Load a VLM to be trained: left where the trainer places it (CPU, or its GPU for 4-bit), cache off.

    Args:
        name_or_path: hub id or local folder.
        device, dtype, attn_implementation: see `CommonConfig` (bf16 on GPU, fp32 on CPU; fp16 is refused).
        min_pixels, max_pixels: image size bounds for Qwen processors.
        trust_remote_code: let the repo run its own code (off by default).
        quantize_4bit: QLoRA: load the weights as NF4 through bitsandbytes (CUDA only); the vision tower, the
            projector and the LM head stay in `dtype`.
        adapter: a PEFT adapter folder merged into the weights before training (an earlier round's policy): the
            new adapter then trains on top of it and the reference is the merged model.
        field: config field named in errors.
    """
    check_model_source(name_or_path, field)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    attn = resolve_attention(attn_implementation, dev)
    if adapter:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if quantize_4bit or is_deepspeed_zero3_enabled():
            raise ConfigError(
                "strong_adapter: it cannot be merged into 4-bit (qlora) or ZeRO-3-sharded weights; merge it into a "
                "model folder first (train.merge: true writes 06_train/merged/) and name that as strong_model"
            )
        adapter_identity(adapter)  # a one-line error for a folder that is not an adapter, before the model loads
    kwargs: dict[str, Any] = {}
    if quantize_4bit:
        if dev.type != "cuda":
            raise ConfigError("train.method: qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); use lora on CPU")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "train.method: qlora needs the bitsandbytes package; `pip install -r requirements-qlora.txt` (or use lora)"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
            llm_int8_skip_modules=["visual", "vision_tower", "multi_modal_projector", "lm_head"],
        )
        kwargs["device_map"] = {"": dev.index or 0}
    config, processor, model = _from_pretrained(
        name_or_path, field, torch_dtype, attn, min_pixels, max_pixels, trust_remote_code, **kwargs
    )
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.config.use_cache = False  # no KV cache in training forwards
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return LoadedModel(
        model=model, processor=processor, name=name_or_path, device=dev, dtype=torch_dtype, family=family_of(config)
    )
