"""The synthetic world: seeded scenes drawn where they say, disjoint splits, biased captions at the configured rate,
yes/no questions with known answers, and CHAIR / coverage / accuracy figures checked by hand."""

from __future__ import annotations

import random

import pytest

from capdpo.synthetic.scoring import object_mentions, parse_claims, score_answers, score_descriptions
from capdpo.synthetic.tasks import claim, corrupt, strong_examples, weak_examples, yes_no_questions
from capdpo.synthetic.world import (
    COLOURS,
    DEFAULT_BIAS,
    BiasRule,
    Scene,
    SceneObject,
    WorldImage,
    biased_names,
    draw_scene,
    generate_world,
    read_split,
    sample_scene,
)


def scene(*objects: tuple[str, str, str, str]) -> Scene:
    return Scene([SceneObject(shape, colour, size, position) for size, colour, shape, position in objects])


def test_scenes_are_seeded_and_drawn_in_their_cells() -> None:
    a = [sample_scene(random.Random(7)) for _ in range(3)]
    b = [sample_scene(random.Random(7)) for _ in range(3)]
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    s = scene(("large", "red", "square", "top left"), ("small", "blue", "circle", "bottom right"))
    image, placed = draw_scene(s)
    assert image.size == (112, 112)
    pixels = image.load()
    for obj in placed.objects:
        x0, y0, x1, y1 = obj.box
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        assert pixels[cx, cy] != (232, 232, 228)  # the object's centre is painted
        colour = COLOURS[obj.colour]
        assert sum(abs(p - c) for p, c in zip(pixels[cx, cy], colour)) <= 36  # in its colour (with jitter)
        col, row = cx // 56, cy // 56
        assert ("top" if row == 0 else "bottom") in obj.position and ("left" if col == 0 else "right") in obj.position
    assert pixels[84, 20] == (232, 232, 228)  # the empty top-right cell stays background


def test_splits_never_share_an_image_and_honour_exclusions(tmp_path) -> None:
    world = generate_world(tmp_path, {"train": 30, "pairs": 20, "test": 20}, seed=3)
    ids = {split: {i.id for i in items} for split, items in world.items()}
    assert all(len(v) == n for v, n in zip(ids.values(), (30, 20, 20)))
    assert not (ids["train"] & ids["pairs"]) and not (ids["train"] & ids["test"]) and not (ids["pairs"] & ids["test"])
    again = read_split(tmp_path / "test.jsonl")
    assert [i.id for i in again] == [i.id for i in world["test"]]
    assert again[0].scene.description() == world["test"][0].scene.description()
    blocked = generate_world(tmp_path / "b", {"test": 20}, seed=3, exclude=ids["test"])
    assert not {i.id for i in blocked["test"]} & ids["test"]  # same seed, every image redrawn


def test_bias_fires_at_its_rate_and_only_where_it_applies() -> None:
    rule = BiasRule(trigger="circle", substitute="triangle", p=0.6)
    biased = scene(("large", "red", "circle", "top left"), ("small", "blue", "square", "bottom right"))
    rng = random.Random(0)
    names = [biased_names(biased, (rule,), rng) for _ in range(4000)]
    assert all(n[0] == "circle" for n in names)  # the trigger itself is never renamed
    rate = sum(n[1] == "triangle" for n in names) / len(names)
    assert rate == pytest.approx(0.6, abs=0.03)
    has_triangle = scene(("large", "red", "circle", "top left"), ("small", "blue", "triangle", "top right"))
    no_trigger = scene(("large", "red", "star", "top left"), ("small", "blue", "square", "top right"))
    for s in (has_triangle, no_trigger):
        assert all(biased_names(s, (rule,), rng) == [o.shape for o in s.objects] for _ in range(200))


def test_claims_and_corruptions_are_judged_against_the_truth() -> None:
    s = scene(("large", "red", "circle", "top left"), ("small", "blue", "square", "bottom right"))
    assert claim(s, "large", "red", "circle", "top left").accurate
    assert claim(s, "small", "red", "triangle", "top left").wrong == ("shape", "size")
    assert claim(s, "small", "red", "triangle", "top left").rating == 25
    assert claim(s, "large", "red", "circle", "top right").wrong == ("empty",)
    rng = random.Random(1)
    for _ in range(200):
        c = corrupt(s, s.objects[1], rng, DEFAULT_BIAS)
        assert not c.accurate and len(c.wrong) == 1 and c.rating < 100


