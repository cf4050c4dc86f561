"""Object HalBench: 300 COCO val2014 images described at length, objects extracted by a judge and matched to COCO,
scored as RLAIF-V's `eval/eval_gpt_obj_halbench.py` and `eval/summarize_gpt_obj_halbench_review.py` score it.

    python eval/answers.py --benchmark objhal --model ... --data DATA/obj_halbench_300_with_image.jsonl \
        --out runs/demo/eval/base/answers/objhal.jsonl
    python eval/objhal.py --answers runs/demo/eval/base/answers/objhal.jsonl --coco_annotations DATA/coco/annotations \
        --synonyms DATA/RLAIF-V/eval/data/synonyms_refine.txt --prompt objhal_extraction_prompt.txt \
        --judge_url https://api.openai.com/v1 --judge_model gpt-3.5-turbo-0613 --out runs/demo/eval/base/objhal.json

The published procedure, step by step:
1. Each answer (text with "Assistant:" removed, stripped) of more than three words goes to the judge: the
   extraction prompt (`--prompt`, the benchmark's own text with `{question}` and `{answer}` in it) filled by plain
   replacement and sent as one system message. Answers of three words or fewer get no objects and no request.
2. The reply is read as a JSON list; failing that, when it holds '["', its last line is. Other replies are
   unreadable: the published script asks again until it gets a list, capdpo (temperature 0, cached replies) counts
   them, lists them in the metrics and leaves those answers out of every figure.
3. Each extracted object is read as "a <object>": its tokens' lemmas are scanned for two-word names (every
   multi-word entry of the synonym list, "home plate", "train track", "baby"/"adult" + animal, "passenger jet" /
   "passenger train", "bow tie", "toilet seat", "wine glas"); without one, every run of nouns (NN, NNS, NNP, NNPS)
   becomes one name of its lemmas. Names are kept once each, in order; "seat" is dropped beside "toilet"; names
   outside the synonym list are dropped, the rest map to their COCO category.
4. An image's objects: the categories of its COCO instance annotations plus the COCO words of its reference
   captions (lower-cased NLTK tokens, WordNet noun lemmas, the same two-word names).
5. Figures (×100, two decimals, as the summary prints them): Response Hall (CHAIR_s over answers that name at
   least one COCO object), Object Hall (CHAIR_i: hallucinated names / all names), Response Correct, Object Correct,
   Object Recall (distinct correct categories per answer / the images' objects), Average Length (words split on
   single spaces), with the counts; CHAIR_s over every answer as well.

Tagging and lemmas: the published script uses spaCy's en_core_web_trf. capdpo uses NLTK's tagger and WordNet
lemmas by default (no extra download beyond the NLTK data CHAIR needs); `--spacy_model en_core_web_trf` uses spaCy
instead (installed separately), for the published figures to the last digit.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capdpo.cli import run_cli
from capdpo.config import LoadedConfig
from capdpo.errors import ConfigError, InputError
from capdpo.evaluation.benchmarks import Query, model_label, need
from capdpo.evaluation.chair import QUALIFIED_NAMES, CocoSynonyms, annotation_files, load_coco_ground_truth
from capdpo.evaluation.judge import (
    JudgeItem,
    PublishedPrompt,
    default_side_path,
    judge_items,
    make_judge,
    write_judged,
)
from capdpo.jsonl import foreign_jsonl, write_jsonl
from capdpo.sections import load_config

EXPECTED_ANSWERS = 300
SHORT_ANSWER_WORDS = 3  # answers of at most this many words are not sent to the judge
NOUN_TAGS = ("NN", "NNS", "NNP", "NNPS")
NLTK_RESOURCES = {
    "tokenizers/punkt_tab/english/": "punkt_tab",
    "taggers/averaged_perceptron_tagger_eng/": "averaged_perceptron_tagger_eng",
    "corpora/wordnet": "wordnet",
}


# ---- synonyms and names -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjHalVocabulary:
    """The synonym list as Object HalBench reads it (a later line wins a word listed twice) and its two-word names."""

    synonyms: CocoSynonyms
    double_words: dict[str, str]

    @classmethod
    def load(cls, path: str | Path) -> ObjHalVocabulary:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: synonym file not found")
        category_of: dict[str, str] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            words = [w.strip() for w in line.strip().split(", ")]
            for word in words:
                category_of[word] = words[0]
        if not category_of:
            raise InputError(f"{path}: no categories")
        doubles = {w: w for w in category_of if len(w.strip().split(" ")) >= 2}
        doubles.update({"home plate": "home plate", "train track": "train track"})
        doubles.update(QUALIFIED_NAMES)  # baby / adult + animal, passenger + vehicle, bow tie, toilet seat, wine glas
        return cls(CocoSynonyms(category_of), doubles)

    def join_double_words(self, words: list[str], keep_single: bool) -> list[str]:
        """Two-word names read as one; other words kept (`keep_single`) or dropped."""
        out, i = [], 0
        while i < len(words):
            pair = " ".join(words[i : i + 2])
            if pair in self.double_words:
                out.append(self.double_words[pair])
                i += 2
            else:
                if keep_single:
                    out.append(words[i])
                i += 1
        return out

    def coco_names(self, words: list[str]) -> list[str]:
        """The names that are COCO words ("seat" dropped beside "toilet")."""
        if "toilet" in words and "seat" in words:
            words = [w for w in words if w != "seat"]
        return [w for w in words if w in self.synonyms.category_of]

    def caption_categories(self, caption: str) -> list[str]:
        """COCO categories a reference caption names (NLTK tokens, WordNet noun lemmas, two-word names)."""
        import nltk

        lemmatizer = _wordnet()
        words = [lemmatizer.lemmatize(w) for w in nltk.word_tokenize(caption.lower())]
        words = self.coco_names(self.join_double_words(words, keep_single=True))
        return [self.synonyms.category_of[w] for w in words]


def _wordnet() -> Any:
    from nltk.stem import WordNetLemmatizer

    return WordNetLemmatizer()


Tagger = Callable[[str], list[tuple[str, str, str]]]
"""text -> [(token, Penn tag, lemma)]"""


def nltk_tagger() -> Tagger:
    """Tokens, Penn tags and WordNet lemmas (by the tag's part of speech) from NLTK."""
    import nltk

    lemmatizer = _wordnet()
    parts = {"N": "n", "V": "v", "J": "a", "R": "r"}

    def tag(text: str) -> list[tuple[str, str, str]]:
        out = []
        for token, penn in nltk.pos_tag(nltk.word_tokenize(text)):
            proper = penn in ("NNP", "NNPS")
            word = token if proper else token.lower()
            pos = parts.get(penn[:1])
            out.append((token, penn, lemmatizer.lemmatize(word, pos) if pos else word))
        return out

    return tag


def spacy_tagger(model: str) -> Tagger:
    """Tokens, tags and lemmas from a spaCy pipeline (the published script's: en_core_web_trf)."""
    try:
        import spacy

        nlp = spacy.load(model)
    except (ImportError, OSError) as err:
        raise ConfigError(
            f"--spacy_model {model}: cannot load it ({type(err).__name__}); install spaCy and the model "
            f"(pip install spacy && python -m spacy download {model}), or leave --spacy_model empty for NLTK"
        ) from None
    return lambda text: [(t.text, t.tag_, t.lemma_) for t in nlp(text)]


def refine_objects(objects: Iterable[str], vocab: ObjHalVocabulary, tag: Tagger) -> list[str]:
    """Extracted objects -> names, as the published script refines them (see step 3 of the module docstring)."""
    names: list[str] = []
    for obj in objects:
        tokens = tag(f"a {obj}")
        doubles = vocab.join_double_words([lemma for _, _, lemma in tokens], keep_single=False)
        if doubles:
            names += doubles
            continue
        run: list[str] = []
        for _, penn, lemma in [*tokens, ("", "", "")]:
            if penn in NOUN_TAGS:
                run.append(lemma)
            elif run:
                names.append(" ".join(run).strip())
                run = []
    return list(dict.fromkeys(names))


def parse_object_list(reply: str) -> list[str] | None:
    """The objects of a judge reply, read as the published script reads them: the reply as JSON, else (when it holds
    '["') its last line as JSON. A list gives its items, an object its keys, a string its characters (the published
    loop iterates whatever it gets); anything else, or no JSON, is unreadable (None)."""
    try:
        value = json.loads(reply)
    except json.JSONDecodeError:
        if '["' not in reply:
            return None
        try:
            value = json.loads(reply.strip().split("\n")[-1])
        except json.JSONDecodeError:
            return None
    if isinstance(value, (list, dict)):
        return [str(v) for v in value]
    if isinstance(value, str):
        return list(value)
    return None


# ---- answers and figures ----------------------------------------------------------------------------------
@dataclass
class ObjHalAnswer:
    image_id: int
    question: str
    caption: str
    where: str


def _int_id(value: Any, where: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: 'image_id' should be a COCO image id (an integer), got {value!r}") from None


def read_answers(path: str | Path, questions: str | Path = "") -> list[ObjHalAnswer]:
    """JSONL answers with image_id, prompt (or question) and text (or answer); answers without `image_id` take it
    from the question file's line of the same position, as the published script does."""
    rows = foreign_jsonl(Path(path))
    if not rows:
        raise InputError(f"{path}: no answers")
    originals = foreign_jsonl(Path(questions)) if questions else []
    answers = []
    for i, (number, row) in enumerate(rows):
        where = f"{path}:{number}"
        if "image_id" in row:
            image_id = _int_id(row["image_id"], where)
        elif originals:
            if i >= len(originals):
                raise InputError(f"{where}: no line {i + 1} in {questions} to take the image_id from")
            image_id = _int_id(originals[i][1].get("image_id"), f"{questions}:{originals[i][0]}")
        else:
            raise InputError(f"{where}: no 'image_id'; pass --questions (the benchmark's question file)")
        question = row.get("prompt", row.get("question"))
        text = row.get("text", row.get("answer"))
        if not isinstance(question, str) or not isinstance(text, str):
            raise InputError(f"{where}: an answer needs 'prompt' (or 'question') and 'text' (or 'answer') strings")
        answers.append(ObjHalAnswer(image_id, question, text.replace("Assistant:", "").strip(), where))
    return answers


def fill_prompt(template: str, question: str, answer: str) -> list[dict[str, str]]:
    """The published request: `{question}` then `{answer}` replaced in the prompt text, one system message."""
    return [{"role": "system", "content": template.replace("{question}", question).replace("{answer}", answer)}]


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _printed(value: float | None) -> float | None:
    """×100 with two decimals, exactly as the published summary prints it."""
    return None if value is None else float(f"{value * 100:.2f}")


def objhal_figures(
    answers: list[ObjHalAnswer], names: list[list[str] | None], truth: dict[int, set[str]], vocab: ObjHalVocabulary
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The published counts and figures over the answers whose objects could be read (`names[i]` not None)."""
    counts = dict.fromkeys(
        ("answers", "coco_answers", "hallucinated_answers", "hallucinated_names", "names", "correct_categories",
         "gt_objects", "words"), 0,
    )  # fmt: skip
    rows = []
    for answer, found in zip(answers, names, strict=True):
        if found is None:
            continue
        words = vocab.coco_names(found)
        categories = [vocab.synonyms.category_of[w] for w in words]
        gt = truth[answer.image_id]
        hallucinated = [(w, c) for w, c in zip(words, categories, strict=True) if c not in gt]
        counts["answers"] += 1
        counts["words"] += len(answer.caption.strip().split(" "))
        counts["gt_objects"] += len(gt)
        counts["names"] += len(words)
        counts["hallucinated_names"] += len(hallucinated)
        counts["hallucinated_answers"] += bool(hallucinated)
        counts["coco_answers"] += bool(words)
        counts["correct_categories"] += len({c for c in categories if c in gt})
        rows.append(
            {
                "image_id": answer.image_id,
                "coco_words": [[w, c] for w, c in zip(words, categories, strict=True)],
                "hallucinated": [[w, c] for w, c in hallucinated],
                "gt_objects": sorted(gt),
            }
        )
    chair_s_refine = _share(counts["hallucinated_answers"], counts["coco_answers"])
    chair_i = _share(counts["hallucinated_names"], counts["names"])
    average_length = _share(counts["words"], counts["answers"])
    metrics = {
        "benchmark": "objhal",
        "Response Hall": _printed(chair_s_refine),
        "Object Hall": _printed(chair_i),
        "Response Correct": _printed(None if chair_s_refine is None else 1 - chair_s_refine),
        "Object Correct": _printed(None if chair_i is None else 1 - chair_i),
        "Object Recall": _printed(_share(counts["correct_categories"], counts["gt_objects"])),
        "Average Length": None if average_length is None else float(f"{average_length:.2f}"),
        "CHAIR_s (all answers)": _printed(_share(counts["hallucinated_answers"], counts["answers"])),
        "fractions": {
            "CHAIRs": _share(counts["hallucinated_answers"], counts["answers"]),
            "CHAIRs_refine": chair_s_refine,
            "CHAIRi": chair_i,
            "obj_rec": _share(counts["correct_categories"], counts["gt_objects"]),
            "avg_word_len": average_length,
        },
        "counts": counts,
    }
    return metrics, rows


def run(cfg: LoadedConfig) -> dict[str, Any]:
    """Extract every answer's objects (judge, cached), match them to COCO and write the figures."""
    sec = cfg.section
    for name in ("answers", "out", "prompt", "coco_annotations"):
        if not getattr(sec, name):
            raise ConfigError(f"objhal: --{name} is required (see --help)")
    from capdpo.evaluation.nltk_setup import require_nltk_data

    require_nltk_data(NLTK_RESOURCES, sec.nltk_data or None)
    if not sec.synonyms:
        raise ConfigError(
            "objhal: --synonyms is required: RLAIF-V's eval/data/synonyms_refine.txt (the published list)"
        )
    vocab = ObjHalVocabulary.load(sec.synonyms)
    answers = read_answers(sec.answers, sec.questions)
    if len(answers) != EXPECTED_ANSWERS:
        print(
            f"note: {sec.answers} has {len(answers)} answers (Object HalBench has {EXPECTED_ANSWERS})", file=sys.stderr
        )
    prompt = PublishedPrompt.load(sec.prompt)
    missing = [p for p in ("{question}", "{answer}") if p not in prompt.text]
    if missing:
        raise ConfigError(f"objhal: {sec.prompt} lacks {' and '.join(missing)} (the extraction prompt fills both)")
    if sec.protocol == "capdpo":
        raise ConfigError("objhal: only the published protocol exists for Object HalBench; leave --protocol empty")
    sec.use_protocol(True, published=(0.0, 0), capdpo=(0.0, 0))
    tag = spacy_tagger(sec.spacy_model) if sec.spacy_model else nltk_tagger()

    image_ids = {a.image_id for a in answers}
    annotations = (
        annotation_files(sec.coco_annotations, "instances"),
        annotation_files(sec.coco_annotations, "captions"),
    )
    truth = load_coco_ground_truth(*annotations, image_ids, vocab.synonyms, objects_of=vocab.caption_categories)
    unknown = sorted(image_ids - truth.known)
    if unknown:
        raise InputError(f"image {unknown[0]} ({len(unknown)} in all) is in no COCO annotation file given")

    asked = [i for i, a in enumerate(answers) if len(a.caption.strip().split()) > SHORT_ANSWER_WORDS]
    items = [JudgeItem(str(i), fill_prompt(prompt.text, answers[i].question, answers[i].caption)) for i in asked]
    judge = make_judge(sec, cfg.common)
    result = judge_items(items, judge, sec.cache or default_side_path(sec.out, ".judge_cache.jsonl"))
    extracted: list[list[str] | None] = [[] for _ in answers]
    for i in asked:
        extracted[i] = parse_object_list(result.replies[str(i)])
    names = [None if objs is None else refine_objects(objs, vocab, tag) for objs in extracted]
    metrics, rows = objhal_figures(answers, names, truth.objects, vocab)
    unreadable = [i for i, objs in enumerate(extracted) if objs is None]
    metrics["unparseable"] = len(unreadable)
    metrics["unparseable_ids"] = unreadable
    metrics["tagger"] = sec.spacy_model or "nltk"
    by_image, asked_ids = iter(rows), set(asked)
    reviews = []
    for i, (answer, objs, found) in enumerate(zip(answers, extracted, names, strict=True)):
        review = {"question_id": i, "image_id": answer.image_id, "asked": i in asked_ids, "extracted": objs}
        review.update({"names": found, "reply": result.replies.get(str(i))})
        if found is not None:
            review.update(next(by_image))
        reviews.append(review)
    files = {"answers": str(sec.answers), "synonyms": str(sec.synonyms)}
    return write_judged(cfg, metrics, reviews, judge, prompt, result, files, format_summary)


def format_summary(metrics: dict[str, Any], source: str | Path) -> str:
    """The published summary's lines, plus the unreadable-reply count."""
    c = metrics["counts"]

    def show(name: str) -> str:
        return "n/a" if metrics[name] is None else f"{metrics[name]:.2f}"

    lines = [f"Object HalBench — {source}"]
    lines += [f"  {name:<17}: {show(name)}" for name in ("Response Hall", "Object Hall")]
    lines += [f"  {name:<17}: {show(name)}" for name in ("Response Correct", "Object Correct", "Object Recall")]
    lines += [f"  {'Average Length':<17}: {show('Average Length')}"]
    lines += [
        f"  COCO Sent Number : {c['coco_answers']}",
        f"  COCO Word Number : {c['correct_categories']}",
        f"  GT Word Number   : {c['gt_objects']}",
        f"  answers scored: {c['answers']}; unreadable judge replies (left out): {metrics['unparseable']}",
    ]
    return "\n".join(lines)


# ---- answers (eval/answers.py --benchmark objhal) --------------------------------------------------------
def objhal_queries(sec: Any, seed: int = 0) -> tuple[list[Query], list[dict[str, Any]]]:
    """The benchmark's question file (JSONL: question, image_id, and the image as base64 `image` or `image_path`);
    embedded images are written once, by content, to `<out stem>.images/`."""
    from capdpo.evaluation.answers import side_path
    from capdpo.images import materialize_image

    data = need(sec.data, "data", "objhal")
    folder = side_path(sec.out, ".images") if sec.out else Path("objhal.images")
    queries, records = [], []
    for i, (number, row) in enumerate(foreign_jsonl(data)):
        where = f"{data}:{number}"
        if not isinstance(row.get("question"), str):
            raise InputError(f"{where}: a question needs 'question' as a string")
        if isinstance(row.get("image_path"), str) and Path(row["image_path"]).is_file():
            image = Path(row["image_path"])
        elif isinstance(row.get("image"), str):
            try:
                image = Path(materialize_image(base64.b64decode(row["image"], validate=True), folder)[0])
            except (binascii.Error, ValueError) as err:
                raise InputError(f"{where}: 'image' is not a base64 image ({err})") from None
        elif sec.images and "image_id" in row:
            image = Path(sec.images) / f"COCO_val2014_{_int_id(row['image_id'], where):012d}.jpg"
        else:
            raise InputError(f"{where}: no image: give 'image' (base64), an existing 'image_path', or --images")
        records.append({"image_id": row.get("image_id"), "question": row["question"]})
        queries.append(Query(str(i), i, image, row["question"] + sec.query_suffix))
    return queries, records


def write_objhal(sec: Any, queries: list[Query], answers: list[dict[str, Any]], records: Any) -> dict[str, Any]:
    """JSONL: question_id (line index), image_id, prompt, text, model_id — the published answer file's fields."""
    label = model_label(sec.model, sec.adapter, sec.model_id)
    rows = [
        {
            "question_id": q.question_id,
            "image_id": records[q.question_id]["image_id"],
            "prompt": records[q.question_id]["question"],
            "text": a["text"],
            "model_id": label,
        }
        for q, a in zip(queries, answers, strict=True)
    ]
    write_jsonl(sec.out, rows)
    return {}


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda a: run(load_config("objhal", a, __doc__)), argv)
