"""Speed-ups applied to a loaded VLM: each replaces a module's forward with one computing the same
function faster (measured by bench/breakdown.py; tested equal to the unpatched model in fp32).

* `use_grouped_vision_attention`: Qwen-VL vision attention with equal-length windows batched into one SDPA call.
* `linear_patch_embedding`: the Conv3d patch embedding as one matmul.
* `pad_vision_mlp`: the vision MLP's width padded with zeros to a multiple of 128 (aligned Hopper kernels).
* `fuse_vision_elementwise` / `fuse_text_elementwise`: rotary, RMSNorm and SiLU gating as compiled kernels.
* `fuse_text_projections`: each decoder layer's q/k/v projections as one GEMM, and its gate/up projections as one.
* `compile_decoder_layers` / `compile_vision_blocks`: each layer or block compiled whole, with an eager fallback
  (the first is training's `compile_layers`; the second is timed by `bench/generate.py --compile`).

`tune_for_cuda_inference` applies them on CUDA; `capdpo.models.loading` calls it for every inference model.
`tune_for_training` applies the patch embedding and the padding (while the vision tower is frozen), the compiled
ones and `capdpo.models.lora.fuse_lora_updates` to a model being trained.
"""

from __future__ import annotations

import functools
from typing import Any

from capdpo.models.lora import zero3_partitioned


def _windows(t: Any, n: int, length: int) -> Any:
    """[n * length, heads, dim] -> [n, heads, length, dim]."""
    return t.view(n, length, *t.shape[1:]).transpose(1, 2)


def _window_plan(cu_seqlens: Any) -> dict[int, Any]:
    """Window length -> [start offsets, their token index (made on first use)] from a vision forward's cumulative
    window lengths. Worked out once per tensor: every block of one forward gets the same one (or two: windowed and
    full attention), and reading it from the device waits for all the work queued before it."""
    plan = getattr(cu_seqlens, "_capdpo_window_plan", None)
    if plan is None:
        bounds = cu_seqlens.tolist()
        plan = {}
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                plan.setdefault(end - start, [[], None])[0].append(start)
        cu_seqlens._capdpo_window_plan = plan
    return plan


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
        out = torch.empty_like(q)
        for length, entry in _window_plan(cu_seqlens).items():
            starts, index = entry
            n = len(starts)
            if n * length == seq_length:  # one size tiles the whole sequence: views, no copies
                o = F.scaled_dot_product_attention(*(_windows(t, n, length) for t in (q, k, v)), scale=self.scaling)
                out = o.transpose(1, 2).reshape(seq_length, *q.shape[1:])
                break
            if index is None or index.device != q.device:
                index = torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)
                entry[1] = index = index.reshape(-1)
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
    same. The module's `state_dict` and `load_state_dict` keep the original width (the padding is cut off on the
    way out and added on the way in), so a padded model saves and loads like the original. For frozen weights
    only: the parameters are replaced and lose `requires_grad`.
    """
    import torch

    count = 0
    for module in _vision_tower(model).modules():
        gate, up, down = (getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
        if not all(type(m) is torch.nn.Linear and not zero3_partitioned(m.weight) for m in (gate, up, down)):
            continue  # plain weights only: not quantized, wrapped by PEFT or partitioned by ZeRO-3
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
        module.register_state_dict_post_hook(functools.partial(_unpad_mlp_state, width=width, pad=pad))
        module.register_load_state_dict_pre_hook(functools.partial(_pad_mlp_state, width=width, pad=pad))
        count += 1
    return count


# the state-dict view of a padded vision MLP: parameter name -> the dimension that was padded
_PADDED_DIMS = {
    "gate_proj.weight": 0,
    "gate_proj.bias": 0,
    "up_proj.weight": 0,
    "up_proj.bias": 0,
    "down_proj.weight": 1,
}


def _unpad_mlp_state(module: Any, state: dict, prefix: str, metadata: Any, *, width: int, pad: int) -> None:
    """`state_dict` post-hook: the original width out."""
    for name, dim in _PADDED_DIMS.items():
        key = prefix + name
        if key in state and state[key].shape[dim] == width + pad:
            state[key] = state[key].narrow(dim, 0, width).contiguous()


def _pad_mlp_state(module: Any, state: dict, prefix: str, *args: Any, width: int, pad: int) -> None:
    """`load_state_dict` pre-hook: a state of the original width padded with zeros to the module's."""
    import torch

    for name, dim in _PADDED_DIMS.items():
        value = state.get(prefix + name)
        if value is not None and value.shape[dim] == width:
            shape = list(value.shape)
            shape[dim] = pad
            state[prefix + name] = torch.cat([value, value.new_zeros(shape)], dim)


