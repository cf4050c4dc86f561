"""AMBER scoring with the same numbers as the benchmark's official `inference.py`.

AMBER (Wang et al., 2023) scores two kinds of answers:

- generative (ids 1-1004, "Describe this image."): the nouns of a description are matched against the image's
  annotated objects (`truth`), their associated words (`relation.json`) and plausible absent objects (`hallu`).
  CHAIR = hallucinated nouns / all object nouns, Cover = annotated objects mentioned / annotated objects,
  Hal = descriptions with at least one hallucinated noun / descriptions, Cog = plausible absent objects mentioned /
  plausible absent objects.
- discriminative (ids 1005-15220, yes/no questions): accuracy, precision, recall and F1 with "No" as the positive
  class, overall and per dimension: existence, attribute (state, number, action) and relation.

Where the official scorer has quirks they are kept, because the point is numbers comparable with published ones:
counters start from `metrics.txt` (the denominators from 0.001), F1 is computed from the already rounded precision
and recall (plus 0.0001 in the denominator, 0.001 for existence), only the exact strings "Yes" and "No" count as
answers, a noun on the global safe list still counts in CHAIR's denominator, and a word listed for two objects
marks the first of them. Nouns come from NLTK (Punkt tokens, the averaged-perceptron tagger, WordNet lemmas) with
no lower-casing, so a capitalised "Dog" is not an object word. The word-similarity step (a spaCy vector model,
`en_core_web_lg` officially) rescues nouns that are near-synonyms of an annotated object; without spaCy it is
skipped with one warning and CHAIR/Hal can only come out higher (Cover/Cog lower) than the official figures.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from capdpo.cli import parse_options
from capdpo.errors import ConfigError, InputError
from capdpo.evaluation.benchmarks import Query, need
from capdpo.evaluation.nltk_setup import require_nltk_data
from capdpo.evaluation.yesno import normalise_yes_no
from capdpo.jsonl import read_json, read_jsonl, write_json, write_jsonl

EVALUATION_TYPES = ("a", "g", "d", "de", "da", "dr")
DATA_FILES = ("annotations.json", "relation.json", "safe_words.txt")
NLTK_PACKAGES = {
    "tokenizers/punkt_tab/english/": "punkt_tab",
    "taggers/averaged_perceptron_tagger_eng/": "averaged_perceptron_tagger_eng",
    "corpora/wordnet": "wordnet",
}
# The official metrics.txt: every count starts at 0, every denominator at 0.001 (so an empty group scores 0).
_GROUPS = ("qa", "as_qa", "an_qa", "aa_qa", "ha_qa", "asso_qa")
DEFAULT_COUNTERS: dict[str, float] = {
    **{f"{name}_score": 0 for name in ("chair", "safe_cover", "hallu_cover", "non_hallu")},
    **{f"{name}_num": 0.001 for name in ("chair", "safe_cover", "hallu_cover", "non_hallu")},
    **{f"{g}_{part}_score": 0 for g in _GROUPS for part in ("correct", "no", "ans_no")},
    **{f"{g}_{part}_num": 0.001 for g in _GROUPS for part in ("correct", "no", "ans_no")},
}
# Annotation type -> counter prefix; every other discriminative type counts as relation, as in the official scorer.
_PREFIX_OF_TYPE = {
    "discriminative-attribute-state": "as_qa",
    "discriminative-attribute-number": "an_qa",
    "discriminative-attribute-action": "aa_qa",
    "discriminative-hallucination": "ha_qa",
}
_RELATION_PREFIX = "asso_qa"
_DIMENSION_OF_PREFIX = {
    "as_qa": "state",
    "an_qa": "number",
    "aa_qa": "action",
    "ha_qa": "existence",
    "asso_qa": "relation",
}

Similarity = Callable[[str, str], float]
"""Similarity of two words (the official scorer: spaCy `nlp(a).similarity(nlp(b))`)."""


@dataclass(frozen=True)
class AmberData:
    """The official annotation files of one AMBER `data/` folder."""

    folder: Path
    annotations: list[dict[str, Any]]
    association: dict[str, list[str]]
    safe_words: frozenset[str]
    initial_counters: dict[str, float]
    hallucination_words: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        words = set(self.association)
        for related in self.association.values():
            words.update(related)
        object.__setattr__(self, "hallucination_words", frozenset(words))

    def annotation(self, amber_id: int) -> dict[str, Any]:
        """The annotation of a query id (ids count from 1, as in the query files)."""
        return self.annotations[amber_id - 1]

    def related(self, word: str, amber_id: int) -> list[str]:
        """Words associated with an annotated object (`relation.json`)."""
        try:
            return self.association[word]
        except KeyError:
            raise InputError(
                f"{self.folder / 'relation.json'}: no entry for '{word}', an object of id {amber_id} in annotations.json"
            ) from None


def find_data_folder(amber_dir: str | Path) -> Path:
    """The folder holding AMBER's annotation files: `amber_dir` itself or its `data/` subfolder."""
    root = Path(amber_dir)
    for folder in (root, root / "data"):
        if (folder / "annotations.json").is_file():
            return folder
    if not root.exists():
        raise InputError(f"{root}: AMBER folder not found")
    raise InputError(
        f"{root}: no annotations.json here or in {root / 'data'}; point --amber-dir at the official AMBER data/ folder"
    )


