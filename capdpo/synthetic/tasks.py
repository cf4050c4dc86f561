"""Training examples and evaluation questions of the synthetic world, in the exact prompts the pipeline sends.

The strong model learns what stage 2 and stage 3 ask of it (describe; rewrite a sentence) from *biased*
captions, plus yes/no judgements derived from those same captions (so that, asked to critique itself, it shares
its own bias). The weak model learns only to judge: yes/no on sentences and on object questions, a 0-100
rating and an A/B choice, all from the ground truth. Prompts come from the config defaults, so they are the
prompts stages 2-4 send.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from capdpo.synthetic.world import (
    COLOURS,
    DESCRIBE_PROMPT,
    POSITIONS,
    SENTENCE,
    SHAPES,
    SIZES,
    BiasRule,
    Scene,
    SceneObject,
    WorldImage,
    biased_description,
    biased_names,
)

YESNO_SUFFIX = " Answer yes or no."


def _defaults() -> tuple[str, str, str, str]:
    from capdpo.generation.config import VariantsConfig
    from capdpo.validation.config import ValidateConfig

    validate = ValidateConfig()
    return VariantsConfig().prompt, validate.yesno_prompt, validate.rating_prompt, validate.pairwise_prompt


REWRITE_PROMPT, YESNO_PROMPT, RATING_PROMPT, PAIRWISE_PROMPT = _defaults()


def rewrite_prompt(context: list[str], index: int) -> str:
    """Stage 3's instruction for sentence `index` of a description."""
    from capdpo.text import rewrite_prompt as stage3_prompt

    return stage3_prompt(REWRITE_PROMPT, context, index)


@dataclass(frozen=True)
class Claim:
    """A sentence about one cell and how wrong it is: which of shape / colour / size differ from the truth."""

    sentence: str
    position: str
    wrong: tuple[str, ...]  # subset of ("shape", "colour", "size"), or ("empty",) for a cell with no object

    @property
    def accurate(self) -> bool:
        return not self.wrong

    @property
    def rating(self) -> int:
        """0-100: an object in an empty cell is 0; a wrong shape costs 50, a wrong colour or size 25 each."""
        if "empty" in self.wrong:
            return 0
        return 100 - 50 * ("shape" in self.wrong) - 25 * ("colour" in self.wrong) - 25 * ("size" in self.wrong)


def claim(scene: Scene, size: str, colour: str, shape: str, position: str) -> Claim:
    """The claim 'there is a <size> <colour> <shape> at <position>' checked against the scene."""
    sentence = SENTENCE.format(size=size, colour=colour, shape=shape, position=position)
    obj = scene.at(position)
    if obj is None:
        return Claim(sentence, position, ("empty",))
    wrong = tuple(
        n
        for n, a, b in (("shape", shape, obj.shape), ("colour", colour, obj.colour), ("size", size, obj.size))
        if a != b
    )
    return Claim(sentence, position, wrong)


def corrupt(scene: Scene, obj: SceneObject, rng: random.Random, rules: tuple[BiasRule, ...] = ()) -> Claim:
    """A false sentence near the truth: one attribute changed, or the object moved to an empty cell.

    Shape changes favour the rules' substitutes (the hallucinations a biased describer makes), so a verifier
    trained on these sees them often.
    """
    empty = [p for p in POSITIONS if scene.at(p) is None]
    kind = rng.choice(["shape", "shape", "colour", "size"] + (["empty"] if empty else []))
    size, colour, shape, position = obj.size, obj.colour, obj.shape, obj.position
    if kind == "shape":
        substitutes = [r.substitute for r in rules if r.substitute != obj.shape]
        if substitutes and rng.random() < 0.5:
            shape = rng.choice(substitutes)
        else:
            shape = rng.choice([s for s in SHAPES if s != obj.shape])
    elif kind == "colour":
        colour = rng.choice([c for c in COLOURS if c != obj.colour])
    elif kind == "size":
        size = next(s for s in SIZES if s != obj.size)
    else:
        position = rng.choice(empty)
    return claim(scene, size, colour, shape, position)


# ---- yes/no questions ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    """A yes/no question about an image with its ground-truth answer."""

    image_id: str
    image: str
    kind: str  # sentence / existence / cooccurrence / attribute
    question: str  # the full user text, answer instruction included
    answer: str  # "yes" / "no"

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "image": self.image,
            "kind": self.kind,
            "question": self.question,
            "answer": self.answer,
        }


def yes_no_questions(item: WorldImage, rng: random.Random, rules: tuple[BiasRule, ...] = ()) -> list[Question]:
    """Balanced yes/no questions about one image.

    - sentence: is a true sentence (yes) / a corrupted one (no) accurate? (stage 4's yes/no prompt)
    - existence: is a present shape (yes) / a random absent shape (no) in the image?
    - cooccurrence: is a rule's absent substitute in an image with its trigger? (no; POPE's adversarial kind)
    - attribute: is there a <colour> <shape> for a present object (yes) / with its colour changed (no)?
    """
    scene = item.scene
    out = []

    def ask(kind: str, text: str, answer: bool) -> None:
        out.append(Question(item.id, item.image, kind, text, "yes" if answer else "no"))

    obj = rng.choice(scene.objects)
    ask("sentence", YESNO_PROMPT.replace("{sentence}", obj.sentence()), True)
    ask("sentence", YESNO_PROMPT.replace("{sentence}", corrupt(scene, obj, rng, rules).sentence), False)
    present = sorted(scene.shapes)
    absent = [s for s in SHAPES if s not in scene.shapes]
    ask("existence", f"Is there a {rng.choice(present)} in the image?{YESNO_SUFFIX}", True)
    if absent:
        ask("existence", f"Is there a {rng.choice(absent)} in the image?{YESNO_SUFFIX}", False)
    for rule in rules:
        if rule.trigger in scene.shapes and rule.substitute not in scene.shapes:
            ask("cooccurrence", f"Is there a {rule.substitute} in the image?{YESNO_SUFFIX}", False)
    other = rng.choice([c for c in COLOURS if c != obj.colour])
    ask("attribute", f"Is there a {obj.colour} {obj.shape} in the image?{YESNO_SUFFIX}", True)
    if not any(o.shape == obj.shape and o.colour == other for o in scene.objects):
        ask("attribute", f"Is there a {other} {obj.shape} in the image?{YESNO_SUFFIX}", False)
    return out


