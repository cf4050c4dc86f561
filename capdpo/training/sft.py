"""The SFT recipe: supervised fine-tuning of a VLM on (image, prompt, response) records, with stage 6's machinery.

    python -m capdpo sft --config run.yaml [--data_file sft.jsonl --method full --max_steps 500 ...]
    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 8 -m capdpo sft --config run.yaml

Reads the `sft:` section of the run YAML. Outputs, in `<output_dir>/` (default `<run_dir>/sft/`): `adapter/` (or
`model/` for full fine-tuning), `merged/` (with `merge: true`), resumable `checkpoints/`, `log.jsonl`,
`summary.json`; `sft.meta.json`, `sft.config.yaml`, `sft.stats.json`, `sft.done` beside the folder.

A record becomes one sequence::

    [chat template + user turn (image first, then the prompt) + assistant header] [response + end-of-turn token]

rendered and tokenized exactly as stage 6 renders a pair's chosen side (`PairEncoder`), so what SFT trains on is
what the DPO stage and the generation engine see. Labels are -100 on every prompt token (the template, the image
tokens, the user's text, the assistant header); the loss covers only the response and its end-of-turn token.
TRL's SFTTrainer runs the steps (its dataset preparation is skipped: the collator builds the labels); targets,
loading, DeepSpeed, checkpoints and resuming are `capdpo.training.setup`'s, as for DPO.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.errors import InputError
from capdpo.generation.batching import SEQUENCE_KEYS, ImageInputs
from capdpo.images import load_image
from capdpo.jsonl import iter_jsonl, stable_id
from capdpo.pipeline import stage as stage_info
from capdpo.records import PairRecord
from capdpo.run import Stage
from capdpo.sections import load_config
from capdpo.splits import split_of
from capdpo.training.config import SftConfig
from capdpo.training.data import PairEncoder, PromptLength
from capdpo.training.setup import Outcome, Prepared, Recipe, peft_setup, run_training, speed_up_training

EXAMPLE_COLUMNS = ("id", "image_id", "image", "prompt", "response")


@dataclass
class SftExample:
    """One supervised example: the model should answer `prompt` about `image` with `response`."""

    id: str
    image_id: str
    image: str
    prompt: str
    response: str
    split: str = "train"

    def as_pair(self) -> PairRecord:
        """The example as a pair whose chosen side is the response (for `PairEncoder`'s rendering)."""
        return PairRecord(
            id=self.id,
            image_id=self.image_id,
            image=self.image,
            prompt=self.prompt,
            chosen=self.response,
            rejected=self.response,
            score_chosen=1.0,
            score_rejected=1.0,
            mode="sft",
        )


def read_examples(path: str | Path, default_split: str = "train") -> list[tuple[int, SftExample]]:
    """(record number, example) for every record of an SFT JSONL.

    A record needs `image`, `prompt` and `response` (or `text`, as stage 2's descriptions have); `id`, `image_id`
    and `split` are optional. Missing fields and unreadable images are one-line `InputError`s naming the record.
    """
    path = Path(path)
    out = []
    for number, record in enumerate(iter_jsonl(path), start=1):
        where = f"{path}: record {number}"
        response = record.get("response", record.get("text"))
        missing = [k for k, v in (("image", record.get("image")), ("prompt", record.get("prompt"))) if not v]
        if response is None or not str(response).strip():
            missing.append("response")
        if missing:
            raise InputError(f"{where}: missing or empty field(s) {', '.join(missing)} (need image, prompt, response)")
        if not all(isinstance(record[k], str) for k in ("image", "prompt")) or not isinstance(response, str):
            raise InputError(f"{where}: image, prompt and response must be strings")
        image = record["image"]
        if not Path(image).is_file():
            raise InputError(f"{where}: image {image} not found")
        split = record.get("split", default_split)
        if split not in ("train", "val"):
            raise InputError(f"{where}: split '{split}' is not train or val")
        example = SftExample(
            id=str(record.get("id") or stable_id("sft", number, image, record["prompt"], response)),
            image_id=str(record.get("image_id") or image),
            image=image,
            prompt=record["prompt"],
            response=response,
            split=split,
        )
        out.append((number, example))
    return out


def split_by_image(examples: list[SftExample], fraction: float, seed: int) -> list[SftExample]:
    """Examples with `split` set: a seeded share `fraction` of images (never single records) goes to val, by the
    same rule as stage 5's pairs (`capdpo.splits`)."""
    if not fraction:
        return examples
    return [
        replace(ex, split="val" if split_of(ex.image_id, seed, fraction) == "val" else ex.split) for ex in examples
    ]


# ---- encoding ----------------------------------------------------------------------------------------------
@dataclass
class EncodedExample:
    prompt: dict[str, Any]  # processor output for the prompt (batch of 1): input_ids, pixel_values, ...
    response_ids: list[int]
    truncated: bool


class SftEncoder:
    """Renders and tokenizes SFT examples with a model's processor, exactly as stage 6 renders a chosen side.

    Args:
        processor: the model's processor.
        max_length: token limit of prompt + response (0: none).
        cache_images: keep each image's pixel values after its first use and expand the image tokens of the
            text directly (Qwen-style processors), instead of re-processing the image for every record and epoch.
            Checked once against the processor's own output; a processor that differs never uses the cache.
    """

    def __init__(self, processor: Any, max_length: int = 0, cache_images: bool = False) -> None:
        self.pairs = PairEncoder(processor, max_length)
        self.max_length = max_length
        self.pad_id = self.pairs.pad_id
        self.images = ImageInputs(processor, enabled=cache_images)

    @property
    def image_cache(self) -> dict[str, dict[str, Any]] | None:
        """Each image's pixel tensors by path, while the shortcut is in use (None: the processor runs every time)."""
        return self.images.cache

    def prompt_inputs(self, prompt_text: str, image_path: str) -> dict[str, Any]:
        """Processor output for one prompt with its image (batch of 1)."""
        return self.images(prompt_text, image_path, load_image)

    def response_ids(self, example: SftExample) -> list[int]:
        """Token ids of the response up to and including the assistant turn's end token."""
        _, completion = self.pairs.render(example.as_pair(), example.response)
        return self.pairs.completion_ids(completion)

    def prompt_length(self, example: SftExample) -> PromptLength:
        return self.pairs.prompt_length(example.as_pair())

    def encode(self, example: SftExample) -> EncodedExample:
        pair = example.as_pair()
        prompt_text, completion = self.pairs.render(pair, example.response)
        prompt = self.prompt_inputs(prompt_text, example.image)
        response = self.pairs.completion_ids(completion)
        truncated = False
        if self.max_length:
            ids = prompt["input_ids"][0].tolist()
            image_id = self.pairs.image_token_id
            image_end = max((i + 1 for i, t in enumerate(ids) if t == image_id), default=0)
            self.pairs.check_fits(pair, PromptLength(len(ids), image_end, ids.count(image_id)), "sft data")
            room = self.max_length - len(ids)
            truncated = len(response) > room
            response = response[:room]
        return EncodedExample(prompt=dict(prompt), response_ids=response, truncated=truncated)


def example_row(example: SftExample) -> dict[str, Any]:
    """The dataset row of an example (flat string columns)."""
    return {name: getattr(example, name) for name in EXAMPLE_COLUMNS}


class SftCollator:
    """Batches examples for the trainer: right-padded input ids, labels -100 everywhere but the response tokens."""

    def __init__(self, encoder: SftEncoder) -> None:
        self.encoder = encoder
        self.truncated_ids: set[str] = set()

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        examples = [SftExample(**{k: row[k] for k in EXAMPLE_COLUMNS}) for row in rows]
        encoded = [self.encoder.encode(ex) for ex in examples]
        self.truncated_ids.update(ex.id for ex, enc in zip(examples, encoded) if enc.truncated)
        width = max(int(e.prompt["input_ids"].shape[1]) + len(e.response_ids) for e in encoded)
        seq_keys = [k for k in SEQUENCE_KEYS if k in encoded[0].prompt]
        batch: dict[str, Any] = {}
        for key in seq_keys:
            fill = self.encoder.pad_id if key == "input_ids" else 0
            out = torch.full((len(encoded), width), fill, dtype=encoded[0].prompt[key].dtype)
            for r, enc in enumerate(encoded):
                values = enc.prompt[key][0]
                n = values.shape[0]
                out[r, :n] = values
                if key == "input_ids":
                    out[r, n : n + len(enc.response_ids)] = torch.tensor(enc.response_ids, dtype=out.dtype)
                elif key == "attention_mask":
                    out[r, n : n + len(enc.response_ids)] = 1
            batch[key] = out
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        for r, enc in enumerate(encoded):
            n = int(enc.prompt["input_ids"].shape[1])
            labels[r, n : n + len(enc.response_ids)] = torch.tensor(enc.response_ids, dtype=torch.long)
        batch["labels"] = labels
        for key, value in encoded[0].prompt.items():
            if key not in seq_keys and torch.is_tensor(value):
                batch[key] = torch.cat([e.prompt[key] for e in encoded], dim=0)
        return batch


def check_examples(examples: list[tuple[int, SftExample]], encoder: SftEncoder, source: Path | str) -> dict[str, int]:
    """Refuse duplicate ids and prompts whose image tokens max_length would cut; return length stats.

    Runs before any model is loaded; image token counts come from the image size where the processor can tell.
    """
    seen: set[str] = set()
    longest_prompt = longest_total = will_truncate = 0
    for number, example in examples:
        where = f"{source}: record {number}"
        if example.id in seen:
            raise InputError(f"{where}: id {example.id} appears twice; ids must be unique (or leave them out)")
        seen.add(example.id)
        length = encoder.prompt_length(example)
        encoder.pairs.check_fits(example.as_pair(), length, where)
        total = length.prompt + len(encoder.response_ids(example))
        longest_prompt = max(longest_prompt, length.prompt)
        longest_total = max(longest_total, total)
        will_truncate += bool(encoder.max_length and total > encoder.max_length)
    return {
        "longest_prompt_tokens": longest_prompt,
        "longest_example_tokens": longest_total,
        "examples_truncated": will_truncate,
    }


# ---- the recipe -----------------------------------------------------------------------------------------------
def load_examples(cfg: LoadedConfig) -> tuple[Path, list[tuple[int, SftExample]]]:
    """The training file and every example (train and val), validation records from val_file or val_fraction."""
    settings: SftConfig = cfg.section
    if settings.data_file:
        source = Path(settings.data_file)
        if not source.is_file():
            raise InputError(f"sft.data_file: {source} not found")
    else:
        source = Path(cfg.common.run_dir) / stage_info("describe").output
        Stage("describe", cfg).read_input("describe")  # refuses an unfinished stage 2 unless allow_partial
    examples = read_examples(source)
    if settings.val_file:
        if not Path(settings.val_file).is_file():
            raise InputError(f"sft.val_file: {settings.val_file} not found")
        examples += read_examples(settings.val_file, default_split="val")
    split = split_by_image([ex for _, ex in examples], settings.val_fraction, cfg.common.seed)
    return source, [(n, ex) for (n, _), ex in zip(examples, split)]


class SftRecipe(Recipe):
    """SFT as a `Recipe` (see `capdpo.training.setup.run_training`)."""

    tag = "sft"
    model_field = "sft.model"
    fresh = "output_dir"
    train_fields = (("token acc", "mean_token_accuracy", ".3f"),)
    signature_keys = ("model", "examples")

    def __init__(self, cfg: LoadedConfig) -> None:
        self.cfg = cfg
        self.settings: SftConfig = cfg.section
        self.output = Path(self.settings.output_dir) if self.settings.output_dir else Path(cfg.common.run_dir) / "sft"
        self.model = self.settings.model or cfg.common.strong_model

    def stage(self) -> Stage:
        return Stage("sft", self.cfg, output=self.output)

    def prepare(self, processor: Any) -> Prepared:
        source, examples = load_examples(self.cfg)
        train = [ex for _, ex in examples if ex.split == "train"]
        val = [ex for _, ex in examples if ex.split == "val"]
        if self.settings.max_examples:
            train = train[: self.settings.max_examples]
        if not train:
            raise InputError(f"{source}: no training records")
        used = {ex.id for ex in train + val}
        encoder = SftEncoder(processor, self.settings.max_length)
        length_stats = check_examples([(n, ex) for n, ex in examples if ex.id in used], encoder, source)
        return Prepared(train=train, val=val, example_ids=sorted(used), length_stats=length_stats)

    def arguments(self, base: dict[str, Any]) -> Any:
        from trl import SFTConfig

        # the collator renders, tokenizes, masks and truncates
        return SFTConfig(**base, dataset_kwargs={"skip_prepare_dataset": True}, packing=False)

    def trainer(self, lm: Any, data: Prepared, args: Any, callbacks: list[Any] | None) -> Any:
        from datasets import Dataset
        from trl import SFTTrainer

        collator = SftCollator(SftEncoder(lm.processor, self.settings.max_length, self.settings.cache_images))
        trainer = SFTTrainer(
            model=lm.model,
            args=args,
            data_collator=collator,
            train_dataset=Dataset.from_list([example_row(e) for e in data.train]),
            eval_dataset=Dataset.from_list([example_row(e) for e in data.val]) if data.val else None,
            processing_class=lm.processor,
            peft_config=peft_setup(self.settings, lm.model),
            callbacks=callbacks,
        )
        trainer.tuned = speed_up_training(
            trainer, trainer.model, self.settings.fused_kernels, self.settings.compile_layers
        )
        return trainer

    def summary(
        self, trainer: Any, result: Any, data: Prepared, seconds: float, resumed_from: str | None
    ) -> dict[str, Any]:
        history = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
        return {
            "model": self.model,
            "train_examples": len(data.train),
            "val_examples": len(data.val),
            "final_token_accuracy": history[-1].get("mean_token_accuracy", float("nan")) if history else float("nan"),
            "truncated_responses": data.length_stats["examples_truncated"],
            "longest_example_tokens": data.length_stats["longest_example_tokens"],
        }

    def closing(self, summary: dict[str, Any], data: Prepared, saved: Path) -> tuple[dict[str, Any], str]:
        stats = {k: summary[k] for k in ("train_examples", "val_examples", "steps", "final_loss", "train_seconds")}
        text = (
            f"{summary['steps']} steps on {len(data.train)} records, loss {summary['first_loss']:.4f} -> "
            f"{summary['final_loss']:.4f}; {saved.name} in {saved}."
        )
        return stats, text


def run_sft(cfg: LoadedConfig) -> Outcome:
    """Check the data, load the model, fine-tune (resuming when possible), save and summarise."""
    return run_training(SftRecipe(cfg))


def main(argv: list[str] | None = None) -> None:
    """`python -m capdpo sft --config run.yaml [...]`."""
    run_cli(lambda args: run_sft(load_config("sft", args, description=__doc__.split("\n\n")[0])), argv)
