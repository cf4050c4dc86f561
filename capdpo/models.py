"""The only place that loads a model or processor, sets dtype, attention, pixel limits and LoRA targets."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.errors import ConfigError, InputError


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
            "for tiny test models run `python -m capdpo.tiny`"
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
    from transformers import AutoConfig, AutoModelForImageTextToText

    check_model_source(name_or_path, field)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    attn = resolve_attention(attn_implementation, dev)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        processor = load_processor(name_or_path, min_pixels, max_pixels, trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path,
            dtype=torch_dtype,
            attn_implementation=attn,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
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


# Linear layers of the language model; the vision tower's MLP reuses some of these names (gate_proj, up_proj,
# down_proj in Qwen2.5-VL), so targets are given as a regex anchored on the language model's module path.
LANGUAGE_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_regex(model: Any, names: tuple[str, ...] = LANGUAGE_LINEAR_NAMES, include_vision: bool = False) -> str:
    """A PEFT `target_modules` regex that matches `names` in the language model only (unless `include_vision`).

    A bare list of names would also match the vision tower's MLP layers of Qwen2.5-VL.
    """
    import torch

    vision_markers = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "merger")
    matched = []
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module_name.rsplit(".", 1)[-1] not in names:
            continue
        if not include_vision and any(m in module_name.split(".") for m in vision_markers):
            continue
        matched.append(module_name)
    if not matched:
        raise ConfigError(f"lora targets: no linear layer named {names} found in {type(model).__name__}")
    return "^(" + "|".join(re.escape(n) for n in matched) + ")$"


def load_role(common: Any, role: str) -> LoadedModel:
    """Load the run's `strong` or `weak` model with the run's device, dtype, attention and pixel settings.

    The strong model gets `strong_adapter` merged in when the run names one (an earlier round's trained policy).
    """
    name = common.strong_model if role == "strong" else common.weak_model
    adapter = getattr(common, "strong_adapter", "") if role == "strong" else ""
    return load_vlm(
        name,
        device=common.device,
        dtype=common.dtype,
        attn_implementation=common.attn_implementation,
        min_pixels=common.min_pixels or None,
        max_pixels=common.max_pixels or None,
        trust_remote_code=common.trust_remote_code,
        adapter=adapter or None,
        field=f"{role}_model",
    )


ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@functools.lru_cache(maxsize=16)
def _adapter_digest(folder: str, stamp: tuple[Any, ...]) -> str:
    digest = hashlib.sha256()
    for name in ("adapter_config.json", *ADAPTER_WEIGHT_FILES):
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode() + b"\0")
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def adapter_identity(folder: str) -> str:
    """A content hash of a PEFT adapter folder (its config and weight file), 16 hex digits.

    The same adapter copied elsewhere keeps its identity; retraining it in place changes it.

    Raises:
        InputError: the folder has no adapter_config.json or no weight file.
    """
    path = Path(folder)
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"strong_adapter: {folder} has no adapter_config.json — not a PEFT adapter folder")
    files = [path / n for n in ("adapter_config.json", *ADAPTER_WEIGHT_FILES) if (path / n).is_file()]
    if len(files) < 2:
        raise InputError(f"strong_adapter: {folder} has no {' or '.join(ADAPTER_WEIGHT_FILES)}")
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)  # recomputed when a file changes
    return _adapter_digest(str(path.resolve()), stamp)


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
    from transformers import AutoConfig, AutoModelForImageTextToText

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
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        processor = load_processor(name_or_path, min_pixels, max_pixels, trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path,
            dtype=torch_dtype,
            attn_implementation=attn,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{field}: cannot load '{name_or_path}' ({first})") from None
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.config.use_cache = False  # no KV cache in training forwards
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return LoadedModel(
        model=model, processor=processor, name=name_or_path, device=dev, dtype=torch_dtype, family=family_of(config)
    )


def _windows(t: Any, n: int, length: int) -> Any:
    """[n * length, heads, dim] -> [n, heads, length, dim]."""
    return t.view(n, length, *t.shape[1:]).transpose(1, 2)


def _grouped_vision_attention(original: Any, apply_rotary: Any) -> Any:
    """A drop-in `forward` for Qwen-VL vision attention that batches equal-length chunks into one SDPA call.

    Without FlashAttention, transformers runs one attention call per window and per image (Qwen2.5-VL: 16 windows
    × 28 layers + 4 full layers per 448-px image), so at batch 256 the vision tower spends its time launching
    100k+ tiny kernels. Windows of one size are independent problems of one shape: stacking them is the same
    math in one call. FlashAttention keeps the library's own varlen path.
    """
    import torch
    import torch.nn.functional as F

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):  # noqa: ANN001
        if self.config._attn_implementation != "sdpa":  # FlashAttention's varlen path needs no help
            return original(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq_length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = getattr(self, "capdpo_rotary", apply_rotary)(q, k, cos, sin)
        bounds = cu_seqlens.tolist()
        chunks: dict[int, list[int]] = {}
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                chunks.setdefault(end - start, []).append(start)
        out = torch.empty_like(q)
        for length, starts in chunks.items():
            n = len(starts)
            if n * length == seq_length:  # one size tiles the whole sequence: views, no copies
                o = F.scaled_dot_product_attention(*(_windows(t, n, length) for t in (q, k, v)), scale=self.scaling)
                out = o.transpose(1, 2).reshape(seq_length, *q.shape[1:])
                break
            index = torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)
            index = index.reshape(-1)
            o = F.scaled_dot_product_attention(*(_windows(t[index], n, length) for t in (q, k, v)), scale=self.scaling)
            out[index] = o.transpose(1, 2).reshape(-1, *q.shape[1:])
        return self.proj(out.reshape(seq_length, -1).contiguous())

    forward.capdpo_grouped = True
    forward.__wrapped_original__ = original
    return forward


def use_grouped_vision_attention() -> None:
    """Install `_grouped_vision_attention` on the Qwen2.5-VL and Qwen3-VL vision attention classes (idempotent)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen25
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3

    for module, cls in ((qwen25, qwen25.Qwen2_5_VLVisionAttention), (qwen3, qwen3.Qwen3VLVisionAttention)):
        if not getattr(cls.forward, "capdpo_grouped", False):
            cls.forward = _grouped_vision_attention(cls.forward, module.apply_rotary_pos_emb_vision)


class _LinearPatchEmbed:
    """`forward` for a Qwen-VL patch embedding: its Conv3d (kernel = stride, no padding) as one matmul.

    Each patch is one flattened [channels, frames, height, width] vector and the convolution sees each patch
    exactly once, so it is `x @ weight.reshape(out, -1).T` (+ bias) with the same flattening order; cuDNN's
    3-D convolution on 100k+ tiny volumes is far slower than that matmul.
    """

    def __call__(self, module: Any, hidden_states: Any) -> Any:
        import torch.nn.functional as F

        weight = module.proj.weight
        flat = hidden_states.to(weight.dtype).reshape(-1, weight[0].numel())
        return F.linear(flat, weight.reshape(weight.shape[0], -1), module.proj.bias)


def linear_patch_embedding(model: Any) -> int:
    """Run the Qwen-VL patch embeddings of `model` (Conv3d with kernel = stride) as matmuls; returns how many."""
    import types

    import torch

    count = 0
    forward = _LinearPatchEmbed()
    for module in model.modules():
        proj = getattr(module, "proj", None)
        if (
            type(module).__name__.endswith("PatchEmbed")
            and isinstance(proj, torch.nn.Conv3d)
            and tuple(proj.stride) == tuple(proj.kernel_size)
            and tuple(proj.padding) == (0, 0, 0)
            and proj.groups == 1
        ):
            module.forward = types.MethodType(forward, module)
            count += 1
    return count


def pad_vision_mlp(model: Any, multiple: int = 128) -> int:
    """Zero-pad the intermediate size of the Qwen2.5-VL vision MLPs to a multiple of `multiple`; returns how many.

    The vision tower's MLP width (3,420) is not a multiple of 8, so its rows are not 16-byte aligned and cuBLAS
    falls back to Ampere-era kernels that run those matmuls ~3x slower on Hopper. Extra gate/up rows of zeros
    give act(0) * 0 = 0, and the matching zero columns of the down projection add nothing: the output is the
    same. For inference only (a padded model must not be saved).
    """
    import torch

    count = 0
    for module in _vision_tower(model).modules():
        gate, up, down = (getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
        if not all(isinstance(m, torch.nn.Linear) for m in (gate, up, down)):
            continue
        width = gate.out_features
        pad = -width % multiple
        if pad == 0 or up.out_features != width or down.in_features != width:
            continue
        with torch.no_grad():
            for linear in (gate, up):
                w = linear.weight
                linear.weight = torch.nn.Parameter(torch.cat([w, w.new_zeros(pad, w.shape[1])]), requires_grad=False)
                if linear.bias is not None:
                    b = linear.bias
                    linear.bias = torch.nn.Parameter(torch.cat([b, b.new_zeros(pad)]), requires_grad=False)
                linear.out_features = width + pad
            w = down.weight
            down.weight = torch.nn.Parameter(torch.cat([w, w.new_zeros(w.shape[0], pad)], 1), requires_grad=False)
            down.in_features = width + pad
        if hasattr(module, "intermediate_size"):
            module.intermediate_size = width + pad
        count += 1
    return count


def _vision_tower(model: Any) -> Any:
    for path in ("model.visual", "visual", "model.vision_tower", "vision_tower"):
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is not None:
            return module
    import torch

    return torch.nn.Module()  # no vision tower: nothing to change


def _rotary_vision(q: Any, k: Any, cos: Any, sin: Any) -> Any:
    # transformers' apply_rotary_pos_emb_vision (float32 rotation, results in the input dtype), written so that
    # torch.compile turns it into one kernel per tensor instead of ~14 full passes over [tokens, heads, dim]
    import torch

    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()

    def rotate(x: Any) -> Any:
        x32 = x.float()
        half = x.shape[-1] // 2
        rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
        return (x32 * cos + rotated * sin).to(x.dtype)

    return rotate(q), rotate(k)


def _rms_norm(x: Any, weight: Any, eps: float) -> Any:
    # transformers' Qwen2.5-VL RMSNorm, as a function of its inputs
    import torch

    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _silu_mul(gate: Any, up: Any) -> Any:
    import torch.nn.functional as F

    return F.silu(gate) * up


class _CompiledOrEager:
    """`fn` compiled with dynamic shapes; if the compiler fails (e.g. no working Triton), `fn` itself from then on.

    Inputs of a new kind (rank, dtype, device, grad mode) compile a new variant; past torch's recompile limit for
    `fn` (8 variants: a process that describes, scores and trains with two models can meet more) inputs of that
    kind run eagerly, and the variants already compiled keep running compiled."""

    def __init__(self, fn: Any, backend: str) -> None:
        import torch

        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)
        self.eager_kinds: set[tuple[Any, ...]] = set()

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.fn(*args)
        if self.eager_kinds and _input_kind(args) in self.eager_kinds:  # the kind is only needed past the limit
            return self.fn(*args)
        try:
            return self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - only compiler failures are caught, see below
            from torch._dynamo.exc import BackendCompilerFailed, FailOnRecompileLimitHit, TorchRuntimeError

            if isinstance(err, FailOnRecompileLimitHit):
                self.eager_kinds.add(_input_kind(args))
                return self.fn(*args)
            if not isinstance(err, (BackendCompilerFailed, TorchRuntimeError)):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"capdpo: torch.compile failed for {self.fn.__name__}, running it eagerly ({first})", flush=True)
            self.compiled = None
            return self.fn(*args)