def test_yes_no_questions_have_the_right_answers() -> None:
    s = scene(("large", "red", "circle", "top left"), ("small", "blue", "square", "bottom right"))
    item = WorldImage(id="x", split="test", image="x.png", scene=s)
    questions = yes_no_questions(item, random.Random(2), DEFAULT_BIAS)
    kinds = {q.kind for q in questions}
    assert kinds == {"sentence", "existence", "cooccurrence", "attribute"}
    for q in questions:
        if q.kind == "cooccurrence":
            assert "triangle" in q.question and q.answer == "no"
        if q.kind == "existence":
            shape = next(w for w in ("circle", "square", "triangle", "cross", "star") if w in q.question)
            assert q.answer == ("yes" if shape in s.shapes else "no")
        if q.kind == "sentence":
            sentence = q.question.split("Sentence: ")[1].split("\n")[0]
            (size, colour, shape, position) = parse_claims(sentence)[0]
            assert q.answer == ("yes" if claim(s, size, colour, shape, position).accurate else "no")
    assert sum(q.answer == "yes" for q in questions) >= 2 and sum(q.answer == "no" for q in questions) >= 3


def test_training_examples_use_the_pipeline_prompts() -> None:
    from capdpo.generation.config import DescribeConfig
    from capdpo.validation.config import ValidateConfig

    s = scene(("large", "red", "circle", "top left"), ("small", "blue", "square", "bottom right"))
    item = WorldImage(id="x", split="train", image="x.png", scene=s)
    rng = random.Random(0)
    strong = [r for _ in range(50) for r in strong_examples(item, rng, DEFAULT_BIAS)]
    describe = [r for r in strong if r["task"] == "describe"]
    assert describe[0]["prompt"] == DescribeConfig().prompts[0]
    said_triangle = sum("triangle" in r["response"] for r in describe) / len(describe)
    assert 0.35 < said_triangle < 0.85  # the square is called a triangle about 60% of the time
    assert {r["task"] for r in strong} == {"describe", "rewrite", "yesno"}
    weak = [r for _ in range(20) for r in weak_examples(item, rng, DEFAULT_BIAS)]
    yesno = ValidateConfig().yesno_prompt.split("{sentence}")[0]
    assert all(r["prompt"].startswith(yesno) for r in weak if r["task"] == "yesno")
    for r in weak:
        if r["task"] == "yesno":
            (size, colour, shape, position) = parse_claims(r["prompt"])[0]
            assert r["response"] == ("Yes" if claim(s, size, colour, shape, position).accurate else "No")
        if r["task"] == "rating":
            (size, colour, shape, position) = parse_claims(r["prompt"])[0]
            assert r["response"] == str(claim(s, size, colour, shape, position).rating)
    assert not [r for r in weak if r["task"] in ("describe", "rewrite")]


def test_chair_coverage_and_exact_claims_by_hand() -> None:
    s1 = scene(("large", "red", "circle", "top left"), ("small", "blue", "square", "bottom right"))
    s2 = scene(("small", "green", "star", "top right"))
    items = [
        # 2 mentions, 1 hallucinated (triangle); covers circle only; one exact claim of two
        (s1, "There is a large red circle at the top left. There is a small blue triangle at the bottom right."),
        # 1 mention, correct; covers star; exact
        (s2, "There is a small green star at the top right."),
    ]
    m = score_descriptions(items)
    assert m["CHAIR_i"] == pytest.approx(100 * 1 / 3, abs=0.01)
    assert m["CHAIR_s"] == 50.0
    assert m["coverage"] == pytest.approx(100 * 2 / 3, abs=0.01)
    assert m["sentence_accuracy"] == pytest.approx(100 * 2 / 3, abs=0.01)
    assert m["object_recall"] == pytest.approx(100 * 2 / 3, abs=0.01)
    assert m["hallucinated_words"] == {"triangle": 1}
    assert object_mentions("Two circles and a Cross.") == ["circle", "cross"]
    empty = score_descriptions([(s2, "")])
    assert empty["CHAIR_i"] == 0.0 and empty["coverage"] == 0.0


def test_answer_accuracy_per_kind() -> None:
    rows = [
        {"kind": "existence", "answer": "yes", "predicted": "yes"},
        {"kind": "existence", "answer": "no", "predicted": "yes"},
        {"kind": "cooccurrence", "answer": "no", "predicted": "no"},
        {"kind": "sentence", "answer": "no", "predicted": "no"},
    ]
    m = score_answers(rows)
    assert m["accuracy"] == 75.0 and m["by_kind"] == {"cooccurrence": 100.0, "existence": 50.0, "sentence": 100.0}
    assert m["yes_ratio"] == 50.0 and m["questions"] == 4
