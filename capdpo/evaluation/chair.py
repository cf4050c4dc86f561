"""CHAIR object hallucination for captions of COCO images, plus BLEU / ROUGE-L and an optional critic score (capdpo's
own VLM judge, `--critic vlm`, in `capdpo.evaluation.critic`, or any `CaptionCritic` function).

CHAIR (Rohrbach et al., 2018) reads the COCO objects a caption mentions and checks them against the objects the
image holds: those of its instance annotations plus those its reference captions mention.

- CHAIR_s = captions mentioning at least one absent object / captions
- CHAIR_i = mentions of absent objects / mentions of COCO objects (a word repeated counts each time)
- Recall  = distinct present objects the captions mention / objects the images hold (summed over captions)

The words follow the standard implementation: NLTK word tokens of the lower-cased caption, singularised with
Pattern's rules (through TextBlob, which ships them), then two-word names joined ("hot dog", "teddy bear",
"motor bike", "train track", ...; "baby X"/"adult X" is the animal X, not a person; "passenger jet/train" is the
vehicle; "bow tie" is a tie, "toilet seat" a toilet), "seat" dropped when "toilet" is there, and every remaining word
looked up in the COCO synonym list (`data/coco_synonyms.txt`). Quirks of the standard kept on purpose: Pattern
turns a singular "bus" into "bu", so only "buses" counts as a bus, and "motor bike" is read as one word that
names no object, nor do the plurals "collies" and "doggies".
"""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from capdpo.cli import parse_options
from capdpo.errors import ConfigError, InputError
from capdpo.evaluation.benchmarks import Query, need
from capdpo.evaluation.caption_metrics import (
    BUILTIN_CRITIC,
    CaptionCritic,
    CriticRequest,
    critic_scores,
    critic_spec,
    load_critic,
    text_metrics,
)
from capdpo.evaluation.nltk_setup import require_nltk_data
from capdpo.jsonl import read_json, read_jsonl, write_json, write_jsonl

SYNONYMS_FILE = Path(__file__).resolve().parent / "data" / "coco_synonyms.txt"
NLTK_PACKAGES = {"tokenizers/punkt_tab/english/": "punkt_tab"}

# Two-word names read as one word (each maps to itself): COCO names and spellings that contain a COCO word.
_JOINED = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)  # fmt: skip
# "baby"/"adult" before an animal and "passenger" before a vehicle would otherwise count as a person.
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
_VEHICLES = ("jet", "train")


def _qualified_names() -> dict[str, str]:
    """Two-word names that stand for another name (also Object HalBench's)."""
    pairs = {}
    for animal in _ANIMALS:
        pairs[f"baby {animal}"] = animal
        pairs[f"adult {animal}"] = animal
    for vehicle in _VEHICLES:
        pairs[f"passenger {vehicle}"] = vehicle
    # "glass" singularises to "glas" under Pattern's rules, hence the second spelling.
    pairs.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    return pairs


QUALIFIED_NAMES = _qualified_names()
DOUBLE_WORDS = {**{name: name for name in _JOINED}, **QUALIFIED_NAMES}


@dataclass(frozen=True)
class CocoSynonyms:
    """Word -> COCO category it names (categories name themselves)."""

    category_of: dict[str, str]

    @classmethod
    def load(cls, path: str | Path | None = None) -> CocoSynonyms:
        """Read a synonym file: one category per line, `category, synonym, ...`; `#` starts a comment line."""
        path = Path(path) if path else SYNONYMS_FILE
        if not path.is_file():
            raise InputError(f"{path}: synonym file not found")
        category_of: dict[str, str] = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            words = [w.strip() for w in line.split(",")]
            if any(not w for w in words):
                raise InputError(f"{path}:{number}: empty entry in '{line.strip()}'")
            for word in words:
                if category_of.get(word, words[0]) != words[0]:
                    raise InputError(f"{path}:{number}: '{word}' is already listed under '{category_of[word]}'")
                category_of[word] = words[0]
        if not category_of:
            raise InputError(f"{path}: no categories")
        return cls(category_of)