def _submodule(model: Any, paths: tuple[str, ...]) -> Any:
    """The first of the dotted `paths` that `model` has; an empty module (nothing to change) where it has none."""
    for path in paths:
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is not None:
            return module
    import torch

    return torch.nn.Module()


def _vision_tower(model: Any) -> Any:
    return _submodule(model, ("model.visual", "visual", "model.vision_tower", "vision_tower"))


def vision_parameters(model: Any) -> list[Any]:
    """The parameters that make the image features: the vision tower's and LLaVA's projector's (outside its tower);
    none for a model without a tower. Read when needed: LoRA on the tower adds parameters."""
    projector = _submodule(model, ("model.multi_modal_projector", "multi_modal_projector"))
    return [*_vision_tower(model).parameters(), *projector.parameters()]


def vision_frozen(model: Any) -> bool:
    """Whether no parameter of `vision_parameters` trains or is partitioned by ZeRO-3 (true without a tower): the
    image features are then fixed, and the tower's modules may be changed (`model`: the transformers model)."""
    return not any(p.requires_grad or zero3_partitioned(p) for p in vision_parameters(model))


def _rotary_vision(q: Any, k: Any, cos: Any, sin: Any) -> Any:
    # transformers' apply_rotary_pos_emb_vision (float32 rotation, results in the input dtype), written so that
    # torch.compile turns it into one kernel per tensor instead of ~14 full passes over [tokens, heads, dim]
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()

    def rotate(x: Any) -> Any:
        x32 = x.float()
        return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)

    return rotate(q), rotate(k)


def _rotate_half(x: Any) -> Any:
    # transformers' rotate_half: the two halves of the last dimension swapped, the new first half negated
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary_text(q: Any, k: Any, cos: Any, sin: Any) -> Any:
    # transformers' apply_rotary_pos_emb with unsqueeze_dim=1 (q, k [batch, heads, tokens, dim]; cos, sin [batch,
    # tokens, dim]): eagerly two multiplies, a negation, a concatenation and an add per tensor
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


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
    """`fn` compiled; if the compiler fails (e.g. no working Triton), `fn` itself from then on.

    The first call compiles for its sizes; a size that then changes becomes symbolic in one recompile (torch's
    automatic dynamic shapes), so the sizes that never change (hidden width, heads, head dim) stay constants the
    kernels are specialised on: at the prefill's shapes that runs these kernels 1.2-3.9x faster than with every size
    symbolic (H100, `bench/results/ops_h100_2026-12-07_5.json`). Each call site (`site`) compiles its own copy of
    `fn`, so that one site's inputs (the vision tower's rank-2 tensors) do not make another's sizes symbolic.

    Inputs of a new kind (rank, dtype, device, grad mode) compile a new variant; past torch's recompile limit for
    the site (8 variants: a process that describes, scores and trains with two models can meet more) inputs of that
    kind run eagerly, and the variants already compiled keep running compiled."""

    def __init__(self, fn: Any, backend: str, site: str = "") -> None:
        import torch

        self.fn = fn
        self.compiled = torch.compile(_site_copy(fn, site), fullgraph=True, backend=backend)
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