def load_amber_data(amber_dir: str | Path) -> AmberData:
    """Read annotations.json, relation.json, safe_words.txt and metrics.txt (optional) from an AMBER folder."""
    folder = find_data_folder(amber_dir)
    for name in DATA_FILES:
        if not (folder / name).is_file():
            raise InputError(f"{folder / name}: file not found (part of the official AMBER data/ folder)")
    annotations = read_json(folder / "annotations.json")
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise InputError(f"{folder / 'annotations.json'}: expected a JSON list of annotation objects")
    association = read_json(folder / "relation.json")
    if not isinstance(association, dict) or not all(isinstance(v, list) for v in association.values()):
        raise InputError(f"{folder / 'relation.json'}: expected a JSON object of word -> list of related words")
    # One word per line; a final line without a newline counts too (the official file ends that way).
    safe_words = frozenset((folder / "safe_words.txt").read_text(encoding="utf-8").split("\n"))
    counters = dict(DEFAULT_COUNTERS)
    if (folder / "metrics.txt").is_file():
        counters.update(read_initial_counters(folder / "metrics.txt"))
    return AmberData(folder, annotations, association, safe_words, counters)


def read_initial_counters(path: Path) -> dict[str, float]:
    """Parse `name=value` lines of AMBER's metrics.txt (lines of another shape are ignored, as officially)."""
    counters = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        parts = line.strip().split("=")
        if len(parts) != 2:
            continue
        name, raw = parts[0].strip(), parts[1].strip()
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{path}:{number}: '{name}' should be a number, got {raw!r}")
        counters[name] = value
    return counters


# --- NLTK and spaCy -------------------------------------------------------------------------------------------


def ensure_nltk_data(extra_dir: str | Path | None = None) -> None:
    """Make sure NLTK finds what AMBER's noun extraction needs (`extra_dir` first, then `NLTK_DATA`)."""
    require_nltk_data(NLTK_PACKAGES, extra_dir)


@lru_cache(maxsize=1)
def _lemmatizer() -> Any:
    from nltk.stem import WordNetLemmatizer

    return WordNetLemmatizer()


def extract_nouns(text: str) -> list[str]:
    """The WordNet noun lemmas of every token NLTK tags as a noun (NN*), in order, case kept."""
    import nltk

    tagged = nltk.pos_tag(nltk.word_tokenize(text))
    lemmatizer = _lemmatizer()
    return [lemmatizer.lemmatize(word) for word, tag in tagged if tag.startswith("NN")]


