"""Requests and batches: what a model call is (`Request`), how requests become padded model inputs (`Batcher`),
how they are grouped (`plan_batches`), and out-of-memory recovery (`run_halving`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from capdpo.images import load_image

if TYPE_CHECKING:
    from capdpo.models.loading import LoadedModel


@dataclass
class Request:
    """One model call: an image, a chat, and how to continue it."""

    key: str  # the record id this request serves (also the sampling seed's source)
    image: str | None  # image path (None: text only)
    messages: list[dict[str, Any]]  # chat messages; the image goes where a {"type": "image"} part stands
    continuation: list[int] = field(default_factory=list)  # scoring: token ids appended after the prompt
    seed: int = 0


@dataclass
class Output:
    """A generated answer: its text, tokens, and whether the end of turn (`stop`) or the token limit (`length`)
    ended it."""

    key: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"


def user_message(text: str, with_image: bool = True) -> dict[str, Any]:
    """A user turn holding the image (first) and a text."""
    content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _parts(message: dict[str, Any]) -> Iterator[Any]:
    content = message["content"]
    if isinstance(content, str):
        yield {"text": content}
    else:
        yield from content


# placeholders for texts in a chat template's rendering (Unicode private use: no tokenizer or text uses them), and
# the characters a text may not hold to take the placeholder path (templates test texts for markup, if for anything)
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARKUP = set("<>{}%[]" + _OPEN + _CLOSE)


def _is_text(part: dict[str, Any]) -> bool:
    return part.get("type") == "text" and isinstance(part.get("text"), str)


def _texts_and_shape(messages: list[dict[str, Any]]) -> tuple[list[str], Any]:
    """The messages' texts in order, and everything else about them (what a chat template may depend on)."""
    texts: list[str] = []
    shape = []
    for message in messages:
        content = message["content"]
        rest = repr(sorted((k, repr(v)) for k, v in message.items() if k != "content"))
        if isinstance(content, str):
            texts.append(content)
            shape.append((rest, None))
            continue
        parts = []
        for part in content:
            if _is_text(part):
                texts.append(part["text"])
                parts.append("text")
            else:
                parts.append(repr(sorted((k, repr(v)) for k, v in part.items())))
        shape.append((rest, tuple(parts)))
    return texts, tuple(shape)


def _with_texts(messages: list[dict[str, Any]], texts: list[str]) -> list[dict[str, Any]]:
    """`messages` with their texts replaced, in order, by `texts`."""
    fill = iter(texts)
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = next(fill)
        else:
            content = [{**part, "text": next(fill)} if _is_text(part) else part for part in content]
        out.append({**message, "content": content})
    return out


def _filled(pieces: list[str], texts: list[str]) -> str:
    return "".join(piece + text for piece, text in zip(pieces, texts)) + pieces[-1]


def text_length(request: Request) -> int:
    """The characters of a request's text, a cheap stand-in for its token count when grouping by length."""
    return len(
        " ".join(p.get("text", "") if isinstance(p, dict) else str(p) for m in request.messages for p in _parts(m))
    )


# Processor outputs that run along the token sequence; everything else (pixel_values, image_grid_thw, ...)
# describes images.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class ImageInputs:
    """A processor's tensors for one prompt and its image with each image processed once: its pixel tensors are
    kept and the prompt's image token expanded to the image's token count (Qwen-style processors, which do no more
    than that). Checked once against the processor's own output; a processor that differs is always called itself.
    `limit` bounds how many images are kept (None: all); `enabled=False` calls the processor every time."""

    def __init__(self, processor: Any, limit: int | None = None, enabled: bool = True) -> None:
        self.processor = processor
        self.limit = limit
        merge = getattr(getattr(processor, "image_processor", None), "merge_size", None)
        usable = enabled and merge is not None and getattr(processor, "image_token", None) is not None
        self.cache: dict[str, dict[str, Any]] | None = {} if usable else None
        self._keys: set[str] | None = None  # the processor's output keys, once checked

    def __call__(self, prompt_text: str, image_path: str, load: Any) -> dict[str, Any]:
        """Processor output for `prompt_text` with the image at `image_path` (batch of 1); `load(path)` reads it."""
        processor = self.processor
        if self.cache is None:
            return dict(processor(text=[prompt_text], images=[load(image_path)], return_tensors="pt"))
        image = self.cache.get(image_path)
        if image is None:
            image = dict(processor.image_processor(images=[load(image_path)], return_tensors="pt"))
            if self.limit is not None and len(self.cache) >= self.limit:
                self.cache.clear()
            self.cache[image_path] = image
        tokenizer = getattr(processor, "tokenizer", processor)
        n_tokens = int(image["image_grid_thw"].prod()) // processor.image_processor.merge_size**2
        marker = "\x00capdpo-image\x00"
        text = prompt_text.replace(processor.image_token, marker).replace(marker, processor.image_token * n_tokens)
        out = dict(tokenizer([text], add_special_tokens=False, return_tensors="pt"))
        out["mm_token_type_ids"] = (out["input_ids"] == tokenizer.convert_tokens_to_ids(processor.image_token)).long()
        out.update(image)
        if self._keys is None:
            reference = dict(processor(text=[prompt_text], images=[load(image_path)], return_tensors="pt"))
            if not (set(reference) <= set(out) and all(_tensor_equal(reference[k], out[k]) for k in reference)):
                self.cache = None  # this processor does more than expand tokens: never use the shortcut
                return reference
            self._keys = set(reference)
        return {k: v for k, v in out.items() if k in self._keys}


