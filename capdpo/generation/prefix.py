"""Scoring many prompts about one image with the image and shared instruction computed once.

A sentence's candidates (and all sentences of one description) are scored with prompts that differ only after
the image and the start of the instruction. `SharedPrefixScorer` tokenises the requests of each image (in a worker
thread, ahead of the GPU), finds their longest common token prefix (which holds the image), runs the prefixes of
several images in one batched forward pass, and then runs every request's short suffix on its image's cached keys
and values (gathered per layer into each row's keys; grouped-query attention without per-head copies). It returns
the same log-probabilities as `forward_logprobs` (one full forward per request) — within float rounding (the tests
hold it to 1e-4 in fp32) — at a fraction of the cost: the vision tower and the image's tokens run once per image
instead of once per candidate, and a forward pass carries many images' worth of work, so the GPU is not left
waiting on Python.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from capdpo.generation.attention import fold_mask, folded_attention
from capdpo.generation.batching import SEQUENCE_KEYS, Batcher, Request
from capdpo.generation.rope import mrope_positions
from capdpo.models.loading import LoadedModel


class PickedLogprobs:
    """Log-probabilities kept at some vocabulary ids only, indexed like the full [positions, vocab] tensor they come
    from: `rows[j]` is position j, `row[token]` and `row[ids]` read vocabulary ids. Reading an id that was not kept
    raises `KeyError`, never a wrong number."""

    __slots__ = ("columns", "values")

    def __init__(self, values: Any, columns: Any) -> None:
        self.values = values  # [positions, kept] or [kept]
        self.columns = columns  # [vocab] column of each kept id, -1 elsewhere

    def __getitem__(self, key: Any) -> Any:
        import torch

        if self.values.dim() == 2 and isinstance(key, int):
            return PickedLogprobs(self.values[key], self.columns)
        columns = self.columns[torch.as_tensor(key)]
        if bool((columns < 0).any()):
            raise KeyError(f"token id(s) {key} were not among the ids kept by the scorer")
        return self.values[..., columns]

    def __len__(self) -> int:
        return self.values.shape[0]


class Picker:
    """Moves log-probabilities to the host: whole rows, or (`keep`: the vocabulary ids the caller reads) only those
    columns, as `PickedLogprobs`. A yes/no score reads a handful of the ~150k columns; copying all of them moved
    ~0.6 MB per scored request from the GPU and held it in host memory."""

    def __init__(self, keep: Sequence[int] | None, vocab: int) -> None:
        import torch

        self.keep = None if keep is None else torch.tensor(sorted(set(keep)), dtype=torch.long)
        self.columns = None
        if self.keep is not None:
            self.columns = torch.full((vocab,), -1, dtype=torch.long)
            self.columns[self.keep] = torch.arange(len(self.keep))

    def to_host(self, logprobs: Any) -> Any:
        """[..., vocab] on the device -> [..., vocab] or [..., kept] on the host (one transfer)."""
        if self.keep is not None:
            logprobs = logprobs.index_select(-1, self.keep.to(logprobs.device))
        return logprobs.cpu()

    def rows(self, values: Any) -> Any:
        """One request's [positions, ...] host tensor as the caller reads it."""
        return values if self.columns is None else PickedLogprobs(values, self.columns)


def vocab_size(lm: LoadedModel) -> int:
    """Rows of the model's output projection: the width of a log-probability row."""
    return lm.model.get_output_embeddings().weight.shape[0]


def forward_logprobs(
    lm: LoadedModel, batcher: Batcher, batch: Sequence[Request], keep: Sequence[int] | None = None
) -> list[Any]:
    """One padded forward pass over `batch`; the log-probabilities [len(continuation) + 1, vocab] per request
    at the prompt's end and after each continuation token (teacher forcing); with `keep`, only at those
    vocabulary ids (`PickedLogprobs`)."""
    import torch

    inputs = batcher.encode(batch)
    width = max(len(r.continuation) for r in batch) + 1
    picker = Picker(keep, vocab_size(lm))
    with torch.inference_mode():
        # logits_to_keep: only the last positions are needed, so the full-vocabulary projection of the
        # whole prompt (image tokens included) is never computed.
        logits = lm.model(**inputs, use_cache=False, logits_to_keep=width).logits
        logprobs = picker.to_host(torch.log_softmax(logits.float(), dim=-1))  # one transfer for the whole batch
    results = []
    for row, request in enumerate(batch):
        n = len(request.continuation) + 1
        # positions width-n .. width-1 predict continuation[0..] and the token after it
        results.append(picker.rows(logprobs[row, logprobs.shape[1] - n :]))
    return results