def spacy_similarity(model: str) -> tuple[Similarity | None, str]:
    """A word-similarity function backed by a spaCy vector model, or (None, why) when it cannot be loaded."""
    try:
        import spacy
    except ImportError:
        return None, "spaCy is not installed"
    try:
        nlp = spacy.load(model)
    except (OSError, ImportError) as err:
        return None, f"spaCy model '{model}' could not be loaded ({str(err).splitlines()[0][:120]})"

    doc = lru_cache(maxsize=None)(nlp)

    def similarity(word1: str, word2: str) -> float:
        import warnings

        with warnings.catch_warnings():
            # Words without a vector score 0 and spaCy warns about each; the official scorer silences them too.
            warnings.simplefilter("ignore", UserWarning)
            return float(doc(word1).similarity(doc(word2)))

    return similarity, ""


# --- scoring --------------------------------------------------------------------------------------------------


@dataclass
class GenerativeItem:
    """How one description was scored."""

    id: int
    nouns: list[str]
    hallucinated: list[str]
    truth_covered: list[str]
    hallu_mentioned: list[str]


def _first_owner(words: list[tuple[str, int]], noun: str) -> int | None:
    for word, owner in words:
        if word == noun:
            return owner
    return None


def score_description(
    data: AmberData, amber_id: int, response: str, similarity: Similarity | None, threshold: float
) -> GenerativeItem:
    """Score one generative response against its annotation.

    Every annotated object owns itself and its associated words; the candidate list of the official scorer puts
    all associated words first (objects in annotation order) and the objects themselves last, and a noun marks the
    owner of its first match in that list.
    """
    annotation = data.annotation(amber_id)
    truth, hallu = annotation["truth"], annotation["hallu"]
    safe_owned = [(w, i) for i, obj in enumerate(truth) for w in data.related(obj, amber_id)]
    safe_owned += [(obj, i) for i, obj in enumerate(truth)]
    hallu_owned = [(w, i) for i, obj in enumerate(hallu) for w in data.related(obj, amber_id)]
    hallu_owned += [(obj, i) for i, obj in enumerate(hallu)]
    safe_set = {w for w, _ in safe_owned}

    nouns = [n for n in extract_nouns(response) if n in data.hallucination_words]
    covered: set[int] = set()
    mentioned: set[int] = set()
    hallucinated = []
    for noun in nouns:
        if noun in data.safe_words:
            continue
        if noun in safe_set:
            covered.add(_first_owner(safe_owned, noun))  # type: ignore[arg-type]
            continue
        owner = _first_owner(hallu_owned, noun)
        if owner is not None:
            mentioned.add(owner)
        if similarity is not None:
            # The official order: mark the first near-synonym among the absent objects' words, then spare the noun
            # if it is a near-synonym of an annotated object's word.
            for word, owner in hallu_owned:
                if similarity(noun, word) > threshold:
                    mentioned.add(owner)
                    break
            rescued = next((o for w, o in safe_owned if similarity(noun, w) > threshold), None)
            if rescued is not None:
                covered.add(rescued)
                continue
        hallucinated.append(noun)
    return GenerativeItem(
        id=amber_id,
        nouns=nouns,
        hallucinated=hallucinated,
        truth_covered=[truth[i] for i in sorted(covered)],
        hallu_mentioned=[hallu[i] for i in sorted(mentioned)],
    )


def normalize_yes_no(answer: str) -> str:
    """'Yes'/'No' for an answer that commits to one ("Yes, there is a dog." -> "Yes"); else unchanged.

    The official scorer compares the exact strings "Yes" and "No"; answers must be normalised before scoring
    (`answers` does it, or `--normalize-answers`). Both use `capdpo.evaluation.yesno.normalise_yes_no`.
    """
    return normalise_yes_no(answer) or answer


@dataclass
class AmberResponse:
    """One answer of a responses file."""

    id: int
    response: str
    where: str  # "FILE: entry N" or "FILE:LINE", for messages