def _tensor_equal(a: Any, b: Any) -> bool:
    import torch

    return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b))


class Batcher:
    """Builds padded model inputs for requests (left padding: the last position is every row's prompt end)."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self._images: dict[str, Any] = {}
        self._templates: dict[Any, list[str] | None] = {}
        self._image_inputs = ImageInputs(lm.processor, limit=64)  # many requests share an image (variants, scores)

    def image(self, path: str) -> Any:
        if path not in self._images:
            if len(self._images) > 256:
                self._images.clear()
            self._images[path] = load_image(path)
        return self._images[path]

    def prompt_text(self, request: Request) -> str:
        """The chat template applied to the request's messages.

        Requests that differ only in their texts (a sentence's candidates, say) share one rendering of the template
        with placeholders where their texts go, filled with each request's texts: the template is rendered once per
        shape of conversation instead of once per request. A shape takes this path only where the template was seen
        to insert texts verbatim: placeholders each once and in order, probe texts with surrounding whitespace and
        markup characters inserted unchanged, and the first request's own rendering equal to the filled one. Texts
        holding markup characters are always rendered in full."""
        texts, shape = _texts_and_shape(request.messages)
        if any(set(t) & _MARKUP for t in texts):
            return self._render(request.messages)
        if shape not in self._templates:
            if len(self._templates) > 1024:
                self._templates.clear()
            self._templates[shape] = self._template(request.messages, texts)
        pieces = self._templates[shape]
        if pieces is None:
            return self._render(request.messages)
        return _filled(pieces, texts)

    def _render(self, messages: list[dict[str, Any]]) -> str:
        last_is_assistant = messages[-1]["role"] == "assistant"
        return self.lm.processor.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not last_is_assistant,
            continue_final_message=last_is_assistant,
        )

    def _template(self, messages: list[dict[str, Any]], texts: list[str]) -> list[str] | None:
        """The rendering of `messages`' shape split where its `texts` go, or None where texts are not inserted
        verbatim (see `prompt_text`)."""
        marks = [f"{_OPEN}{i}{_CLOSE}" for i in range(len(texts))]
        rendered = self._render(_with_texts(messages, marks))
        pieces, rest = [], rendered
        for mark in marks:
            if rest.count(mark) != 1 or rendered.count(mark) != 1:
                return None
            before, rest = rest.split(mark)
            pieces.append(before)
        pieces.append(rest)
        probes = [f" \n{i}\t<&'\"{{%}} " for i in range(len(texts))]
        if self._render(_with_texts(messages, probes)) != _filled(pieces, probes):
            return None
        return pieces if self._render(messages) == _filled(pieces, texts) else None

    def row(self, request: Request) -> dict[str, Any]:
        """The processor's tensors for one request (batch dimension 1, image tokens expanded, no continuation)."""
        if not request.image:
            return dict(self.lm.processor(text=[self.prompt_text(request)], images=None, return_tensors="pt"))
        return self._image_inputs(self.prompt_text(request), request.image, self.image)

    def encode(self, requests: Sequence[Request]) -> dict[str, Any]:
        """Tokenise each request (image tokens expanded), append its continuation, left-pad the batch."""
        import torch

        rows = [self.row(request) for request in requests]
        seq_keys = [
            k
            for k, v in rows[0].items()
            if torch.is_tensor(v) and v.dim() == 2 and v.shape[0] == 1 and k in SEQUENCE_KEYS
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
    requests: Sequence[Request], batch_size: int, length: Callable[[Request], int] = text_length
) -> list[list[Request]]:
    """Group requests of similar length (less padding), in an order fixed by the requests alone."""
    ordered = sorted(requests, key=lambda r: (length(r), r.key))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
