"""Batched generation and scoring on a loaded VLM (the plain-transformers engine).

Two properties matter more than raw speed here:

* **Sampling is a pure function of the request.** Each row samples with Gumbel-max noise drawn from a
  counter-based hash of (request seed, step, token id), so a description does not depend on which other requests
  shared its batch, on a crash and resume, on the batch size or on the number of GPUs.
* **Scores come from one forward pass.** `forward_logprobs` returns the next-token log-probabilities at the
  end of the prompt and along an optional continuation (teacher forcing); validators read P(yes), rating
  digits or A/B from them without sampling.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from capdpo.errors import InputError
from capdpo.models import LoadedModel

_MASK32 = 0xFFFFFFFF


@dataclass
class Request:
    """One model call: an image, a chat, and how to continue it."""

    key: str  # the record id this request serves (also the sampling seed's source)
    image: str | None  # image path (None: text only)
    messages: list[dict[str, Any]]  # chat messages; the image goes where a {"type": "image"} part stands
    continuation: list[int] = field(default_factory=list)  # scoring: token ids appended after the prompt
    seed: int = 0


@dataclass
class Generation:
    """Sampling settings. temperature 0 is greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_section(cls, section: Any) -> Generation:
        """Sampling settings of a config section that has these fields (describe, variants)."""
        return cls(**{f: getattr(section, f) for f in cls.__dataclass_fields__})


@dataclass
class Output:
    key: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"


def load_image(path: str) -> Any:
    """Open an image as RGB with its EXIF orientation applied."""
    from PIL import Image, ImageOps

    try:
        with open(path, "rb") as fh:
            data = fh.read()
        image = Image.open(io.BytesIO(data))
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read image ({err})") from None


def seed_of(*parts: Any) -> int:
    """A 32-bit seed from anything hashable into a stable id."""
    from capdpo.jsonl import stable_id

    return int(stable_id(*parts)[:8], 16)


# ---- counter-based sampling -------------------------------------------------------------------------------
def _mul32(x: Any, c: int) -> Any:
    # (x * c) mod 2**32 in int64 without overflow: split x into 16-bit halves.
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _MASK32


def _hash32(x: Any) -> Any:
    # A strong 32-bit integer mixer (xorshift-multiply), vectorised on int64 tensors holding values < 2**32.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seeds: Any, step: int, vocab_size: int) -> Any:
    """Standard Gumbel noise [len(seeds), vocab_size], a pure function of (seed, step, token id)."""
    import torch

    seeds = seeds.to(torch.int64) & _MASK32
    row = _hash32(_hash32(seeds) ^ (step & _MASK32))
    idx = _mul32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64), 0x9E3779B1)
    bits = _hash32(row[:, None] ^ idx[None, :])
    uniform = ((bits >> 8).to(torch.float64) + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(uniform)).to(torch.float32)


class SeededSampler:
    """A logits processor that turns greedy decoding into per-row reproducible sampling.

    Temperature, top-k and top-p are applied, then Gumbel noise is added; the argmax that greedy search takes
    is then an exact sample from the filtered softmax (the Gumbel-max trick).
    """

    def __init__(self, seeds: Sequence[int], prompt_length: int, gen: Generation, device: Any) -> None:
        import torch

        self.seeds = torch.tensor(list(seeds), dtype=torch.int64, device=device)
        self.prompt_length = prompt_length
        self.gen = gen

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores.float() / self.gen.temperature
        if self.gen.top_k and self.gen.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.gen.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.gen.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            probs = sorted_scores.softmax(-1)
            # drop a token when the mass before it already reaches top_p (the top token always stays)
            drop_sorted = (probs.cumsum(-1) - probs) >= self.gen.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        step = input_ids.shape[1] - self.prompt_length
        noise = gumbel_noise(self.seeds[: scores.shape[0]], step, scores.shape[-1])
        return scores + noise


# ---- batching ---------------------------------------------------------------------------------------------
class Batcher:
    """Builds padded model inputs for requests (left padding: the last position is every row's prompt end)."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self._images: dict[str, Any] = {}

    def image(self, path: str) -> Any:
        if path not in self._images:
            if len(self._images) > 256:
                self._images.clear()
            self._images[path] = load_image(path)
        return self._images[path]

    def prompt_text(self, request: Request) -> str:
        messages = request.messages
        last_is_assistant = messages[-1]["role"] == "assistant"
        return self.lm.processor.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not last_is_assistant,
            continue_final_message=last_is_assistant,
        )

    def row(self, request: Request) -> dict[str, Any]:
        """The processor's tensors for one request (batch dimension 1, image tokens expanded, no continuation)."""
        images = [self.image(request.image)] if request.image else None
        return dict(self.lm.processor(text=[self.prompt_text(request)], images=images, return_tensors="pt"))

    def encode(self, requests: Sequence[Request]) -> dict[str, Any]:
        """Tokenise each request (image tokens expanded), append its continuation, left-pad the batch."""
        import torch

        rows = [self.row(request) for request in requests]
        seq_keys = [
            k
            for k, v in rows[0].items()
            if torch.is_tensor(v) and v.dim() == 2 and v.shape[0] == 1 and k in _SEQUENCE_KEYS
        ]
        pad_id = self.lm.tokenizer.pad_token_id
        lengths = [int(r["input_ids"].shape[1]) + len(q.continuation) for r, q in zip(rows, requests)]
        width = max(lengths)
        batch: dict[str, Any] = {}
        for key in seq_keys:
            padded = []
            for row, request, length in zip(rows, requests, lengths):
                values = row[key][0]
                if request.continuation:
                    extra = (
                        torch.tensor(request.continuation, dtype=values.dtype)
                        if key == "input_ids"
                        else torch.full(
                            (len(request.continuation),), 1 if key == "attention_mask" else 0, dtype=values.dtype
                        )
                    )
                    values = torch.cat([values, extra])
                fill = pad_id if key == "input_ids" else 0
                padded.append(torch.cat([torch.full((width - length,), fill, dtype=values.dtype), values]))
            batch[key] = torch.stack(padded)
        for key, value in rows[0].items():
            if key in seq_keys or not torch.is_tensor(value):
                continue
            batch[key] = torch.cat([r[key] for r in rows], dim=0)
        return {k: v.to(self.lm.device) if torch.is_tensor(v) else v for k, v in batch.items()}


_SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_halving(batch: Sequence[Any], fn: Callable[[Sequence[Any]], list[Any]]) -> list[Any]:
    """Run `fn(batch)`; on CUDA out-of-memory split the batch in halves and retry each half."""
    import torch

    try:
        return fn(batch)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err) or len(batch) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(batch) // 2
        print(f"CUDA out of memory at batch {len(batch)}: retrying as {half} + {len(batch) - half}", flush=True)
        return run_halving(batch[:half], fn) + run_halving(batch[half:], fn)


def plan_batches(
    requests: Sequence[Request], batch_size: int, length: Callable[[Request], int]
) -> list[list[Request]]:
    """Group requests of similar length (less padding), in an order fixed by the requests alone."""
    ordered = sorted(requests, key=lambda r: (length(r), r.key))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


# ---- generation -------------------------------------------------------------------------------------------
class Engine:
    """`generate(requests)` and `forward_logprobs(requests)` on one loaded VLM."""

    def __init__(self, lm: LoadedModel, decoder: str = "static", prefill_rows: int = 0) -> None:
        """`decoder`: "static" (capdpo's static-cache loop, CUDA graphs on GPU) or "hf" (`model.generate`).
        `prefill_rows`: rows per prefill forward of the static decoder (0: the whole batch at once)."""
        from capdpo.fastgen import StaticDecoder

        self.lm = lm
        self.batcher = Batcher(lm)
        self.eos_ids = lm.end_of_turn_ids()
        self.static = StaticDecoder(lm, prefill_rows=prefill_rows) if decoder == "static" else None

    def _length(self, request: Request) -> int:
        text = " ".join(
            p.get("text", "") if isinstance(p, dict) else str(p) for m in request.messages for p in _parts(m)
        )
        return len(text)

    def plan(self, requests: Sequence[Request], batch_size: int) -> list[list[Request]]:
        return plan_batches(requests, batch_size, self._length)

    def generate(self, batch: Sequence[Request], gen: Generation) -> list[Output]:
        """Generate for one batch (halving on OOM); outputs are in the batch's order."""
        return run_halving(batch, lambda b: self._generate(b, gen))

    def _generate(self, batch: Sequence[Request], gen: Generation) -> list[Output]:
        import torch
        from transformers import LogitsProcessorList

        inputs = self.batcher.encode(batch)
        prompt_length = inputs["input_ids"].shape[1]
        if self.static is not None:
            pad = self.lm.tokenizer.pad_token_id
            generated = self.static.generate(inputs, gen, [r.seed for r in batch], self.eos_ids, pad)
            return self._outputs(batch, generated.tolist())
        kwargs: dict[str, Any] = dict(
            max_new_tokens=gen.max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_ids,
            pad_token_id=self.lm.tokenizer.pad_token_id,
            repetition_penalty=gen.repetition_penalty if gen.repetition_penalty != 1.0 else None,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        if gen.temperature > 0:
            sampler = SeededSampler([r.seed for r in batch], prompt_length, gen, self.lm.device)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        with torch.inference_mode():
            out = self.lm.model.generate(**inputs, **kwargs)
        return self._outputs(batch, out[:, prompt_length:].tolist())

    def _outputs(self, batch: Sequence[Request], rows: list[list[int]]) -> list[Output]:
        outputs = []
        for request, row in zip(batch, rows):
            finish = "length"
            for i, token in enumerate(row):
                if token in self.eos_ids:
                    row, finish = row[:i], "stop"
                    break
            text = self.lm.tokenizer.decode(row, skip_special_tokens=True)
            outputs.append(Output(key=request.key, text=text.strip(), token_ids=row, finish_reason=finish))
        return outputs

    # ---- scoring ----------------------------------------------------------------------------------------------
    def forward_logprobs(self, batch: Sequence[Request]) -> list[Any]:
        """Log-probabilities [len(continuation) + 1, vocab] per request: at the prompt's end and after each
        continuation token (one forward pass, teacher forcing). Halves on OOM."""
        return run_halving(batch, lambda b: forward_logprobs(self.lm, self.batcher, b))


def forward_logprobs(lm: LoadedModel, batcher: Batcher, batch: Sequence[Request]) -> list[Any]:
    """One padded forward pass over `batch`; see `Engine.forward_logprobs`."""
    import torch

    inputs = batcher.encode(batch)
    keep = max(len(r.continuation) for r in batch) + 1
    with torch.inference_mode():
        # logits_to_keep: only the last positions are needed, so the full-vocabulary projection of the
        # whole prompt (image tokens included) is never computed.
        logits = lm.model(**inputs, use_cache=False, logits_to_keep=keep).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()  # one transfer for the whole batch
    results = []
    for row, request in enumerate(batch):
        n = len(request.continuation) + 1
        # positions width-n .. width-1 predict continuation[0..] and the token after it
        results.append(logprobs[row, logprobs.shape[1] - n :])
    return results


def _parts(message: dict[str, Any]) -> Iterator[Any]:
    content = message["content"]
    if isinstance(content, str):
        yield {"text": content}
    else:
        yield from content


def user_message(text: str, with_image: bool = True) -> dict[str, Any]:
    """A user turn holding the image (first) and a text."""
    content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}