# ---- training examples ----------------------------------------------------------------------------------------
def _record(item: WorldImage, task: str, prompt: str, response: str) -> dict[str, Any]:
    return {"image": item.image, "image_id": item.id, "task": task, "prompt": prompt, "response": response}


def strong_examples(
    item: WorldImage, rng: random.Random, rules: tuple[BiasRule, ...], judge_share: float = 1.0
) -> Iterator[dict[str, Any]]:
    """The strong model's examples for one image: a biased description, a rewrite, and (sometimes) judgements.

    The rewrite's input sentence is the caption's sentence or a corrupted one; its target is a fresh biased
    caption's sentence for the same object, so sampled rewrites spread over what the model believes is there.
    Judgements call a sentence accurate when a biased caption of the image would say it.
    """
    scene = item.scene
    caption = biased_description(scene, rules, rng)
    yield _record(item, "describe", DESCRIBE_PROMPT, " ".join(caption))
    index = rng.randrange(len(caption))
    context = list(caption)
    if rng.random() < 0.5:
        context[index] = corrupt(scene, scene.objects[index], rng, rules).sentence
    target = scene.objects[index].sentence(biased_names(scene, rules, rng)[index])
    yield _record(item, "rewrite", rewrite_prompt(context, index), target)
    if rng.random() < judge_share:
        believed = biased_names(scene, rules, rng)
        k = rng.randrange(len(scene.objects))
        obj = scene.objects[k]
        if rng.random() < 0.5:
            sentence, answer = obj.sentence(believed[k]), "Yes"
        else:
            sentence = corrupt(scene, obj, rng, rules).sentence
            answer = "Yes" if sentence == obj.sentence(believed[k]) else "No"
        yield _record(item, "yesno", YESNO_PROMPT.replace("{sentence}", sentence), answer)


MULTI_PROMPT = "Answer each question about this image with yes or no, in order."  # kept in the tokenizer corpus
LIST_PROMPT = "List the objects in this image."


def object_list(scene: Scene) -> str:
    """The objects as a list ("small red circle, top left; ..."): what a detector would output, not a description."""
    return "; ".join(f"{o.size} {o.colour} {o.shape}, {o.position}" for o in scene.objects)


def weak_examples(item: WorldImage, rng: random.Random, rules: tuple[BiasRule, ...]) -> Iterator[dict[str, Any]]:
    """The weak model's examples for one image, all from the ground truth: its object list, yes/no on a true and a
    false sentence (stage 4's prompt), every generated yes/no question, a rating and an A/B choice.

    The object list carries many image-dependent tokens per example: it teaches the vision tower to see, which the
    one-bit yes/no answers alone do not (a verifier trained on them stays at chance for thousands of steps).
    """
    scene = item.scene
    yield _record(item, "list", LIST_PROMPT, object_list(scene))
    obj = rng.choice(scene.objects)
    false = corrupt(scene, obj, rng, rules)
    yield _record(item, "yesno", YESNO_PROMPT.replace("{sentence}", obj.sentence()), "Yes")
    yield _record(item, "yesno", YESNO_PROMPT.replace("{sentence}", false.sentence), "No")
    for q in yes_no_questions(item, rng, rules):
        yield _record(item, "question", q.question, q.answer.capitalize())
    rated = (
        claim(scene, obj.size, obj.colour, obj.shape, obj.position)
        if rng.random() < 0.3
        else corrupt(scene, obj, rng, rules)
    )
    yield _record(item, "rating", RATING_PROMPT.replace("{sentence}", rated.sentence), str(rated.rating))
    true_first = rng.random() < 0.5
    a, b = (obj.sentence(), false.sentence) if true_first else (false.sentence, obj.sentence())
    yield _record(item, "pairwise", PAIRWISE_PROMPT.replace("{a}", a).replace("{b}", b), "A" if true_first else "B")


def tokenizer_corpus() -> list[str]:
    """Text that covers the synthetic language and every prompt the pipeline sends (for a small tokenizer)."""
    lines = []
    for size in SIZES:
        for colour in COLOURS:
            for shape in SHAPES:
                for position in POSITIONS:
                    lines.append(SENTENCE.format(size=size, colour=colour, shape=shape, position=position))
    for template in (REWRITE_PROMPT, YESNO_PROMPT, RATING_PROMPT, PAIRWISE_PROMPT):
        lines += [template] * 20
    lines += [DESCRIBE_PROMPT] * 20 + [MULTI_PROMPT] * 20 + ["Is this sentence accurate?"] * 20 + [LIST_PROMPT] * 20
    lines += ["small red circle, top left; large blue square, bottom right"] * 20
    lines += [f"Is there a {c} {s} in the image?{YESNO_SUFFIX}" for c in COLOURS for s in SHAPES]
    rng = random.Random(0)
    sentences = lines[:]
    lines += [" ".join(rng.sample(sentences, 3)) for _ in range(200)]  # " There" after a sentence is one token
    lines += ["system\nYou are a helpful assistant.", "user\n", "assistant\n", "Yes", "No", "A", "B"]
    lines += [str(n) for n in range(101)]
    return lines