@dataclass
class PrefixGroup:
    """Token sequences on one image that share their first `prefix_len` tokens."""

    first: dict[str, Any]  # processor tensors of the first sequence (its image inputs serve the group)
    ids: list[list[int]]  # every sequence: prompt, then continuation
    continuations: list[int]  # continuation length of each sequence
    prefix_len: int
    keys: list[Any]  # where each sequence's result goes


@functools.cache
def _rows_on_prefixes() -> type:
    """A cache layer for one suffix pass: every row reads its image's prefix (the prefill's layer, one entry per
    image), gathered only when the layer runs, straight into the keys the row attends to, its suffix written after
    it: one write of each row's keys, where a gather of every layer up front and a concatenation per layer made
    three. (A class made on first use: transformers is imported lazily.)"""
    import torch.nn.functional as F
    from transformers.cache_utils import DynamicLayer

    class RowsOnPrefixes(DynamicLayer):
        def __init__(self, prefixes: Any, rows: Any) -> None:
            super().__init__()
            self.prefixes, self.rows = prefixes, rows
            self.dtype, self.device = prefixes.keys.dtype, prefixes.keys.device
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            width = self.prefixes.keys.shape[-2]
            out = []
            for prefix, suffix in ((self.prefixes.keys, key_states), (self.prefixes.values, value_states)):
                rows = F.pad(prefix, (0, 0, 0, suffix.shape[-2])).index_select(0, self.rows)
                rows[..., width:, :] = suffix
                out.append(rows)
            return out[0], out[1]

        def get_seq_length(self) -> int:
            return self.prefixes.keys.shape[-2]

    return RowsOnPrefixes


def _rows_layer(layer: Any, rows: Any) -> Any:
    """The suffix pass's view of one prefill cache layer: `_rows_on_prefixes` for a plain dynamic layer; any other
    kind (a sliding window, say) gathered the library's way."""
    rows_on_prefixes = _rows_on_prefixes()
    if type(layer) is rows_on_prefixes.__base__:
        return rows_on_prefixes(layer, rows)
    layer = copy.copy(layer)
    layer.batch_select_indices(rows)
    return layer


def shared_prefix_length(ids: list[list[int]], continuations: list[int], known: int = 0) -> int:
    """Length of the common prefix, kept short enough that every sequence's last prompt token (whose logits are
    read) falls in its suffix. `known`: a length all sequences are known to share (an image's tokens), so the
    comparison starts there."""
    first = ids[0]
    shared = len(first)
    for row in ids[1:]:
        end = min(shared, len(row))
        shared = next((i for i in range(known, end) if first[i] != row[i]), end)
    return min(shared, min(len(row) - c for row, c in zip(ids, continuations)) - 1)


FIRST_PASS_IMAGES = 4  # images in the first prefix pass of `SharedPrefixScorer.score` (see `score_groups`)