def read_responses(path: str | Path, n_ids: int) -> list[AmberResponse]:
    """Read `[{"id": int, "response": str}, ...]` (JSON list, or JSONL with one object per line).

    Raises:
        InputError: missing/malformed file, a bad entry, an unknown or repeated id.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        records = [(f"{path}:{line}", record) for line, record in _jsonl_with_lines(path)]
    else:
        data = read_json(path)
        if not isinstance(data, list):
            raise InputError(f'{path}: expected a JSON list of {{"id": int, "response": str}} objects')
        records = [(f"{path}: entry {n}", record) for n, record in enumerate(data, start=1)]
    responses: list[AmberResponse] = []
    seen: dict[int, str] = {}
    for where, record in records:
        if not isinstance(record, dict):
            raise InputError(f'{where}: expected an object {{"id": int, "response": str}}')
        amber_id, text = record.get("id"), record.get("response")
        if isinstance(amber_id, bool) or not isinstance(amber_id, int):
            raise InputError(f"{where}: 'id' should be an integer AMBER query id, got {amber_id!r}")
        if not 1 <= amber_id <= n_ids:
            raise InputError(f"{where}: unknown id {amber_id}; AMBER ids run from 1 to {n_ids}")
        if not isinstance(text, str):
            raise InputError(f"{where}: 'response' should be a string, got {type(text).__name__}")
        if amber_id in seen:
            raise InputError(f"{where}: id {amber_id} appears a second time (first at {seen[amber_id]})")
        seen[amber_id] = where
        responses.append(AmberResponse(amber_id, text, where))
    return responses


def _jsonl_with_lines(path: Path) -> Iterable[tuple[int, Any]]:
    # read_jsonl validates every line (with its number); pair records back with their line numbers here.
    records = read_jsonl(path)
    lines = [n for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1) if raw.strip()]
    return zip(lines, records, strict=True)


@dataclass
class AmberScore:
    """Counters accumulated the official way, plus what is needed to report them."""

    counters: dict[str, float]
    responses: dict[str, int]  # how many responses each group had: generative, state, ..., relation
    not_yes_no: int  # discriminative answers that are neither "Yes" nor "No" (always wrong officially)
    generative_items: list[GenerativeItem]
    discriminative_items: list[dict[str, Any]]


def score_responses(
    data: AmberData,
    responses: list[AmberResponse],
    similarity: Similarity | None = None,
    threshold: float = 0.8,
    normalize_answers: bool = False,
) -> AmberScore:
    """Accumulate AMBER's counters over responses, in file order (the floating-point sums match the official)."""
    counters = dict(data.initial_counters)
    counts = dict.fromkeys(("generative", *_DIMENSION_OF_PREFIX.values()), 0)
    not_yes_no = 0
    generative_items, discriminative_items = [], []
    for item in responses:
        annotation = data.annotation(item.id)
        if annotation.get("type") == "generative":
            scored = score_description(data, item.id, item.response, similarity, threshold)
            generative_items.append(scored)
            counts["generative"] += 1
            counters["chair_score"] += len(scored.hallucinated)
            counters["chair_num"] += len(scored.nouns)
            counters["safe_cover_score"] += len(scored.truth_covered)
            counters["safe_cover_num"] += len(annotation["truth"])
            counters["hallu_cover_score"] += len(scored.hallu_mentioned)
            counters["hallu_cover_num"] += len(annotation["hallu"])
            if not scored.hallucinated:
                counters["non_hallu_score"] += 1
            counters["non_hallu_num"] += 1
            continue
        prefix = _PREFIX_OF_TYPE.get(annotation.get("type"), _RELATION_PREFIX)
        counts[_DIMENSION_OF_PREFIX[prefix]] += 1
        answer = normalize_yes_no(item.response) if normalize_answers else item.response
        if answer not in ("Yes", "No"):
            not_yes_no += 1
        truth = annotation.get("truth")
        correct = (truth == "yes" and answer == "Yes") or (truth != "yes" and answer == "No")
        for group in ("qa", prefix):
            counters[f"{group}_correct_num"] += 1
            if truth != "yes":  # the official scorer treats any truth other than "yes" as a "no" here ...
                counters[f"{group}_no_num"] += 1
                if answer == "No":
                    counters[f"{group}_no_score"] += 1
            if correct:
                counters[f"{group}_correct_score"] += 1
            if answer == "No":
                counters[f"{group}_ans_no_num"] += 1
                if truth == "no":  # ... but only a literal "no" as a true positive
                    counters[f"{group}_ans_no_score"] += 1
        discriminative_items.append(
            {
                "id": item.id,
                "dimension": _DIMENSION_OF_PREFIX[prefix],
                "truth": truth,
                "answer": answer,
                "correct": correct,
            }
        )
    return AmberScore(counters, counts, not_yes_no, generative_items, discriminative_items)