def _site_copy(fn: Any, site: str) -> Any:
    """`fn` itself, or for a `site` a copy with code of its own (torch keeps what it learns about the sizes per code
    object)."""
    import types

    if not site:
        return fn
    code = fn.__code__.replace(co_name=f"{fn.__name__}__{site}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _input_kind(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a compiled variant is specialised on, less the sizes (a changing size becomes symbolic)."""
    import torch

    return (
        torch.is_grad_enabled(),
        *((a.dim(), a.dtype, a.device.type, a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args),
    )


_COMPILED: dict[tuple[str, str, str, str], _CompiledOrEager] = {}


def compiled_or_eager(fn: Any, backend: str = "inductor", site: str = "") -> _CompiledOrEager:
    """`fn` compiled once per process and call site (sizes that change symbolic, one graph each), falling back to
    `fn` where compiling fails."""
    key = (fn.__module__, fn.__name__, backend, site)
    if key not in _COMPILED:
        _COMPILED[key] = _CompiledOrEager(fn, backend, site)
    return _COMPILED[key]


def fuse_vision_elementwise(model: Any, backend: str = "inductor") -> int:
    """Run the vision tower's rotary embedding, RMSNorms and SiLU gating as compiled elementwise kernels.

    At batch 256 the tower spends about half its time in elementwise passes over [262k tokens, 1280] tensors
    (the rotary embedding alone is ~14 passes in float32 per layer). Each function is compiled for the tower
    (`_CompiledOrEager`: the token count becomes symbolic once it changes, widths stay constants; the matmuls and
    attention stay eager), so any batch or image size reuses it. Returns how many modules were changed.
    """
    import types

    rotary = compiled_or_eager(_rotary_vision, backend, "vision")
    count = 0
    for module in _vision_tower(model).modules():
        name = type(module).__name__
        if name.endswith("VisionAttention"):
            module.capdpo_rotary = rotary
        elif name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_norm_forward(backend, "vision"), module)
        elif hasattr(module, "gate_proj") and getattr(getattr(module, "config", None), "hidden_act", "silu") == "silu":
            if type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
                module.forward = types.MethodType(_fused_mlp_forward(backend, "vision"), module)
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
    """Run the language model's RMSNorms, SiLU gating and rotary embedding as compiled elementwise kernels; returns
    how many modules (norms and MLPs; the rotary embedding is a function of the modeling file, see
    `_fuse_text_rotary`).

    A prefill of 256 captions is ~74k tokens: each RMSNorm makes ~8 float32 passes over [74k, 3584] and each MLP
    3 passes over [74k, 18944] for its gating, where one fused kernel reads and writes each tensor once. In decode
    steps the same kernels replace ~500 small launches per step. Sizes that change become symbolic (rows, tokens;
    one recompile each, and one for the one-token decode step, which torch specialises), widths stay constants; a
    new shape compiles on its first, eager call (the prefill, the first decode step), so a CUDA graph capture never
    compiles.
    """
    import types

    language_model = _language_model(model)
    _fuse_text_rotary(language_model, backend)
    count = 0
    for module in language_model.modules():
        name = type(module).__name__
        if name in _TEXT_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_norm_forward(backend, "text"), module)
        elif name in _TEXT_MLPS and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
            module.forward = types.MethodType(_fused_mlp_forward(backend, "text"), module)
        else:
            continue
        count += 1
    return count


def _fuse_text_rotary(language_model: Any, backend: str) -> list[str]:
    """Point the `apply_rotary_pos_emb` of each attention module's modeling file at one compiled kernel per tensor
    (the attention forward looks the function up there on every call, so this holds for every model of that family
    in the process; the function computed is the same). Returns the modeling modules changed."""
    import inspect
    import sys

    fused = compiled_or_eager(_rotary_text, backend, "text")
    changed: list[str] = []
    for module in language_model.modules():
        home = sys.modules.get(type(module).__module__)
        if not type(module).__name__.endswith("Attention") or home is None or home.__name__ in changed:
            continue
        plain = getattr(home, "apply_rotary_pos_emb", None)
        plain = getattr(plain, "capdpo_plain", plain)
        if plain is None or list(inspect.signature(plain).parameters) != ["q", "k", "cos", "sin", "unsqueeze_dim"]:
            continue

        def rotary(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1, plain: Any = plain) -> Any:
            return fused(q, k, cos, sin) if unsqueeze_dim == 1 else plain(q, k, cos, sin, unsqueeze_dim)

        rotary.capdpo_plain = plain  # type: ignore[attr-defined]
        home.apply_rotary_pos_emb = rotary
        changed.append(home.__name__)
    return changed


def _fused_norm_forward(backend: str, site: str) -> Any:
    norm = compiled_or_eager(_rms_norm, backend, site)

    def forward(self: Any, x: Any) -> Any:
        return norm(x, self.weight, self.variance_epsilon)

    return forward


def _fused_mlp_forward(backend: str, site: str) -> Any:
    gating = compiled_or_eager(_silu_mul, backend, site)

    def forward(self: Any, x: Any) -> Any:
        return self.down_proj(gating(self.gate_proj(x), self.up_proj(x)))

    return forward


# inputs of up to this many rows (tokens) run as one joined GEMM: decode steps, and other small inputs. A prefill's
# GEMMs are large enough apart, and its SiLU gating then reads two contiguous outputs instead of strided halves of
# one (joined, the prefill was slower: 4.93 -> 5.10 s per 512 images, H100, bench/results/decode_h100_2026-12-07_3.json)
JOINED_GEMM_MAX_ROWS = 4096


