"""A lean decoding loop: one prefill, then fixed-shape decode steps on a static KV cache.

`transformers.generate` spends most of a decode step outside the model at large batch (cache concatenation,
logits processors, stopping checks, position bookkeeping). Here a decode step is one call of the text decoder on
a static cache with explicit positions, a constant attention mask and the sampler; every tensor has a fixed shape,
so on CUDA the step can be captured as a CUDA graph and replayed. Greedy outputs are token-identical to
`generate` (checked in fp32 by the tests); sampling uses the same per-row Gumbel noise as `SeededSampler`.
Qwen-VL's 3-D rope positions for the prefill come from `capdpo.generation.rope` (batched on the device) instead of the
model's per-row loop.

With `window_step` > 0 a decode step's attention reads the keys and values of a window of the cache, not all of
it: the prompt and the next `window_step` generated positions, widened by `window_step` when the tokens reach its
end (one CUDA graph per window). Each window costs an eager warm-up step and a capture for the first batch of a shape
(later batches of that shape replay the kept graphs), and with 128 new tokens on a ~280-token prompt the whole cache
is only ~20% longer than the average position a step needs, so the default reads the whole cache with one graph;
windows are for long answers. Each step writes its token's keys and values at the
slot its position names (`_DecodeLayer`), so running a step twice (a graph's warm-up, then its replay) writes the
same slot twice instead of shifting the rest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from capdpo.generation import decode_attention
from capdpo.generation.attention import folded_attention, sdpa_through
from capdpo.generation.rope import IMAGE_BATCH_KEYS, mrope_positions
from capdpo.generation.sampling import Generation, repetition_penalty, sampled_scores


class StaticDecoder:
    """Generates for one padded batch with a static cache; see the module docstring."""

    def __init__(
        self,
        lm: Any,
        use_cuda_graph: bool | None = None,
        prefill_rows: int = 0,
        window_step: int = 0,
        sampler_backend: str | None = "auto",
        decode_kernel: bool | None = None,
    ) -> None:
        """`prefill_rows`: rows per prefill forward (0: the whole batch at once). Decoding is memory-bound, so it
        runs best on far more rows than a prefill (vision + prompt) needs to fill the GPU; chunking the prefill
        lets one batch decode e.g. 1024 rows while vision and prompt activations stay those of 256.
        `window_step`: generated positions added to the attention window at a time (0: every step reads the whole
        cache).
        `sampler_backend`: the torch.compile backend `sampled_scores` runs on (None: eagerly; "auto": "inductor" on
        CUDA with Triton unless CAPDPO_NO_COMPILE=1, else eagerly).
        `decode_kernel`: decode steps attend through `capdpo.generation.decode_attention` (the written cache slots
        only) instead of SDPA over the whole window (None: on CUDA with Triton unless CAPDPO_NO_COMPILE=1; a step
        of 512 rows at 128 new tokens 19.98 -> 17.57 ms, H100). Tested equal to SDPA under Triton's interpreter."""
        self.lm = lm
        self.prefill_rows = prefill_rows
        self.window_step = window_step
        self.model = lm.model
        self.decoder = self.model.model.language_model
        self.embed = self.model.get_input_embeddings()
        self.head = self.model.get_output_embeddings()
        self.mrope = hasattr(self.model.model, "rope_deltas")
        self.use_cuda_graph = lm.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        from capdpo.models.patches import compiling_on_cuda

        compiling = lm.device.type == "cuda" and compiling_on_cuda()
        if sampler_backend == "auto":
            sampler_backend = "inductor" if compiling else None
        self.sampler_backend = sampler_backend
        self._session: _DecodeSession | None = None
        self.decode_kernel = compiling if decode_kernel is None else decode_kernel

    def generate(
        self,
        inputs: dict[str, Any],
        gen: Generation,
        seeds: list[int],
        eos_ids: list[int],
        pad_id: int,
        rows: Any = None,
    ) -> Any:
        """Token ids [B, n] generated after the prompt (rows padded with `pad_id` after their end of turn).

        `rows` (a LongTensor [B] of row indices into `inputs`, or None for `inputs`' own rows): the prompt each
        generated row continues. Rows that share a prompt share its prefill (vision tower and prompt run once, the
        cache rows copied), then decode apart with their own seeds.

        The cache and the tensors a decode step reads are kept for the next call of the same shape (rows, prompt
        length, new tokens), whose steps then replay the CUDA graphs already captured instead of capturing their own
        (each capture costs eager warm-up steps and a device synchronisation)."""
        try:
            return self._generate(inputs, gen, seeds, eos_ids, pad_id, rows)
        except BaseException:
            self._session = None  # e.g. out of memory half-way: the next call starts clean
            raise

    def release(self) -> None:
        """Drop the kept cache, step tensors and graphs (the next call builds them again)."""
        self._session = None

    def _generate(
        self, inputs: dict[str, Any], gen: Generation, seeds: list[int], eos_ids: list[int], pad_id: int, rows: Any
    ) -> Any:
        import torch
        from transformers import StaticCache

        input_ids = inputs["input_ids"]
        mask = inputs["attention_mask"]
        prompt_len = input_ids.shape[1]
        total = prompt_len + gen.max_new_tokens
        device = input_ids.device
        batch = len(rows) if rows is not None else input_ids.shape[0]
        # where rows share a prompt, the row whose prompt slots each row's decode attention reads: the first row of
        # its prompt (every row holds a copy; the rows of one prompt reading one of them can find it in L2). On the
        # device before the prefill is queued, so that neither reading `rows` nor the copy waits for it. Batches
        # without shared prompts keep the kernel that reads each row's own slots
        source = _first_rows(rows.tolist()) if rows is not None else None
        shared = source is not None and bool((source != torch.arange(batch)).any())
        source = source.to(device) if shared else None
        # what the kept graphs were captured for; the weights are read where they were at capture, so a caller
        # that replaces the model's tensors (not their values in place) calls release() first
        key = (
            batch, prompt_len, total, mask.dtype, str(device), self.decode_kernel,
            self.decoder.config._attn_implementation, shared,
        )  # fmt: skip
        session = self._session if self._session is not None and self._session.key == key else None
        self._session = None  # a session of another shape frees its cache before this call allocates
        # the prefill writes the kept cache's prompt slots (its answer slots are cleared below), or a new cache; with
        # `rows`, a new cache for the distinct prompts, whose rows are then copied into the kept one
        prefill_into_kept = session is not None and rows is None
        cache = session.cache if prefill_into_kept else StaticCache(config=self.model.config, max_cache_len=total)
        with torch.inference_mode(), masked_attention(self.decoder.config):
            if prefill_into_kept:
                for layer in cache.layers:
                    layer.keys[:, :, prompt_len:].zero_()
                    layer.values[:, :, prompt_len:].zero_()
            if self.mrope:
                self.model.model.rope_deltas = None
            extra, deltas = {}, None
            if not self.mrope or "pixel_values" not in inputs:
                # like generate: positions count real tokens, so left padding does not shift them
                extra["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
            else:
                # Qwen-VL's 3-D positions for the whole batch at once (the model's own get_rope_index loops over
                # rows on the host); None leaves them to the model
                rope = mrope_positions(self.model, inputs)
                if rope is not None:
                    extra["position_ids"], deltas = rope
            logits, model_deltas = self._prefill(inputs, extra, cache, total)
            deltas = model_deltas if deltas is None else deltas
            deltas = deltas.view(-1) if deltas is not None else torch.zeros(len(mask), dtype=torch.long, device=device)
            if rows is not None:
                rows = rows.to(device)
                input_ids, mask, logits, deltas = input_ids[rows], mask[rows], logits[rows], deltas[rows]
                if session is not None:  # the prompts' cache rows copied into the kept cache
                    for small, kept in zip(cache.layers, session.cache.layers):
                        torch.index_select(small.keys, 0, rows, out=kept.keys)
                        torch.index_select(small.values, 0, rows, out=kept.values)
                        kept.cumulative_length.fill_(prompt_len)
                    cache = session.cache
                else:
                    _select_cache_rows(cache, rows)
            windowed = _static_layers(cache)
            if session is None:
                session = _DecodeSession(key, cache, batch, total, mask.dtype, device, logits.shape[-1])
            session.full_mask[:, :prompt_len] = mask  # generated positions are all real; causality hides the rest
            if shared:
                session.source.copy_(source)
            session.real_len.copy_(mask.sum(-1))
            session.deltas.copy_(deltas)
            finished = torch.zeros(batch, dtype=torch.bool, device=device)
            seen = torch.zeros(batch, logits.shape[-1], dtype=torch.bool, device=device)
            if gen.repetition_penalty != 1.0:
                seen.scatter_(1, input_ids, True)  # like transformers: every prompt token counts
            seed_t = torch.tensor(seeds, dtype=torch.long, device=device)
            eos_t = torch.tensor(eos_ids, dtype=torch.long, device=device)
            tokens = torch.full((batch, gen.max_new_tokens), pad_id, dtype=torch.long, device=device)

            def select(logits: Any) -> Any:
                scores = logits
                if gen.repetition_penalty != 1.0:
                    scores = repetition_penalty(scores, seen, gen.repetition_penalty)
                if gen.temperature > 0:
                    scores = sampled_scores(scores, seed_t, session.step, gen, self.sampler_backend)
                token = scores.argmax(-1)
                token = torch.where(finished, torch.full_like(token, pad_id), token)
                finished.logical_or_(torch.isin(token, eos_t))
                if gen.repetition_penalty != 1.0:
                    seen.scatter_(1, token[:, None], True)
                return token

            if windowed:  # the same tensors, written at the slot `position` names and read up to a window
                layers = cache.layers
                cache.layers = [_decode_layer_class()(layer, session.position) for layer in layers]
            session.step.zero_()
            session.token.copy_(select(logits))  # in place: a captured graph reads this memory
            tokens[:, 0] = session.token
            # a graph per window, kept in the session (a capture that failed is not retried for this shape). The graphs
            # share one memory pool: they run one at a time and each writes its logits into the session's buffer. A
            # cache whose layers are not plain static ones is read whole and decoded eagerly (its write slot follows
            # its own counter) and is not kept
            capture = self.use_cuda_graph and windowed
            if capture and session.pool is None:
                session.pool = torch.cuda.graph_pool_handle()
            with decode_steps_attention(self.decoder.config, self.decode_kernel and windowed):
                for t in range(1, gen.max_new_tokens):
                    # write the previous token into the cache at position prompt_len + t - 1, read the next
                    session.step.fill_(t - 1)
                    window = total
                    if windowed and self.window_step > 0:
                        window = min(total, prompt_len + -(-t // self.window_step) * self.window_step)
                    if capture and t >= 3 and window not in session.graphs:
                        session.graphs[window] = _capture(
                            lambda w=window: self._decode_step(session, w, windowed), session.pool
                        )
                    graph = session.graphs.get(window)
                    if graph is not None:
                        graph.replay()
                    else:
                        self._decode_step(session, window, windowed)
                    session.step.fill_(t)
                    session.token.copy_(select(session.logits))
                    tokens[:, t] = session.token
                    if t % 16 == 0 and bool(finished.all()):
                        break
            if windowed:
                cache.layers = layers
                self._session = session
        return tokens

    def _decode_step(self, session: _DecodeSession, window: int, windowed: bool) -> None:
        """One decode step on `session`'s tensors (all of them read and written in place, so a captured graph replays
        it for any batch copied into them): writes the token of `session.step` into the cache and the next logits
        [B, V] (float32) into `session.logits`."""
        import torch

        batch = session.token.shape[0]
        # the token chosen at step t sits at cache position prompt_len + t
        position_ids = (session.real_len + session.step + session.deltas).view(1, batch, 1)
        position_ids = position_ids.expand(3, batch, 1) if self.mrope else position_ids.view(batch, 1)
        if windowed:
            torch.add(session.step, session.key[1], out=session.position)
            for layer in session.cache.layers:
                layer.window = window
        source = session.source if session.shared else None
        step = decode_attention.decode_attention_end(session.position, source, session.key[1])
        with step if windowed else contextlib.nullcontext():
            hidden = self.decoder(
                inputs_embeds=self.embed(session.token.view(batch, 1)),
                position_ids=position_ids,
                attention_mask=session.full_mask[:, :window],
                past_key_values=session.cache,
                use_cache=True,
            ).last_hidden_state
        session.logits.copy_(self.head(hidden[:, -1]))  # float32, in one buffer every window's graph shares

    def _prefill(self, inputs: dict[str, Any], extra: dict[str, Any], cache: Any, total: int) -> tuple[Any, Any]:
        """Fill `cache` with the prompts (in chunks of `prefill_rows` rows where possible); returns the
        last-position logits [B, V] (float32) and the Qwen-VL rope deltas [B, 1] (None for other models)."""
        import torch

        batch, prompt_len = inputs["input_ids"].shape
        if not _static_layers(cache):
            out = self.model(**inputs, **extra, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float(), getattr(self.model.model, "rope_deltas", None)
        chunks = _row_chunks(inputs, self.prefill_rows, self.model.config) if 0 < self.prefill_rows < batch else None
        logits, deltas = [], []
        # the prompt attends to its own keys only (not the cache's empty slots for the answer), and with left padding
        # (a mask) on the grouped-query SDPA without per-head key/value copies
        with folded_attention(self.decoder.config):
            for (start, end), part in chunks or [((0, batch), inputs)]:
                if self.mrope:
                    self.model.model.rope_deltas = None
                # position ids are [B, L], or [3, B, L] for Qwen-VL's 3-D positions
                part_extra = {k: v[start:end] if v.dim() == 2 else v[:, start:end] for k, v in extra.items()}
                view = _cache_rows(cache, start, end, batch, total, prompt_len, self.model.config)
                out = self.model(**part, **part_extra, past_key_values=view, use_cache=True, logits_to_keep=1)
                logits.append(out.logits[:, -1].float())
                part_deltas = getattr(self.model.model, "rope_deltas", None)
                deltas.append(part_deltas.view(end - start, 1) if part_deltas is not None else None)
        for layer in cache.layers:
            layer.cumulative_length.fill_(prompt_len)
        joined = torch.cat(deltas) if all(d is not None for d in deltas) else None
        return torch.cat(logits), joined


@contextlib.contextmanager
def masked_attention(config: Any) -> Iterator[None]:
    """The language model on SDPA while decoding on a static cache (eager stays eager).

    A decode step gives one fixed-shape mask over the whole cache and relies on causality to hide the positions not
    written yet. FlashAttention's path reads a 2-D mask as "these keys are real" and aligns causality to the last
    key, so it would attend to those empty positions; SDPA and eager build the causal mask from the positions.
    """
    current = config._attn_implementation
    if current in ("sdpa", "eager"):
        yield
        return
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = current


def decode_steps_attention(config: Any, kernel: bool) -> Any:
    """Inside the block (the decode loop), a model on SDPA attends through `decode_attention.DECODE_SDPA` when
    `kernel`: its one-query steps inside `decode_attention_end` run the kernel, anything else runs SDPA."""
    if not kernel:
        return contextlib.nullcontext(False)
    return sdpa_through(config, decode_attention.DECODE_SDPA, decode_attention.decode_sdpa_attention)


def _first_rows(prompts: Any) -> Any:
    """For each row (`prompts`: the index of its prompt), the index of the first row with the same prompt, as a
    LongTensor on the host."""
    import torch

    first: dict[int, int] = {}
    return torch.tensor([first.setdefault(int(p), i) for i, p in enumerate(prompts)], dtype=torch.long)


def _select_cache_rows(cache: Any, rows: Any) -> None:
    """Make a filled cache's rows `cache[rows]` (a row repeated where `rows` names it more than once)."""
    import torch

    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)
        layer.batch_size = len(rows)
        torch._dynamo.mark_static_address(layer.keys)  # as the cache marks the tensors it allocates
        torch._dynamo.mark_static_address(layer.values)


def _static_layers(cache: Any) -> bool:
    from transformers.cache_utils import StaticLayer

    return all(type(layer) is StaticLayer for layer in cache.layers)


def _row_chunks(inputs: dict[str, Any], rows: int, config: Any) -> list[tuple[tuple[int, int], dict[str, Any]]] | None:
    """`inputs` split into chunks of `rows` rows, each with its own images' pixel rows; None when the inputs have
    parts this split does not know (videos, or image tensors not laid out as Qwen-VL's patch rows)."""
    if set(inputs) - IMAGE_BATCH_KEYS:
        return None
    batch = inputs["input_ids"].shape[0]
    image_rows: list[tuple[int, int]] = []  # per batch row: first and last+1 image index
    patch_starts = [0]
    if "pixel_values" in inputs:
        grid = inputs.get("image_grid_thw")
        token_id = getattr(config, "image_token_id", None)
        merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", None)
        if grid is None or token_id is None or merge is None:
            return None
        patches = grid.prod(-1).tolist()
        tokens_per_image = [n // (merge * merge) for n in patches]
        for n in patches:
            patch_starts.append(patch_starts[-1] + n)
        image_tokens = (inputs["input_ids"] == token_id).sum(-1).tolist()
        image = 0
        for count in image_tokens:
            first = image
            while count > 0 and image < len(tokens_per_image):
                count -= tokens_per_image[image]
                image += 1
            if count != 0:
                return None  # image tokens and grids disagree: leave it to the model's own checks
            image_rows.append((first, image))
        if image != len(patches) or patch_starts[-1] != inputs["pixel_values"].shape[0]:
            return None
    chunks = []
    for start in range(0, batch, rows):
        end = min(batch, start + rows)
        part = {k: inputs[k][start:end] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
        if image_rows:
            first, last = image_rows[start][0], image_rows[end - 1][1]
            if last > first:
                part["pixel_values"] = inputs["pixel_values"][patch_starts[first] : patch_starts[last]]
                part["image_grid_thw"] = inputs["image_grid_thw"][first:last]
        chunks.append(((start, end), part))
    return chunks


def _cache_rows(cache: Any, start: int, end: int, batch: int, total: int, prompt_len: int, config: Any) -> Any:
    """A StaticCache for the prefill of rows [start, end) whose layers are views of `cache`'s layers (which the first
    chunk allocates for all `batch` rows): a prefill into it writes straight into the big cache, and its attention
    reads the first `prompt_len` slots (the prompt's own keys), not all `total`."""
    from transformers import StaticCache

    view = StaticCache(config=config, max_cache_len=total)
    view.layers = [_row_view_class()(big, start, end, batch, prompt_len) for big in cache.layers]
    return view


def _row_view_class() -> type:
    import torch
    from transformers.cache_utils import StaticLayer

    global _ROW_VIEW
    if _ROW_VIEW is not None:
        return _ROW_VIEW

    class RowView(StaticLayer):
        """Rows [start, end) of a bigger StaticLayer, for a prefill of `prompt_len` positions: attention reads (and
        the mask spans) those positions only."""

        def __init__(self, big: Any, start: int, end: int, rows: int, prompt_len: int) -> None:
            super().__init__(max_cache_len=big.max_cache_len)
            self.big, self.start, self.end, self.rows, self.prompt_len = big, start, end, rows, prompt_len

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            big = self.big
            if not big.is_initialized:  # only shapes, dtype and device are read: expanded views cost nothing
                big.lazy_initialization(
                    key_states[:1].expand(self.rows, -1, -1, -1), value_states[:1].expand(self.rows, -1, -1, -1)
                )
            self.dtype, self.device = big.dtype, big.device
            self.batch_size, self.num_heads = self.end - self.start, big.num_heads
            self.k_head_dim, self.v_head_dim = big.k_head_dim, big.v_head_dim
            self.keys = big.keys[self.start : self.end]
            self.values = big.values[self.start : self.end]
            self.cumulative_length = torch.zeros((), dtype=torch.long, device=self.device)
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if key_states.shape[-2] != self.prompt_len:
                raise ValueError(f"a prefill writes {self.prompt_len} positions, got {key_states.shape[-2]}")
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            return keys[:, :, : self.prompt_len], values[:, :, : self.prompt_len]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.prompt_len, 0

    _ROW_VIEW = RowView
    return RowView


_ROW_VIEW: type | None = None


def _decode_layer_class() -> type:
    from transformers.cache_utils import StaticLayer

    global _DECODE_LAYER
    if _DECODE_LAYER is not None:
        return _DECODE_LAYER

    class DecodeLayer(StaticLayer):
        """A filled StaticLayer's tensors for decode steps: a step writes its one token at the slot `position`
        (a device scalar the step sets, so a captured graph reads it at replay) and attention reads slots
        [0, window). The masks take the query's offset from `get_seq_length` and the key count from
        `get_mask_sizes`, so both follow."""

        def __init__(self, big: Any, position: Any) -> None:
            super().__init__(max_cache_len=big.max_cache_len)
            self.dtype, self.device = big.dtype, big.device
            self.batch_size, self.num_heads = big.batch_size, big.num_heads
            self.k_head_dim, self.v_head_dim = big.k_head_dim, big.v_head_dim
            self.keys, self.values = big.keys, big.values
            self.position, self.window = position, big.max_cache_len
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if key_states.shape[-2] != 1:
                raise ValueError(f"a decode step writes one position, got {key_states.shape[-2]}")
            slot = self.position.view(1)
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            return self.keys[:, :, : self.window], self.values[:, :, : self.window]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.window, 0

        def get_seq_length(self) -> Any:
            return self.position

    _DECODE_LAYER = DecodeLayer
    return DecodeLayer


_DECODE_LAYER: type | None = None


class _DecodeSession:
    """The cache and every tensor a decode step reads, for one batch shape `key` (rows, prompt length, cache length,
    mask dtype, device), and the CUDA graphs captured on them (one per attention window, in one memory pool)."""

    def __init__(
        self, key: tuple[Any, ...], cache: Any, batch: int, total: int, mask_dtype: Any, device: Any, vocab: int
    ) -> None:
        import torch

        self.key, self.cache = key, cache
        self.shared = key[-1]  # rows share prompts: decode attention reads their prompt slots from `source`
        self.full_mask = torch.ones(batch, total, dtype=mask_dtype, device=device)
        self.real_len = torch.zeros(batch, dtype=torch.long, device=device)
        self.deltas = torch.zeros(batch, dtype=torch.long, device=device)
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.source = torch.arange(batch, dtype=torch.long, device=device)
        self.logits = torch.zeros(batch, vocab, dtype=torch.float32, device=device)
        self.graphs: dict[int, Any] = {}
        self.pool: Any = None


def _capture(step_fn: Any, pool: Any = None) -> Any:
    """Capture one decode step as a CUDA graph (after a warm-up on a side stream) in memory pool `pool`; None
    when capture fails."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step_fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            step_fn()
    except RuntimeError as err:  # an op that synchronises with the host cannot be captured: stay eager
        print(f"CUDA graph capture failed, decoding eagerly ({str(err).splitlines()[0]})", flush=True)
        return None
    return graph