def _percent(score: float, num: float) -> float:
    return round(score / num * 100, 1)


def _f1(precision: float, recall: float, eps: float) -> float:
    return round(2 * (precision / 100) * (recall / 100) / ((precision / 100) + (recall / 100) + eps) * 100, 1)


def _discriminative(c: dict[str, float], groups: tuple[str, ...], eps: float = 0.0001) -> dict[str, float]:
    def total(part: str) -> float:
        # Summed left to right over the groups, as the official attribute figures are.
        value: float = 0
        for i, g in enumerate(groups):
            value = c[f"{g}_{part}"] if i == 0 else value + c[f"{g}_{part}"]
        return value

    accuracy = _percent(total("correct_score"), total("correct_num"))
    precision = _percent(total("ans_no_score"), total("ans_no_num"))
    recall = _percent(total("no_score"), total("no_num"))
    return {"Accuracy": accuracy, "Precision": precision, "Recall": recall, "F1": _f1(precision, recall, eps)}


def amber_score(chair: float, f1: float) -> float:
    """AMBER score ½·(1 − CHAIR + F1) from percentages, as a percentage rounded half-up to one decimal."""
    value = (Decimal(100) - Decimal(str(chair)) + Decimal(str(f1))) / 2
    return float(value.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def amber_metrics(score: AmberScore, evaluation_type: str) -> dict[str, Any]:
    """The figures the official scorer prints for an evaluation type, as percentages with one decimal.

    Raises:
        InputError: the responses hold no answer for a dimension the evaluation type asks for.
    """
    if evaluation_type not in EVALUATION_TYPES:
        raise ConfigError(f"--type: '{evaluation_type}' is not one of {', '.join(EVALUATION_TYPES)}")
    wants = {
        "generative": evaluation_type in ("a", "g"),
        "existence": evaluation_type in ("a", "d", "de"),
        "attribute": evaluation_type in ("a", "d", "da"),
        "relation": evaluation_type in ("a", "d", "dr"),
    }
    have = dict(score.responses)
    have["attribute"] = have["state"] + have["number"] + have["action"]
    missing = [name for name, wanted in wants.items() if wanted and not have[name]]
    if missing:
        raise InputError(
            f"the responses hold no {' / '.join(missing)} answers, which --type {evaluation_type} scores; "
            "answer those queries or pick the --type that matches the responses"
        )
    c = score.counters
    out: dict[str, Any] = {}
    if wants["generative"]:
        out["CHAIR"] = _percent(c["chair_score"], c["chair_num"])
        out["Cover"] = _percent(c["safe_cover_score"], c["safe_cover_num"])
        out["Hal"] = round(100 - c["non_hallu_score"] / c["non_hallu_num"] * 100, 1)
        out["Cog"] = _percent(c["hallu_cover_score"], c["hallu_cover_num"])
    if wants["existence"] and wants["attribute"] and wants["relation"]:
        out.update(_discriminative(c, ("qa",)))
    if wants["existence"]:
        out["existence"] = _discriminative(c, ("ha_qa",), eps=0.001)
    if wants["attribute"]:
        out["attribute"] = _discriminative(c, ("as_qa", "an_qa", "aa_qa"))
        for prefix in ("as_qa", "an_qa", "aa_qa"):
            name = _DIMENSION_OF_PREFIX[prefix]
            # A sub-dimension without answers would print 0.0 officially; null says "not measured" instead.
            out["attribute"][name] = _discriminative(c, (prefix,)) if have[name] else None
    if wants["relation"]:
        out["relation"] = _discriminative(c, (_RELATION_PREFIX,))
    if "CHAIR" in out and "F1" in out:
        out["AMBER"] = amber_score(out["CHAIR"], out["F1"])
    return out


def format_table(metrics: dict[str, Any]) -> str:
    """A readable table of `amber_metrics` output."""
    lines = []
    if "CHAIR" in metrics:
        names = ("CHAIR", "Cover", "Hal", "Cog")
        lines.append(f"{'Generative':<16}" + "".join(f"{k:>10}" for k in names))
        lines.append(" " * 16 + "".join(f"{metrics[k]:>10.1f}" for k in names))
    rows = []
    if "F1" in metrics:
        rows.append(("overall", metrics))
    for name in ("existence", "attribute", "relation"):
        if name in metrics:
            rows.append((name, metrics[name]))
            if name == "attribute":
                rows += [(f"  {sub}", metrics[name][sub]) for sub in ("state", "number", "action")]
    if rows:
        if lines:
            lines.append("")
        names = ("Accuracy", "Precision", "Recall", "F1")
        lines.append(f"{'Discriminative':<16}" + "".join(f"{k:>10}" for k in names))
        for label, row in rows:
            cells = [f"{row[k]:>10.1f}" for k in names] if row is not None else [f"{'(no answers)':>10}"]
            lines.append(f"{label:<16}" + "".join(cells))
    if "AMBER" in metrics:
        lines += ["", f"{'AMBER score':<16}{metrics['AMBER']:>10.1f}"]
    return "\n".join(lines)


# ---- answers (eval/answers.py --benchmark amber | amber_g | amber_d) ---------------------------------------
AMBER_GENERATIVE_MAX_ID = 1004  # AMBER ids 1..1004 are generative, the rest discriminative


def amber_queries(sec: Any, seed: int = 0) -> tuple[list[Query], None]:
    """AMBER queries, filtered to the generative or discriminative part for amber_g / amber_d."""
    data, images = need(sec.data, "data", sec.benchmark), need(sec.images, "images", sec.benchmark)
    entries = read_json(data)
    if not isinstance(entries, list):
        raise InputError(f"{data}: expected a JSON list of AMBER queries {{id, image, query}}")
    queries = []
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("id"), int)
            or "image" not in entry
            or "query" not in entry
        ):
            raise InputError(f'{data}: entry {i} is not an AMBER query {{"id": int, "image", "query"}}')
        generative = entry["id"] <= AMBER_GENERATIVE_MAX_ID
        if (sec.benchmark == "amber_g" and not generative) or (sec.benchmark == "amber_d" and generative):
            continue
        suffix = sec.query_suffix + ("" if generative else sec.yes_no_suffix)
        queries.append(
            Query(str(entry["id"]), entry["id"], images / entry["image"], entry["query"] + suffix, not generative)
        )
    return queries, None