class _SharedInputGemm:
    """Linear layers that read one input, in a fixed order, as one GEMM over their weights laid end to end.

    For an input of at most `JOINED_GEMM_MAX_ROWS` rows, the first layer's call runs the whole GEMM and keeps its
    output; each later layer called with that same tensor returns its columns of it (the last one drops it), and
    called with any other input computes alone. Larger inputs run each layer alone. The layers' own weights become
    views of the joined ones, so the model keeps its parameters, names and memory."""

    def __init__(self, layers: list[Any]) -> None:
        import torch

        self.weight = torch.cat([layer.weight.detach() for layer in layers])
        biases = [layer.bias for layer in layers]
        self.bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
        self.pending: tuple[Any, Any] | None = None
        start = 0
        for index, layer in enumerate(layers):
            end = start + layer.out_features
            layer.weight.data = self.weight[start:end]
            if self.bias is not None:
                layer.bias.data = self.bias[start:end]
            layer.forward = functools.partial(self._forward, layer, start, end, index, len(layers))
            start = end

    def _forward(self, layer: Any, start: int, end: int, index: int, count: int, x: Any) -> Any:
        import torch.nn.functional as F

        if x.numel() > JOINED_GEMM_MAX_ROWS * x.shape[-1]:  # a prefill: each layer on its own rows of the weights
            return F.linear(x, layer.weight, layer.bias)
        if index == 0:
            out = F.linear(x, self.weight, self.bias)
            self.pending = (x, out)
            return out[..., start:end]
        pending = self.pending
        if pending is None or pending[0] is not x:
            return F.linear(x, layer.weight, layer.bias)
        if index == count - 1:
            self.pending = None
        return pending[1][..., start:end]


def fuse_text_projections(model: Any) -> int:
    """Run each decoder layer's query/key/value projections as one GEMM, and its MLP's gate and up projections as
    another; returns how many groups. For inference only (the joined weights are not trained).

    In a decode step of 512 rows the key and value projections (512 outputs each for Qwen2.5-VL-7B's 4 key/value
    heads) fill a few of the GPU's SMs; joined with the query projection they run in the same waves (a prefill runs
    them apart, see `JOINED_GEMM_MAX_ROWS`). Layers that are
    not plain `torch.nn.Linear` of one input width and dtype (LoRA layers, quantized ones) are left alone. Apply it
    once the model is on its device and dtype: the joined weights are not parameters, so a later `.to()` leaves them."""
    import torch

    if getattr(model, "hf_quantizer", None) is not None:
        return 0
    count = 0
    for module in _language_model(model).modules():
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            layers = [getattr(module, name, None) for name in names]
            if any(type(layer) is not torch.nn.Linear for layer in layers):
                continue
            if len({(layer.in_features, layer.weight.dtype, layer.weight.device) for layer in layers}) != 1:
                continue
            if any((layer.bias is None) != (layers[0].bias is None) for layer in layers):
                continue
            if "forward" in layers[0].__dict__:  # patched already
                continue
            with torch.no_grad():
                _SharedInputGemm(layers)
            count += 1
    return count


def _language_model(model: Any) -> Any:
    return _submodule(model, ("model.language_model", "language_model"))


def compiling_on_cuda() -> bool:
    """Whether capdpo's compiled (inductor) kernels run on CUDA: Triton is there and CAPDPO_NO_COMPILE=1 is not set."""
    import os

    from torch.utils._triton import has_triton

    return os.environ.get("CAPDPO_NO_COMPILE", "0") != "1" and has_triton()


def tune_for_cuda_inference(model: Any) -> None:
    """capdpo's inference-only speed-ups on CUDA, each computing the same function as the module it replaces
    (measured by bench/breakdown.py). CAPDPO_NO_COMPILE=1 leaves out the compiled parts."""
    linear_patch_embedding(model)
    pad_vision_mlp(model)
    fuse_text_projections(model)
    if compiling_on_cuda():
        fuse_vision_elementwise(model)
        fuse_text_elementwise(model)


def compile_decoder_layers(model: Any, backend: str = "inductor") -> int:
    """Compile each decoder layer of the language model with `torch.compile` (dynamic shapes); returns how many.

    The compiled region is the layer's whole call, gradient checkpointing included: dynamo traces the checkpoint as
    one region, so the layer's forward, its recomputation and its backward each run as one compiled graph instead of
    hundreds of separately launched operators (the host time between them is what a DPO step waits on). The layers
    share one graph (their parameters are inputs to it). The first steps pay the compilation; if compiling a layer's
    call fails (its forward graph or its backward graph, compiled together with the forward one), every layer runs
    eagerly from then on. Quantized (QLoRA) and ZeRO-3-partitioned models are left eager.
    """
    language_model = _language_model(model)
    layers = list(getattr(language_model, "layers", None) or [])
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_loaded_in_4bit", False):
        return 0  # bitsandbytes' 4-bit matmuls are not traced
    if any(zero3_partitioned(p) for p in language_model.parameters()):
        return 0  # ZeRO-3 gathers each module's weights in hooks around its call
    return _compile_each(layers, backend, "the decoder layers")