@lru_cache(maxsize=65536)
def _singular(word: str) -> str:
    """Pattern 3.6's singular of a word (the standard CHAIR implementation's), through TextBlob's copy of its rules.

    TextBlob's copy departs from Pattern in two places that reach COCO words; both are undone here: Pattern leaves
    the plurals of its "-ie" nouns as they are ("collies", "doggies" name no object) and turns "<x>buses" into
    "<x>bus" ("airbuses" -> airbus, an airplane; TextBlob: bus).
    """
    from textblob.en.inflect import singular_ie, singularize

    lower = word.lower()
    if lower.endswith("ies") and any(lower.endswith(ie + "s") for ie in singular_ie if ie != "bookie"):
        return lower
    if lower.endswith("buses"):
        return word[:-2]
    return singularize(word)


@dataclass(frozen=True)
class ObjectMention:
    """A COCO object word of a caption and the category it names."""

    word: str
    category: str


def caption_objects(caption: str, synonyms: CocoSynonyms) -> list[ObjectMention]:
    """The COCO objects a caption mentions, in order, one entry per mention."""
    import nltk

    words = [_singular(w) for w in nltk.word_tokenize(caption.lower())]
    joined, i = [], 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if pair in DOUBLE_WORDS:
            joined.append(DOUBLE_WORDS[pair])
            i += 2
        else:
            joined.append(words[i])
            i += 1
    if "toilet" in joined and "seat" in joined:  # "the seat of the toilet" is no chair
        joined = [w for w in joined if w != "seat"]
    return [ObjectMention(w, synonyms.category_of[w]) for w in joined if w in synonyms.category_of]


@dataclass
class CocoGroundTruth:
    """Objects and reference captions of the COCO images being scored."""

    objects: dict[int, set[str]] = field(default_factory=dict)
    references: dict[int, list[str]] = field(default_factory=dict)
    file_names: dict[int, str] = field(default_factory=dict)
    known: set[int] = field(default_factory=set)


def _annotation_file(path: str | Path, kind: str, needs: tuple[str, ...]) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in needs):
        raise InputError(f"{path}: expected a COCO {kind} file with {', '.join(repr(k) for k in needs)} lists")
    return data


def _image_id(record: dict[str, Any], where: str) -> int:
    image_id = record.get("image_id")
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise InputError(f"{where}: 'image_id' should be an integer, got {image_id!r}")
    return image_id


def load_coco_ground_truth(
    instances: list[str],
    captions: list[str],
    image_ids: set[int],
    synonyms: CocoSynonyms,
    objects_of: Callable[[str], Iterable[str]] | None = None,
) -> CocoGroundTruth:
    """Objects per image from COCO instance annotations and from the reference captions' object words.

    Several files of each kind may be given (e.g. train2014 and val2014); only `image_ids` are kept. `objects_of`
    reads a reference caption's categories (default: CHAIR's reading, `caption_objects`).
    """

    def chair_objects(text: str) -> Iterable[str]:
        return (m.category for m in caption_objects(text, synonyms))

    read_objects = objects_of or chair_objects

    truth = CocoGroundTruth(objects={i: set() for i in image_ids}, references={i: [] for i in image_ids})
    for path in instances:
        data = _annotation_file(path, "instances", ("categories", "annotations"))
        names = {c.get("id"): c.get("name") for c in data["categories"] if isinstance(c, dict)}
        for image in data.get("images") or []:
            if isinstance(image, dict) and isinstance(image.get("id"), int):
                truth.known.add(image["id"])
                if image["id"] in image_ids and isinstance(image.get("file_name"), str):
                    truth.file_names[image["id"]] = image["file_name"]
        for n, annotation in enumerate(data["annotations"], start=1):
            if not isinstance(annotation, dict):
                raise InputError(f"{path}: annotations[{n}] is not an object")
            image_id = _image_id(annotation, f"{path}: annotations[{n}]")
            truth.known.add(image_id)
            if image_id not in image_ids:
                continue
            name = names.get(annotation.get("category_id"))
            if name not in synonyms.category_of:
                raise InputError(
                    f"{path}: annotations[{n}]: category {annotation.get('category_id')!r} ({name!r}) is not a COCO "
                    "category of the synonym list"
                )
            truth.objects[image_id].add(synonyms.category_of[name])
    for path in captions:
        data = _annotation_file(path, "captions", ("annotations",))
        for image in data.get("images") or []:
            if isinstance(image, dict) and isinstance(image.get("id"), int):
                truth.known.add(image["id"])
                if image["id"] in image_ids and isinstance(image.get("file_name"), str):
                    truth.file_names.setdefault(image["id"], image["file_name"])
        for n, annotation in enumerate(data["annotations"], start=1):
            if not isinstance(annotation, dict):
                raise InputError(f"{path}: annotations[{n}] is not an object")
            image_id = _image_id(annotation, f"{path}: annotations[{n}]")
            truth.known.add(image_id)
            if image_id not in image_ids:
                continue
            text = annotation.get("caption")
            if not isinstance(text, str):
                raise InputError(f"{path}: annotations[{n}]: 'caption' should be a string")
            truth.references[image_id].append(text)
            truth.objects[image_id].update(read_objects(text))
    return truth