class SharedPrefixScorer:
    """Log-probabilities per request, with each image's shared prefix computed once."""

    def __init__(self, lm: LoadedModel, batcher: Batcher | None = None, images_per_pass: int = 32) -> None:
        self.lm = lm
        self.batcher = batcher or Batcher(lm)
        self.model = lm.model
        self.decoder = self.model.model.language_model
        self.embed = self.model.get_input_embeddings()
        self.head = self.model.get_output_embeddings()
        self.mrope = hasattr(self.model.model, "rope_deltas")
        self.image_token = getattr(lm.processor, "image_token", None)
        self.images_per_pass = images_per_pass
        # the suffix pass builds its own full-attention mask: not for models with sliding-window layers
        text = self.decoder.config
        heads = text.num_attention_heads
        self.groups = heads // (getattr(text, "num_key_value_heads", None) or heads)  # query heads per key/value head
        self.foldable = "sliding_attention" not in (getattr(text, "layer_types", None) or []) and not getattr(
            text, "use_sliding_window", False
        )

    def score(self, requests: Sequence[Request], batch_size: int, keep: Sequence[int] | None = None) -> dict[str, Any]:
        """{request key: log-probs [len(continuation) + 1, vocab]} like `Engine.forward_logprobs` (with `keep`: at
        those vocabulary ids only)."""
        by_image: dict[str | None, list[Request]] = defaultdict(list)
        for request in requests:
            by_image[request.image].append(request)
        unshared = {image for image, requests_of_image in by_image.items() if len(requests_of_image) == 1}

        def groups() -> Iterator[PrefixGroup]:
            for image, group in self._prepared([(i, r) for i, r in by_image.items() if i not in unshared]):
                if group is None:  # nothing worth sharing: one full forward each
                    unshared.add(image)
                else:
                    yield group

        results = self.score_groups(groups(), batch_size, keep, ramp=True)
        plain = [r for image, requests_of_image in by_image.items() if image in unshared for r in requests_of_image]
        for start in range(0, len(plain), batch_size):
            batch = plain[start : start + batch_size]
            results.update({r.key: lp for r, lp in zip(batch, forward_logprobs(self.lm, self.batcher, batch, keep))})
        return results

    def _prepared(self, images: list[tuple[str | None, list[Request]]]) -> Iterator[tuple[Any, PrefixGroup | None]]:
        """(image, its group or None) in order, tokenised by a worker thread up to two passes ahead: an image's
        chat templates, tokenisation and image processing take about as much host time as the GPU needs to score
        its requests, so they run while the GPU works on the images before it."""
        from concurrent.futures import ThreadPoolExecutor

        ahead = 2 * self.images_per_pass
        pending: deque[tuple[Any, Any]] = deque()
        with ThreadPoolExecutor(1, thread_name_prefix="capdpo-prefix") as pool:
            try:
                for image, requests_of_image in images:
                    pending.append((image, pool.submit(self._group, image, requests_of_image)))
                    if len(pending) > ahead:
                        image_done, future = pending.popleft()
                        yield image_done, future.result()
                while pending:
                    image_done, future = pending.popleft()
                    yield image_done, future.result()
            finally:
                for _, future in pending:
                    future.cancel()

    def _group(self, image: str | None, requests: list[Request]) -> PrefixGroup | None:
        """Tokenise the requests of one image; None when their common prefix does not cover the image."""
        first = self.batcher.row(requests[0])
        first_ids = first["input_ids"][0].tolist()
        image_end = 0
        if image is not None:
            if not self.image_token:
                return None
            image_id = self.lm.tokenizer.convert_tokens_to_ids(self.image_token)
            image_end = max(i for i, t in enumerate(first_ids) if t == image_id) + 1
        texts = [self.batcher.prompt_text(request) for request in requests]
        if image is not None:  # special tokens split the text, so the part after the image tokenises on its own
            texts = [text[text.rindex(self.image_token) + len(self.image_token) :] for text in texts]
        encoded = self.lm.tokenizer(texts, add_special_tokens=False)["input_ids"]  # one call for all of them
        ids = [first_ids[:image_end] + row + list(r.continuation) for row, r in zip(encoded, requests)]
        continuations = [len(r.continuation) for r in requests]
        prefix_len = shared_prefix_length(ids, continuations, known=image_end)  # all start with the image's tokens
        if prefix_len < max(image_end, 1):
            return None
        return PrefixGroup(first, ids, continuations, prefix_len, [r.key for r in requests])

    def score_groups(
        self, groups: Iterable[PrefixGroup], batch_size: int, keep: Sequence[int] | None = None, ramp: bool = False
    ) -> dict[Any, Any]:
        """Score prefix groups: `images_per_pass` prefixes per forward, then their suffixes `batch_size` at a time.

        `ramp`: the groups are being prepared while the GPU works (`score`), so the first passes take
        `FIRST_PASS_IMAGES`, then twice as many each time up to `images_per_pass`: the GPU starts after a few images
        instead of waiting for a full pass's worth (while the host prepares an image in at most half the time the GPU
        takes to score one, each doubled pass is ready when the one before ends)."""
        import torch

        picker = Picker(keep, vocab_size(self.lm))
        results: dict[Any, Any] = {}
        groups = iter(groups)
        size = min(FIRST_PASS_IMAGES, self.images_per_pass) if ramp else self.images_per_pass
        with torch.inference_mode():
            while chunk := list(itertools.islice(groups, size)):
                size = min(2 * size, self.images_per_pass)
                cache, real_lens, deltas, width = self._prefill(chunk)
                rows = [(g, i) for g in range(len(chunk)) for i in range(len(chunk[g].ids))]
                rows.sort(key=lambda gi: len(chunk[gi[0]].ids[gi[1]]) - chunk[gi[0]].prefix_len)
                for r in range(0, len(rows), batch_size):
                    part = rows[r : r + batch_size]
                    scored = self._suffixes(chunk, part, cache, real_lens, deltas, width, picker)
                    for (g, i), logprobs in zip(part, scored):
                        results[chunk[g].keys[i]] = logprobs
        return results

    def _prefill(self, chunk: list[PrefixGroup]) -> tuple[Any, Any, Any, int]:
        """One left-padded forward over the chunk's prefixes; returns the cache, each prefix's real length, its
        position offset (Qwen-VL's rope delta; 0 otherwise) and the padded width."""
        import torch
        from transformers import DynamicCache

        device = self.lm.device
        width = max(g.prefix_len for g in chunk)
        inputs: dict[str, Any] = {}
        for key in chunk[0].first:
            values = [g.first[key] for g in chunk]
            if not torch.is_tensor(values[0]):
                continue
            if key in SEQUENCE_KEYS:
                fill = self.lm.tokenizer.pad_token_id if key == "input_ids" else 0
                rows = []
                for g, v in zip(chunk, values):
                    v = v[0, : g.prefix_len]
                    pad = torch.full((width - g.prefix_len,), fill, dtype=v.dtype, device=v.device)
                    rows.append(torch.cat([pad, v]))
                inputs[key] = torch.stack(rows)
            else:
                inputs[key] = torch.cat(values)
        mask = inputs["attention_mask"]
        if not self.mrope:  # like generate: positions count real tokens, so left padding does not shift them
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        deltas = None
        if self.mrope:
            self.model.model.rope_deltas = None
            # the 3-D positions for the whole chunk at once (None: the model computes them row by row)
            rope = mrope_positions(self.model, inputs)
            if rope is not None:
                inputs["position_ids"], deltas = rope
        cache = DynamicCache(config=self.model.config)
        self.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        real_lens = torch.tensor([g.prefix_len for g in chunk])
        if deltas is None and self.mrope:
            deltas = self.model.model.rope_deltas
        deltas = deltas.view(-1).cpu() if deltas is not None else torch.zeros(len(chunk), dtype=torch.long)
        return cache, real_lens, deltas, width

    def _suffixes(
        self,
        chunk: list[PrefixGroup],
        part: list[tuple[int, int]],
        cache: Any,
        real_lens: Any,
        deltas: Any,
        width: int,
        picker: Picker,
    ) -> list[Any]:
        import torch

        device = self.lm.device
        n = len(part)
        # built as whole tensors, not row by row: a pass has hundreds of rows and the GPU waits for this
        suffixes = [chunk[g].ids[i][chunk[g].prefix_len :] for g, i in part]
        lens = torch.tensor([len(s) for s in suffixes])
        reads = torch.tensor([chunk[g].continuations[i] + 1 for g, i in part])  # positions read per row
        group = torch.tensor([g for g, _ in part])
        length = int(lens.max())
        real = torch.arange(length) < lens[:, None]  # right padding: real tokens never attend to it
        suffix_ids = torch.full((n, length), self.lm.tokenizer.pad_token_id, dtype=torch.long)
        suffix_ids[real] = torch.tensor(list(itertools.chain.from_iterable(suffixes)), dtype=torch.long)
        in_prefix = torch.arange(width) >= width - real_lens[group][:, None]  # the image's prefix, left-padded
        mask = torch.cat([in_prefix, real], dim=1).to(device)
        positions = torch.arange(length) + (real_lens + deltas)[group][:, None]
        rows_cache = copy.copy(cache)
        rows_cache.layers = [_rows_layer(layer, group.to(device)) for layer in cache.layers]
        if self.mrope:
            positions = positions.view(1, n, length).expand(3, n, length)
        with folded_attention(self.decoder.config) if self.foldable else nullcontext(False) as folded:
            if folded:  # the 4-D mask itself: the row's prefix, then its suffix causally; folded once for all layers
                causal = torch.ones(length, width + length, dtype=torch.bool, device=device).tril(width)
                mask = fold_mask(mask[:, None, None, :] & causal, self.groups, self.embed.weight.dtype)
            hidden = self.decoder(
                inputs_embeds=self.embed(suffix_ids.to(device)),
                position_ids=positions.to(device),
                attention_mask=mask if folded else mask.long(),
                past_key_values=rows_cache,
                cache_position=torch.arange(width, width + length, device=device),
                use_cache=True,
            ).last_hidden_state
        # the positions we read (each row's last `reads`), projected in one matmul and moved to the CPU in one transfer
        row_of = torch.arange(n).repeat_interleave(reads)
        first = torch.cumsum(reads, 0) - reads
        col_of = torch.arange(int(reads.sum())) - first[row_of] + (lens - reads)[row_of]
        picked = hidden[row_of.to(device), col_of.to(device)]
        logprobs = picker.to_host(torch.log_softmax(self.head(picked).float(), dim=-1))
        return [picker.rows(logprobs[a : a + k]) for a, k in zip(first.tolist(), reads.tolist())]