def compile_vision_blocks(model: Any, backend: str = "inductor") -> int:
    """Compile each block of the vision tower with `torch.compile` (dynamic shapes, for inference); returns how many.

    The residual adds, norms, rotary embedding and gating on either side of the attention can fuse with each other
    instead of each making its own passes over [tokens, 1280] tensors. The grouped attention reads its window layout
    from the device (`_window_plan`), so each block compiles as the graphs before and after that read, shared by all
    blocks. If compiling fails, every block runs eagerly from then on. A ZeRO-3-partitioned tower is left eager."""
    tower = _vision_tower(model)
    blocks = list(getattr(tower, "blocks", None) or []) if tower is not None else []
    if any(zero3_partitioned(p) for b in blocks for p in b.parameters()):
        return 0
    return _compile_each(blocks, backend, "the vision blocks")


# how `_compile_each` compiles: True makes every size of a layer's graph symbolic (widths, heads included); None
# (torch's automatic dynamic shapes) specialises the first call's sizes and makes only those that later change
# symbolic. `bench/train_gpu.py --layers-changing-sizes` and `bench/generate.py --compile` time the second.
LAYER_SIZES_SYMBOLIC: bool | None = True


def _compile_each(modules: list[Any], backend: str, label: str) -> int:
    """Compile each module's whole call (sharing one graph); a compiler failure makes all of them eager."""
    import torch
    import torch._functorch.config as functorch_config

    # the backward graph compiled with the forward one, so a failure of either is caught by the call below (lazily,
    # it would be compiled in the middle of the first backward pass, where no eager fallback can take over)
    with_backward = functorch_config.patch(force_non_lazy_backward_lowering=True)
    state = {"eager": False, "label": label}
    for module in modules:
        if getattr(module, "_compiled_call_impl", None) is None:
            compiled = with_backward(torch.compile(module._call_impl, backend=backend, dynamic=LAYER_SIZES_SYMBOLIC))
            module._compiled_call_impl = functools.partial(_compiled_or_eager_call, module, compiled, state)
    return len(modules)


def _compiled_or_eager_call(layer: Any, compiled: Any, state: dict, *args: Any, **kwargs: Any) -> Any:
    if state["eager"]:
        return layer._call_impl(*args, **kwargs)
    try:
        return compiled(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - only compiler failures are caught
        from torch._dynamo.exc import BackendCompilerFailed

        if not isinstance(err, BackendCompilerFailed):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"capdpo: torch.compile failed for {state['label']}, running them eagerly ({first})", flush=True)
        state["eager"] = True
        return layer._call_impl(*args, **kwargs)


def tune_for_training(
    model: Any, cuda: bool, backend: str = "inductor", compile_layers: bool = False
) -> dict[str, int]:
    """capdpo's training speed-ups, each the same function as the module it replaces (tested equal in fp32, gradients
    included): the LoRA update inside the B GEMM everywhere; the frozen vision tower's patch embedding as a matmul and
    its MLP padded to an aligned width (not under ZeRO-3); on CUDA with Triton also the language model's norms and
    gating and the (frozen) vision tower's elementwise parts as compiled kernels, which autograd and activation
    recomputation run like any other function; with `compile_layers` each language-model layer compiled whole
    (`compile_decoder_layers`). CAPDPO_NO_COMPILE=1 leaves out the compiled parts. Returns how many modules each
    changed."""
    import os

    from capdpo.models.lora import fuse_lora_updates

    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # inside a PeftModel
    changed = {"lora": fuse_lora_updates(model)}
    if vision_frozen(model):
        # the frozen vision tower's exact inference tunings (the padded width never reaches a saved file)
        changed["patch_embedding"] = linear_patch_embedding(model)
        changed["vision_mlp"] = pad_vision_mlp(model)
    if os.environ.get("CAPDPO_NO_COMPILE", "0") == "1" or (
        backend == "inductor" and not (cuda and compiling_on_cuda())
    ):
        return changed  # inductor's kernels only on CUDA (other backends: tests on CPU)
    changed["text"] = fuse_text_elementwise(model, backend)
    changed["vision"] = fuse_vision_elementwise(model, backend)
    if compile_layers:
        changed["compiled_layers"] = compile_decoder_layers(model, backend)
    return changed