@dataclass
class GeneratedCaption:
    """One caption to score."""

    image_id: int
    caption: str


def read_captions(
    path: str | Path, image_id_key: str = "image_id", caption_key: str = "caption"
) -> list[GeneratedCaption]:
    """Read `[{"image_id": int, "caption": str}, ...]` from a JSON list or a JSONL file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        records = [(f"{path}:{n}", r) for n, r in _numbered_jsonl(path)]
    else:
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            data = data["annotations"]  # a COCO-results-style file
        if not isinstance(data, list):
            raise InputError(
                f'{path}: expected a JSON list of {{"{image_id_key}": int, "{caption_key}": str}} objects'
            )
        records = [(f"{path}: entry {n}", r) for n, r in enumerate(data, start=1)]
    captions = []
    for where, record in records:
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected an object with '{image_id_key}' and '{caption_key}'")
        image_id, text = record.get(image_id_key), record.get(caption_key)
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise InputError(f"{where}: '{image_id_key}' should be an integer COCO image id, got {image_id!r}")
        if not isinstance(text, str):
            raise InputError(f"{where}: '{caption_key}' should be a string, got {type(text).__name__}")
        captions.append(GeneratedCaption(image_id, text))
    if not captions:
        raise InputError(f"{path}: no captions")
    return captions


def _numbered_jsonl(path: Path) -> list[tuple[int, Any]]:
    records = read_jsonl(path)
    lines = [n for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1) if raw.strip()]
    return list(zip(lines, records, strict=True))


@dataclass
class ChairResult:
    """CHAIR figures (percentages, one decimal), their counts, and one row per caption."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]


def compute_chair(captions: list[GeneratedCaption], truth: CocoGroundTruth, synonyms: CocoSynonyms) -> ChairResult:
    """CHAIR_s, CHAIR_i and object recall of captions against the images' objects."""
    counts = dict.fromkeys(
        ("captions", "hallucinated_captions", "object_mentions", "hallucinated_mentions", "recalled", "gt_objects"), 0
    )
    rows = []
    for item in captions:
        mentions = caption_objects(item.caption, synonyms)
        present = truth.objects[item.image_id]
        hallucinated = [m for m in mentions if m.category not in present]
        recalled = {m.category for m in mentions if m.category in present}
        counts["captions"] += 1
        counts["hallucinated_captions"] += bool(hallucinated)
        counts["object_mentions"] += len(mentions)
        counts["hallucinated_mentions"] += len(hallucinated)
        counts["recalled"] += len(recalled)
        counts["gt_objects"] += len(present)
        rows.append(
            {
                "image_id": item.image_id,
                "caption": item.caption,
                "mentioned": [[m.word, m.category] for m in mentions],
                "hallucinated": [[m.word, m.category] for m in hallucinated],
                "gt_objects": sorted(present),
                "CHAIR_s": int(bool(hallucinated)),
                "CHAIR_i": len(hallucinated) / len(mentions) if mentions else 0.0,
            }
        )

    def percent(part: int, whole: int) -> float:
        return round(100 * part / whole, 1) if whole else 0.0

    metrics = {
        "CHAIR_s": percent(counts["hallucinated_captions"], counts["captions"]),
        "CHAIR_i": percent(counts["hallucinated_mentions"], counts["object_mentions"]),
        "Recall": percent(counts["recalled"], counts["gt_objects"]),
        "counts": counts,
    }
    return ChairResult(metrics, rows)


