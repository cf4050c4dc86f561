"""Preference pairs as model inputs: chat-template rendering, exact completion tokens, length checks, batching.

A pair becomes two sequences that share one prompt::

    [chat template + user turn (image first, then the prompt) + assistant header + assistant_prefix] [completion]

The completion is what the model would generate after that prompt: in sentence mode a space and the sentence,
then the assistant turn's end token (`<|im_end|>` for Qwen). The template's text after the end token (Qwen's
newline) is not part of the sequence: generation stops at the end token, so nothing after it is ever predicted.
The prompt is tokenized exactly as at inference time (processor with the image, image tokens expanded) and the
completion separately, so the tokens trained on are the tokens the model generates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.errors import ConfigError, InputError
from capdpo.generation.batching import SEQUENCE_KEYS
from capdpo.images import load_image
from capdpo.jsonl import iter_jsonl
from capdpo.records import PairRecord

# Keys the collator adds that are ours, not the model's or TRL's; the trainer pops them before the forward.
EXTRA_PREFIX = "capdpo_"


@dataclass
class PromptLength:
    """Token counts of one pair's prompt side."""

    prompt: int  # all prompt tokens, image tokens included
    image_end: int  # position just after the last image token
    image_tokens: int


@dataclass
class EncodedPair:
    prompt: dict[str, Any]  # processor output for the prompt (batch of 1): input_ids, pixel_values, ...
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool  # a completion was shortened to fit max_length


def _user_message(prompt: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}