def write_amber(sec: Any, queries: list[Query], answers: list[dict[str, Any]], context: Any) -> dict[str, Any]:
    """AMBER's answer file `[{"id", "response"}]`; discriminative answers normalised to exactly Yes / No."""
    stats: dict[str, Any] = {}
    rows = []
    counts = {"yes": 0, "no": 0, "yes_no_unrecognised": 0}
    for q, a in zip(queries, answers, strict=True):
        response = a["text"]
        if q.yes_no:
            verdict = normalise_yes_no(response)
            counts[verdict.lower() if verdict else "yes_no_unrecognised"] += 1
            response = verdict or response
        rows.append({"id": q.question_id, "response": response})
    rows.sort(key=lambda r: r["id"])
    write_json(sec.out, rows)
    if any(q.yes_no for q in queries):
        stats.update(counts)
        if counts["yes_no_unrecognised"]:
            print(
                f"note: {counts['yes_no_unrecognised']} AMBER yes/no answer(s) say neither yes nor no; "
                "the scorer counts them as wrong",
                file=sys.stderr,
            )
    return stats


# --- command line ---------------------------------------------------------------------------------------------


@dataclass
class AmberArgs:
    """Options of `python eval/amber.py`."""

    amber_dir: str = field(
        metadata={
            "help": "The official AMBER data/ folder (annotations.json, relation.json, ...) or its parent.",
        }
    )
    responses: str = field(metadata={"help": 'Answers: JSON list (or JSONL) of {"id": int, "response": str}.'})
    type: Literal["a", "g", "d", "de", "da", "dr"] = field(
        default="a",
        metadata={"help": "a: all; g: generative; d: discriminative; de/da/dr: existence/attribute/relation only."},
    )
    out: str = field(default="", metadata={"help": "Write the figures to this JSON file."})
    details: str = field(
        default="", metadata={"help": "Also write one JSONL line per response: nouns, hallucinated nouns, verdicts."}
    )
    spacy_model: str = field(
        default="en_core_web_lg",
        metadata={
            "help": "spaCy vector model for the word-similarity step (official: en_core_web_lg).",
        },
    )
    similarity_threshold: float = field(
        default=0.8,
        metadata={
            "help": "Words with a similarity above this count as the same (official: 0.8).",
        },
    )
    no_similarity: bool = field(
        default=False,
        metadata={"help": "Skip the word-similarity step without a warning."},
    )
    normalize_answers: bool = field(
        default=False,
        metadata={
            "help": "Map discriminative answers starting with yes/no ('Yes, there is ...') to 'Yes'/'No' first. "
            "Off by default: the official scorer counts anything but the exact strings as wrong.",
        },
    )
    nltk_data: str = field(default="", metadata={"help": "Folder with NLTK data, searched before $NLTK_DATA."})