def evaluate_captions(
    captions: list[GeneratedCaption],
    truth: CocoGroundTruth,
    synonyms: CocoSynonyms,
    *,
    text: bool = True,
    critic: Callable[..., Any] | None = None,
    critic_options: dict[str, Any] | None = None,
    images_dir: str | Path | None = None,
) -> ChairResult:
    """CHAIR, then (optionally) BLEU / ROUGE-L against the references and a critic's 0-100 scores."""
    result = compute_chair(captions, truth, synonyms)
    if text:
        references = [truth.references[c.image_id] for c in captions]
        missing = next((c.image_id for c, refs in zip(captions, references, strict=True) if not refs), None)
        if missing is not None:
            raise InputError(f"image {missing} has no reference captions in the COCO captions file(s)")
        figures, rouge = text_metrics([c.caption for c in captions], references)
        result.metrics.update(figures)
        for row, value in zip(result.rows, rouge, strict=True):
            row["ROUGE-L"] = round(value, 2)
    if critic is not None:
        requests = [
            CriticRequest(
                image_id=c.image_id,
                image=str(Path(images_dir) / truth.file_names[c.image_id])
                if images_dir and c.image_id in truth.file_names
                else None,
                caption=c.caption,
                references=list(truth.references[c.image_id]),
            )
            for c in captions
        ]
        figures, scores = critic_scores(critic, requests, critic_options)
        result.metrics.update(figures)
        for row, score in zip(result.rows, scores, strict=True):
            row["Critic"] = score
    return result


def format_table(metrics: dict[str, Any]) -> str:
    """A readable table of the figures."""
    names = [k for k in ("CHAIR_s", "CHAIR_i", "Recall", "BLEU-1", "BLEU-4", "ROUGE-L", "Critic") if k in metrics]
    c = metrics["counts"]
    lines = [
        "".join(f"{k:>10}" for k in names),
        "".join(f"{metrics[k] if metrics[k] is not None else '-':>10}" for k in names),
        "",
        f"{c['captions']} captions, {c['hallucinated_captions']} with a hallucinated object; "
        f"{c['object_mentions']} object mentions, {c['hallucinated_mentions']} hallucinated; "
        f"{c['recalled']} of {c['gt_objects']} image objects recalled",
    ]
    if "Critic_unparsed" in metrics:
        lines.append(f"critic: {metrics['Critic_unparsed']} unreadable scores")
    return "\n".join(lines)


# ---- answers (eval/answers.py --benchmark coco) ---------------------------------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_TRAILING_NUMBER = re.compile(r"(\d+)$")