def _input_kind(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a compiled variant is specialised on (sizes are dynamic, so they are left out)."""
    import torch

    return (
        torch.is_grad_enabled(),
        *((a.dim(), a.dtype, a.device.type, a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args),
    )


_COMPILED: dict[tuple[str, str], _CompiledOrEager] = {}


def _compiled(fn: Any, backend: str) -> _CompiledOrEager:
    key = (fn.__name__, backend)
    if key not in _COMPILED:
        _COMPILED[key] = _CompiledOrEager(fn, backend)
    return _COMPILED[key]


def fuse_vision_elementwise(model: Any, backend: str = "inductor") -> int:
    """Run the vision tower's rotary embedding, RMSNorms and SiLU gating as compiled elementwise kernels.

    At batch 256 the tower spends about half its time in elementwise passes over [262k tokens, 1280] tensors
    (the rotary embedding alone is ~14 passes in float32 per layer). Each function is compiled once with dynamic
    shapes (the matmuls and attention stay eager), so any batch or image size reuses it. Returns how many modules
    were changed.
    """
    import types

    rotary = _compiled(_rotary_vision, backend)
    count = 0
    for module in _vision_tower(model).modules():
        name = type(module).__name__
        if name.endswith("VisionAttention"):
            module.capdpo_rotary = rotary
        elif name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_norm_forward(backend), module)
        elif hasattr(module, "gate_proj") and getattr(getattr(module, "config", None), "hidden_act", "silu") == "silu":
            if type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
                module.forward = types.MethodType(_fused_mlp_forward(backend), module)
            else:
                continue
        else:
            continue
        count += 1
    return count


# language-model modules whose forward is exactly `_rms_norm` or `down(silu(gate(x)) * up(x))` (transformers 5.23)
_TEXT_NORMS = {"Qwen2_5_VLRMSNorm", "Qwen2VLRMSNorm", "Qwen3VLTextRMSNorm", "LlamaRMSNorm"}
_TEXT_MLPS = {"Qwen2MLP", "Qwen3VLTextMLP", "LlamaMLP"}


def fuse_text_elementwise(model: Any, backend: str = "inductor") -> int:
    """Run the language model's RMSNorms and SiLU gating as compiled elementwise kernels; returns how many modules.

    A prefill of 256 captions is ~74k tokens: each RMSNorm makes ~8 float32 passes over [74k, 3584] and each MLP
    3 passes over [74k, 18944] for its gating, where one fused kernel reads and writes each tensor once. In decode
    steps the same kernels replace ~500 small launches per step. Shapes are dynamic; a new shape (e.g. the first
    one-token decode step) compiles on its first, eager call, so a CUDA graph capture never compiles.
    """
    import types

    count = 0
    for module in _language_model(model).modules():
        name = type(module).__name__
        if name in _TEXT_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_norm_forward(backend), module)
        elif name in _TEXT_MLPS and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
            module.forward = types.MethodType(_fused_mlp_forward(backend), module)
        else:
            continue
        count += 1
    return count


def _fused_norm_forward(backend: str) -> Any:
    norm = _compiled(_rms_norm, backend)

    def forward(self: Any, x: Any) -> Any:
        return norm(x, self.weight, self.variance_epsilon)

    return forward


def _fused_mlp_forward(backend: str) -> Any:
    gating = _compiled(_silu_mul, backend)

    def forward(self: Any, x: Any) -> Any:
        return self.down_proj(gating(self.gate_proj(x), self.up_proj(x)))

    return forward


def _language_model(model: Any) -> Any:
    for path in ("model.language_model", "language_model"):
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is not None:
            return module
    import torch

    return torch.nn.Module()  # not a VLM of a known layout: nothing to change


def tune_for_cuda_inference(model: Any) -> None:
    """capdpo's inference-only speed-ups on CUDA, each computing the same function as the module it replaces
    (measured by bench/breakdown.py). CAPDPO_NO_COMPILE=1 leaves out the compiled parts."""
    import os

    from torch.utils._triton import has_triton

    linear_patch_embedding(model)
    pad_vision_mlp(model)
    if has_triton() and os.environ.get("CAPDPO_NO_COMPILE", "0") != "1":
        fuse_vision_elementwise(model)
        fuse_text_elementwise(model)