def parse_args(argv: list[str] | None) -> AmberArgs:
    """Parse the command line into `AmberArgs` (one-line ConfigError on a bad flag)."""
    return parse_options(AmberArgs, argv, "Score AMBER responses exactly like the official inference.py.")


def evaluate(args: AmberArgs, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score a responses file; write `--out`/`--details`; return the figures."""
    log = log or (lambda message: print(message, file=sys.stderr))
    if not 0 <= args.similarity_threshold <= 1:
        raise ConfigError(f"--similarity-threshold: {args.similarity_threshold} is outside [0, 1]")
    data = load_amber_data(args.amber_dir)
    responses = read_responses(args.responses, len(data.annotations))
    if not responses:
        raise InputError(f"{args.responses}: no responses")
    similarity, note = None, "off (--no-similarity)"
    needs_nouns = any(data.annotation(r.id).get("type") == "generative" for r in responses)
    if needs_nouns:
        ensure_nltk_data(args.nltk_data or None)
        if not args.no_similarity:
            similarity, why = spacy_similarity(args.spacy_model)
            note = args.spacy_model
            if similarity is None:
                note = "skipped"
                log(
                    f"warning: {why}; the word-similarity step is skipped, so CHAIR/Hal may be higher and Cover/Cog "
                    f"lower than the official scorer's (install spaCy and `python -m spacy download {args.spacy_model}`"
                    ", or pass --no-similarity to silence this)"
                )
    score = score_responses(data, responses, similarity, args.similarity_threshold, args.normalize_answers)
    metrics = amber_metrics(score, args.type)
    if score.not_yes_no:
        log(
            f"warning: {score.not_yes_no} discriminative answers are neither 'Yes' nor 'No' and count as wrong, as "
            "in the official scorer (normalise them when generating, or pass --normalize-answers)"
        )
    if args.out:
        write_json(args.out, metrics)
    if args.details:
        rows = [{"type": "generative", **vars(item)} for item in score.generative_items]
        rows += [{"type": "discriminative", **item} for item in score.discriminative_items]
        write_jsonl(args.details, rows)
    header = f"AMBER --type {args.type}: {len(responses)} responses; word similarity: {note}"
    print(header + "\n\n" + format_table(metrics))
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see eval/amber.py)."""
    from capdpo.cli import run_cli

    run_cli(lambda a: evaluate(parse_args(a)), argv)


if __name__ == "__main__":  # pragma: no cover
    main()