def coco_queries(sec: Any, seed: int) -> tuple[list[Query], None]:
    """COCO images for CHAIR: from the annotation file's `images` list, else every image file of the folder."""
    images = need(sec.images, "images", "coco")
    entries: list[tuple[int, Path]] = []
    if sec.data:
        ann = read_json(sec.data)
        if not isinstance(ann, dict) or not isinstance(ann.get("images"), list):
            raise InputError(f"{sec.data}: expected a COCO annotation file with an 'images' list")
        for i, image in enumerate(ann["images"]):
            if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
                raise InputError(f"{sec.data}: images[{i}] needs 'id' and 'file_name'")
            entries.append((int(image["id"]), images / image["file_name"]))
    else:
        if not images.is_dir():
            raise InputError(f"{images}: image folder not found")
        for path in sorted(images.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            match = _TRAILING_NUMBER.search(path.stem)
            if not match:
                raise InputError(f"{path}: no COCO image id at the end of the file name; pass --data ANNOTATIONS.json")
            entries.append((int(match.group(1)), path))
    entries.sort()
    if sec.num_images and sec.num_images < len(entries):
        entries = sorted(random.Random(seed).sample(entries, sec.num_images))
    prompt = sec.caption_prompt + sec.query_suffix
    return [Query(str(image_id), image_id, path, prompt) for image_id, path in entries], None


def write_coco(sec: Any, queries: list[Query], answers: list[dict[str, Any]], context: Any) -> dict[str, Any]:
    """`[{"image_id", "caption"}]`, as the CHAIR scorer reads it."""
    rows = [{"image_id": q.question_id, "caption": a["text"]} for q, a in zip(queries, answers, strict=True)]
    write_json(sec.out, rows)
    return {}


# --- command line ---------------------------------------------------------------------------------------------


@dataclass
class ChairArgs:
    """Options of `python eval/chair.py`."""

    captions: str = field(
        metadata={"help": 'Generated captions: JSON list (or JSONL) of {"image_id": int, "caption": str}.'}
    )
    coco_instances: list[str] = field(
        metadata={"help": "COCO instances json file(s), e.g. instances_val2014.json, or a folder of instances_*.json."}
    )
    coco_captions: list[str] = field(
        metadata={"help": "COCO captions json file(s), e.g. captions_val2014.json, or a folder of captions_*.json."}
    )
    out: str = field(default="", metadata={"help": "Write the figures to this JSON file."})
    details: str = field(default="", metadata={"help": "Also write one JSONL line per caption (objects, verdicts)."})
    synonyms: str = field(
        default="", metadata={"help": "COCO synonym list (default: capdpo's copy of the standard one)."}
    )
    image_id_key: str = field(default="image_id", metadata={"help": "Key of the image id in the captions file."})
    caption_key: str = field(default="caption", metadata={"help": "Key of the caption in the captions file."})
    no_text_metrics: bool = field(default=False, metadata={"help": "Skip BLEU / ROUGE-L."})
    critic: str = field(
        default="",
        metadata={
            "help": "Optional judge rating each caption 0-100: 'vlm' (or 'llava-critic'), capdpo's VLM critic that "
            "sees the image and the references (capdpo/evaluation/critic.py; needs --coco_images), or any "
            "package.module:function (see caption_metrics)."
        },
    )
    critic_config: str = field(
        default="", metadata={"help": "JSON/YAML file of keyword options for the critic (the flags below override)."}
    )
    critic_model: str = field(
        default="",
        metadata={
            "help": "--critic vlm: the critic model, a local folder or hub id (default lmms-lab/llava-critic-7b, "
            "which needs converting to the transformers format), or with --critic_url the served model's name."
        },
    )
    critic_url: str = field(
        default="",
        metadata={
            "help": "--critic vlm: OpenAI-compatible endpoint serving the critic, e.g. http://127.0.0.1:30000/v1."
        },
    )
    critic_cache: str = field(
        default="",
        metadata={"help": "--critic vlm: reply cache (JSONL; default <out stem>.critic_cache.jsonl beside --out)."},
    )
    coco_images: str = field(default="", metadata={"help": "COCO images folder, so the critic gets image paths."})
    nltk_data: str = field(default="", metadata={"help": "Folder with NLTK data, searched before $NLTK_DATA."})


def parse_args(argv: list[str] | None) -> ChairArgs:
    """Parse the command line into `ChairArgs` (one-line ConfigError on a bad flag)."""
    return parse_options(ChairArgs, argv, "CHAIR_s / CHAIR_i / recall, BLEU and ROUGE-L of captions of COCO images.")


def annotation_files(paths: list[str], kind: str) -> list[str]:
    """Annotation files as given; a folder stands for its `<kind>_*.json` files (e.g. train2014 and val2014)."""
    files = []
    for path in paths:
        if Path(path).is_dir():
            found = sorted(str(p) for p in Path(path).glob(f"{kind}_*.json"))
            if not found:
                raise InputError(f"{path}: no {kind}_*.json files in this folder")
            files += found
        else:
            files.append(path)
    return files


def _critic_options(path: str) -> dict[str, Any]:
    if not path:
        return {}
    if path.endswith((".yaml", ".yml")):
        from capdpo.config import read_yaml

        options = read_yaml(path)
    else:
        options = read_json(path)
    if not isinstance(options, dict):
        raise ConfigError(f"{path}: critic options must be a mapping of keyword -> value")
    return options


_BUILTIN_FLAGS = ("critic_model", "critic_url", "critic_cache")


def critic_setup(args: ChairArgs) -> tuple[CaptionCritic | None, dict[str, Any]]:
    """The critic `--critic` names and its options (`--critic_config`, then the built-in critic's flags), checked
    before anything is scored."""
    given = [name for name in _BUILTIN_FLAGS if getattr(args, name)]
    if not args.critic:
        if given:
            raise ConfigError(f"--{given[0]}: only with --critic vlm (the built-in critic)")
        return None, {}
    critic = load_critic(args.critic)
    options = _critic_options(args.critic_config)
    if critic_spec(args.critic) != BUILTIN_CRITIC:
        if given:
            raise ConfigError(
                f"--{given[0]}: only for the built-in critic (--critic vlm); give {args.critic}'s options in "
                "--critic_config"
            )
        return critic, options
    if not args.coco_images:
        raise ConfigError(f"--critic {args.critic}: the critic looks at the images; pass --coco_images FOLDER")
    if args.critic_url:
        options["critic_url"] = args.critic_url
    if args.critic_model:
        options["critic_model" if options.get("critic_url") else "model"] = args.critic_model
    if args.critic_cache:
        options["cache"] = args.critic_cache
    elif not options.get("cache"):
        if not args.out:
            raise ConfigError(
                f"--critic {args.critic}: pass --critic_cache FILE for the critic's replies (or --out, which puts "
                "the cache beside it)"
            )
        from capdpo.evaluation.judge import default_side_path

        options["cache"] = str(default_side_path(args.out, ".critic_cache.jsonl"))
    from capdpo.evaluation.critic import critic_options

    critic_options(options, args.critic_config or f"--critic {args.critic}")
    return critic, options


def evaluate(args: ChairArgs) -> dict[str, Any]:
    """Score a captions file; write `--out`/`--details`; return the figures."""
    critic, options = critic_setup(args)
    require_nltk_data(NLTK_PACKAGES, args.nltk_data or None)
    synonyms = CocoSynonyms.load(args.synonyms or None)
    captions = read_captions(args.captions, args.image_id_key, args.caption_key)
    image_ids = {c.image_id for c in captions}
    instances = annotation_files(args.coco_instances, "instances")
    references = annotation_files(args.coco_captions, "captions")
    truth = load_coco_ground_truth(instances, references, image_ids, synonyms)
    unknown = sorted(image_ids - truth.known)
    if unknown:
        raise InputError(
            f"{args.captions}: image {unknown[0]} ({len(unknown)} unknown in all) is in none of the COCO annotation "
            "files given; pass the instances/captions files of the split the images come from"
        )
    result = evaluate_captions(
        captions,
        truth,
        synonyms,
        text=not args.no_text_metrics,
        critic=critic,
        critic_options=options,
        images_dir=args.coco_images or None,
    )
    if args.out:
        write_json(args.out, result.metrics)
    if args.details:
        write_jsonl(args.details, result.rows)
    print(format_table(result.metrics))
    return result.metrics


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see eval/chair.py)."""
    from capdpo.cli import run_cli

    run_cli(lambda a: evaluate(parse_args(a)), argv)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