class PairEncoder:
    """Renders and tokenizes pairs with one model's processor and chat template.

    Args:
        processor: the model's processor (tokenizer + image processor + chat template).
        max_length: token limit of prompt + completion (0: none).
    """

    def __init__(self, processor: Any, max_length: int = 0) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        image_token = getattr(processor, "image_token", None)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token) if image_token else None
        self._special_ids = set(self.tokenizer.all_special_ids) | {
            i for i, tok in self.tokenizer.added_tokens_decoder.items() if tok.special
        }
        self._fast_counts: bool | None = None  # whether image token counts from the image size are trustworthy

    # ---- text ---------------------------------------------------------------------------------------------
    def render(self, pair: PairRecord, completion: str) -> tuple[str, str]:
        """(prompt text, completion text) of one side of a pair, both as the chat template writes them."""
        user = _user_message(pair.prompt)
        header = self.processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        # Stage 5 joins the earlier sentences and the new one with one space; the space belongs to the completion
        # (tokens carry their leading space, so this is how the model would write it).
        answer = f" {completion}" if pair.assistant_prefix else completion
        full_answer = pair.assistant_prefix + answer
        # Content as typed parts: LLaVA-1.5's template (llava-hf) renders only those; Qwen's render both alike.
        assistant = {"role": "assistant", "content": [{"type": "text", "text": full_answer}]}
        full = self.processor.apply_chat_template([user, assistant], tokenize=False)
        # LLaVA-1.5's template ends the generation prompt with "ASSISTANT:" but renders an answer as
        # "ASSISTANT: answer": the model generates that space itself, so it starts the completion (or, in sentence
        # mode, sits before the prefix in the prompt). Anything but whitespace there is refused.
        at = full.find(full_answer, len(header)) if full.startswith(header) else -1
        if at < 0 or full[len(header) : at].strip():
            raise ConfigError(
                "strong_model: its chat template does not render the assistant answer right after the generation "
                "prompt, so the completion tokens cannot be located; use a model with a standard chat template"
            )
        gap = full[len(header) : at]
        tail = full[at + len(full_answer) :]
        if not tail.strip() and self.tokenizer.eos_token:
            # llava-hf's LLaVA-1.5 template closes an answer with a space, no end token; generation ends the turn
            # with EOS, so the completion does too (the space is never generated).
            tail = self.tokenizer.eos_token
        if pair.assistant_prefix:
            return header + gap + pair.assistant_prefix, answer + tail
        return header, gap + answer + tail

    def completion_ids(self, completion_text: str) -> list[int]:
        """Token ids of a completion, up to and including the assistant turn's end token."""
        ids = self.tokenizer(completion_text, add_special_tokens=False)["input_ids"]
        for i, token in enumerate(ids):
            if token in self._special_ids:
                return ids[: i + 1]
        return ids

    # ---- lengths ------------------------------------------------------------------------------------------
    def prompt_length(self, pair: PairRecord) -> PromptLength:
        """Prompt token counts without processing pixels when the processor can count image tokens from the size."""
        prompt_text, _ = self.render(pair, pair.chosen)
        if self._fast_counts is None:
            # Check the size-based count against the real processor once; fall back to the real one if they differ.
            fast = self._fast_length(pair, prompt_text)
            slow = self._slow_length(pair, prompt_text)
            self._fast_counts = fast == slow
            return slow
        fast = self._fast_length(pair, prompt_text) if self._fast_counts else None
        return fast if fast is not None else self._slow_length(pair, prompt_text)

    def _fast_length(self, pair: PairRecord, prompt_text: str) -> PromptLength | None:
        counter = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if counter is None or self.image_token_id is None:
            return None
        from PIL import Image, ImageOps

        try:
            with Image.open(pair.image) as image:
                width, height = ImageOps.exif_transpose(image).size if _has_orientation(image) else image.size
            n_image = counter(image_sizes=[(height, width)])["num_image_tokens"][0]
        except (OSError, KeyError, TypeError, ValueError, AttributeError):
            return None
        ids = self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        if ids.count(self.image_token_id) != 1:
            return None
        at = ids.index(self.image_token_id)
        return PromptLength(prompt=len(ids) - 1 + n_image, image_end=at + n_image, image_tokens=n_image)

    def _slow_length(self, pair: PairRecord, prompt_text: str) -> PromptLength:

        enc = self.processor(text=[prompt_text], images=[load_image(pair.image)], return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        if self.image_token_id is None or self.image_token_id not in ids:
            return PromptLength(prompt=len(ids), image_end=len(ids), image_tokens=0)
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        return PromptLength(prompt=len(ids), image_end=positions[-1] + 1, image_tokens=len(positions))

    def check_fits(self, pair: PairRecord, length: PromptLength, where: str) -> None:
        """Refuse a pair whose image tokens (or whole prompt) would be cut by max_length."""
        if not self.max_length:
            return
        if length.image_end > self.max_length or length.prompt >= self.max_length:
            raise InputError(
                f"{where}: pair {pair.id}: its prompt is {length.prompt} tokens ({length.image_tokens} image tokens, "
                f"ending at token {length.image_end}) but train.max_length is {self.max_length}, so "
                f"{'image tokens' if length.image_end > self.max_length else 'every completion token'} would be cut; "
                "raise train.max_length or lower max_pixels"
            )

    # ---- tensors ------------------------------------------------------------------------------------------
    def encode(self, pair: PairRecord) -> EncodedPair:
        """Processor output for the prompt (with the image) and the two completions' token ids."""

        prompt_text, chosen_text = self.render(pair, pair.chosen)
        _, rejected_text = self.render(pair, pair.rejected)
        prompt = self.processor(text=[prompt_text], images=[load_image(pair.image)], return_tensors="pt")
        chosen, rejected = self.completion_ids(chosen_text), self.completion_ids(rejected_text)
        n_prompt = int(prompt["input_ids"].shape[1])
        truncated = False
        if self.max_length:
            ids = prompt["input_ids"][0].tolist()
            image_end = max((i + 1 for i, t in enumerate(ids) if t == self.image_token_id), default=0)
            self.check_fits(pair, PromptLength(n_prompt, image_end, ids.count(self.image_token_id)), "pairs")
            room = self.max_length - n_prompt
            truncated = len(chosen) > room or len(rejected) > room
            chosen, rejected = chosen[:room], rejected[:room]
        return EncodedPair(prompt=dict(prompt), chosen_ids=chosen, rejected_ids=rejected, truncated=truncated)

    def encode_corrupted(self, pair: PairRecord, encoded: EncodedPair, corruption: Any) -> dict[str, Any]:
        """The image tensors of the pair's prompt with its corrupted image (`capdpo.training.conditional`); its
        tokens must be the true prompt's (the corrupted image has the true image's size)."""
        import torch

        from capdpo.training.corruption import corrupted_image

        prompt_text, _ = self.render(pair, pair.chosen)
        image = corrupted_image(pair, load_image(pair.image), corruption)
        prompt = self.processor(text=[prompt_text], images=[image], return_tensors="pt")
        if not torch.equal(prompt["input_ids"], encoded.prompt["input_ids"]):  # other lengths too: not an exception
            raise InputError(
                f"pairs: pair {pair.id}: its corrupted image gives other prompt tokens than its image; check "
                "rejected_image and the processor's pixel limits"
            )
        return {k: v for k, v in prompt.items() if k not in SEQUENCE_KEYS and hasattr(v, "shape")}


def _has_orientation(image: Any) -> bool:
    try:
        return image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # orientations that swap width and height
    except (AttributeError, OSError):
        return False


class PairCollator:
    """Batches pairs for the trainer: rows [chosen_1..chosen_B, rejected_1..rejected_B], right-padded.

    With `share_images` each image's pixels appear once (B images for 2B rows); the trainer encodes them once and
    gives the features to both rows. Without it they are repeated, as TRL's own collator does.

    Args:
        encoder: the pair encoder.
        share_images: pass each image once (see above).
        reference: pair id -> cached reference values (`ReferenceCache`), or None for no reference columns.
        ld_alpha: LD-DPO weight applied to the cached reference sums (None: plain sums).

    With `features` (set by the trainer) the batch carries each image's cached vision features and empty pixels
    (`capdpo.training.features`). `pixel_dtype` (set by the trainer under DeepSpeed) is the dtype the training step
    would cast the image tensors to: they are cast here, in the DataLoader's workers, and the step only copies them
    to the GPU (half the bytes, and no conversion on the host while the GPU waits).
    """

    def __init__(
        self,
        encoder: PairEncoder,
        share_images: bool = True,
        reference: Any = None,
        ld_alpha: float | None = None,
        corruption: Any = None,
    ) -> None:
        self.encoder = encoder
        self.share_images = share_images
        self.reference = reference
        self.ld_alpha = ld_alpha
        self.corruption = corruption  # mdpo: add each pair's corrupted image (`capdpo.training.conditional`)
        self.pixel_dtype: Any = None
        self.features: Any = None  # set by the trainer: a `FeatureCache` holding every pair's image features

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        pairs = [example_to_pair(e) for e in examples]
        encoded = [self.encoder.encode(p) for p in pairs]
        rows: list[tuple[dict[str, Any], list[int]]] = [(e.prompt, e.chosen_ids) for e in encoded]
        rows += [(e.prompt, e.rejected_ids) for e in encoded]
        width = max(int(p["input_ids"].shape[1]) + len(c) for p, c in rows)
        seq_keys = [k for k in SEQUENCE_KEYS if k in encoded[0].prompt]
        batch: dict[str, Any] = {}
        for key in seq_keys:
            fill = self.encoder.pad_id if key == "input_ids" else 0
            out = torch.full((len(rows), width), fill, dtype=encoded[0].prompt[key].dtype)
            for r, (prompt, completion) in enumerate(rows):
                values = prompt[key][0]
                n = values.shape[0]
                out[r, :n] = values
                if key == "input_ids":
                    out[r, n : n + len(completion)] = torch.tensor(completion, dtype=out.dtype)
                elif key == "attention_mask":
                    out[r, n : n + len(completion)] = 1
            batch[key] = out
        completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (prompt, completion) in enumerate(rows):
            n = int(prompt["input_ids"].shape[1])
            completion_mask[r, n : n + len(completion)] = 1
        batch["completion_mask"] = completion_mask
        for key, value in encoded[0].prompt.items():
            if key in seq_keys or not torch.is_tensor(value):
                continue
            images = torch.cat([e.prompt[key] for e in encoded], dim=0)
            if self.pixel_dtype is not None and images.is_floating_point():
                images = images.to(self.pixel_dtype)
            batch[key] = images if self.share_images else torch.cat([images, images], dim=0)
        if self.features is not None and "pixel_values" in batch:
            # the cached features replace the pixels: the model reads them instead of running its vision tower
            from capdpo.training.features import batch_features, image_key

            loaded = [self.features.load(image_key(p.image_id, p.image), p.image) for p in pairs]
            features = batch_features(loaded, by_grid="image_grid_thw" in batch)
            batch[EXTRA_PREFIX + "image_features"] = features if self.share_images else torch.cat([features] * 2)
            # no pixels, but still one row per image (LLaVA) or patch (Qwen-VL): the callers slice it per image
            batch["pixel_values"] = batch["pixel_values"][:, :0]
        batch[EXTRA_PREFIX + "score_chosen"] = torch.tensor([p.score_chosen for p in pairs], dtype=torch.float32)
        batch[EXTRA_PREFIX + "score_rejected"] = torch.tensor([p.score_rejected for p in pairs], dtype=torch.float32)
        if self.corruption is not None:
            from capdpo.training.corruption import CORRUPT_PREFIX

            corrupted = [self.encoder.encode_corrupted(p, e, self.corruption) for p, e in zip(pairs, encoded)]
            for key in corrupted[0]:
                batch[EXTRA_PREFIX + CORRUPT_PREFIX + key] = torch.cat([c[key] for c in corrupted], dim=0)
        if self.reference is not None:
            self._add_reference(batch, pairs, encoded)
        return batch

    def _add_reference(self, batch: dict[str, Any], pairs: list[PairRecord], encoded: list[EncodedPair]) -> None:
        import torch

        values = []
        for pair, enc in zip(pairs, encoded):
            ref = self.reference.get(pair.id)
            if ref is None:
                raise InputError(f"reference log-probs: pair {pair.id} is missing from {self.reference.folder}")
            if (ref["chosen_tokens"], ref["rejected_tokens"]) != (len(enc.chosen_ids), len(enc.rejected_ids)):
                raise InputError(
                    f"{self.reference.folder}: pair {pair.id} was cached with {ref['chosen_tokens']}/"
                    f"{ref['rejected_tokens']} completion tokens but now has {len(enc.chosen_ids)}/"
                    f"{len(enc.rejected_ids)}; delete that folder to recompute the reference"
                )
            values.append(ref)

        def combined(side: str) -> Any:
            if self.ld_alpha is None:
                return torch.tensor([v[f"{side}_sum"] for v in values], dtype=torch.float32)
            return torch.tensor(
                [v[f"{side}_shared"] + self.ld_alpha * (v[f"{side}_sum"] - v[f"{side}_shared"]) for v in values],
                dtype=torch.float32,
            )

        batch["ref_chosen_logps"] = combined("chosen")
        batch["ref_rejected_logps"] = combined("rejected")
        batch[EXTRA_PREFIX + "ref_chosen_sum"] = torch.tensor([v["chosen_sum"] for v in values], dtype=torch.float32)
        batch[EXTRA_PREFIX + "ref_rejected_sum"] = torch.tensor(
            [v["rejected_sum"] for v in values], dtype=torch.float32
        )
        if self.corruption is not None:
            if any("corrupt_sum" not in v for v in values):
                raise InputError(f"{self.reference.folder}: cached without the corrupted image's log-probs (mdpo)")
            batch[EXTRA_PREFIX + "ref_corrupt_sum"] = torch.tensor(
                [v["corrupt_sum"] for v in values], dtype=torch.float32
            )


PAIR_COLUMNS = (
    "id",
    "image",
    "prompt",
    "chosen",
    "rejected",
    "score_chosen",
    "score_rejected",
    "assistant_prefix",
    "image_id",
    "mode",
    "rejected_image",
)


def pair_to_example(pair: PairRecord) -> dict[str, Any]:
    """The dataset row of a pair (flat columns; meta is left out)."""
    return {name: getattr(pair, name) for name in PAIR_COLUMNS}


def example_to_pair(example: dict[str, Any]) -> PairRecord:
    return PairRecord(**{name: example[name] for name in PAIR_COLUMNS if name in example})


def read_pairs(path: Path, allow_torn_tail: bool = False) -> list[tuple[int, PairRecord]]:
    """(line number, pair) for every record of a pairs JSONL; malformed records are one-line InputErrors."""
    out = []
    for number, record in enumerate(iter_jsonl(path, allow_torn_tail=allow_torn_tail), start=1):
        out.append((number, PairRecord.from_dict(record, where=f"{path}: record {number}")))
    return out


def check_pairs(pairs: list[tuple[int, PairRecord]], encoder: PairEncoder, source: Path) -> dict[str, int]:
    """Refuse duplicate ids, missing images and prompts that max_length would cut; return length stats.

    Runs before any model is loaded. Image token counts come from the image size where the processor can tell
    (no pixels are processed), so this takes seconds for tens of thousands of pairs.
    """
    seen: set[str] = set()
    longest_prompt = 0
    longest_total = 0
    will_truncate = 0
    for number, pair in pairs:
        where = f"{source}: record {number}"
        if pair.id in seen:
            raise InputError(f"{where}: pair id {pair.id} appears twice; pair ids must be unique")
        seen.add(pair.id)
        if not Path(pair.image).is_file():
            raise InputError(f"{where}: pair {pair.id}: image {pair.image} not found")
        if pair.rejected_image and not Path(pair.rejected_image).is_file():
            raise InputError(f"{where}: pair {pair.id}: rejected_image {pair.rejected_image} not found")
        length = encoder.prompt_length(pair)
        encoder.check_fits(pair, length, where)
        _, chosen_text = encoder.render(pair, pair.chosen)
        _, rejected_text = encoder.render(pair, pair.rejected)
        longest = max(len(encoder.completion_ids(chosen_text)), len(encoder.completion_ids(rejected_text)))
        longest_prompt = max(longest_prompt, length.prompt)
        longest_total = max(longest_total, length.prompt + longest)
        if encoder.max_length and length.prompt + longest > encoder.max_length:
            will_truncate += 1
    return {
        "longest_prompt_tokens": longest_prompt,
        "longest_pair_tokens": longest_total,
        "pairs_truncated": will_truncate,
    }
