"""Object HalBench: reply reading, object refinement, every figure against a hand computation through a local
endpoint, the cache, and the answers side (base64 images from the question file)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from capdpo.errors import ConfigError, InputError
from capdpo.evaluation.answers import main as answers_main
from capdpo.evaluation.nltk_setup import require_nltk_data
from capdpo.evaluation.objhal import (
    NLTK_RESOURCES,
    ObjHalVocabulary,
    main,
    nltk_tagger,
    parse_object_list,
    refine_objects,
)
from tests.evaluation.stub_server import StubChatServer

ROOT = Path(__file__).resolve().parents[2]
NLTK_DIR = ROOT / "../shared/data/nltk_data"
SYNONYMS = """person, man, woman, people, boy
dog, puppy
car, van
dining table, table
traffic light, stop light
toilet
chair, seat
elephant
"""
PROMPT = "Extract the objects.\n[Question] <image> {question}\n[Answer] {answer}\nReply with a JSON list.\n"
CATEGORIES = ["person", "dog", "car", "dining table", "traffic light", "toilet", "chair", "elephant"]


@pytest.mark.parametrize(
    "reply, objects",
    [
        ('["dog", "red car"]', ["dog", "red car"]),
        ('Objects:\n["cars", "stop light"]', ["cars", "stop light"]),  # the last line, as '["' is in the reply
        ("[]", []),
        ('{"dog": 1}', ["dog"]),  # an object: its keys, as the published loop iterates them
        ('"ab"', ["a", "b"]),  # a string: its characters
        ("[1, null]", ["1", "None"]),
        ("I cannot tell.", None),
        ('Objects: ["dog"] and more', None),  # '["' but the last line is no JSON
        ("42", None),
    ],
)
def test_replies_are_read_as_published(reply: str, objects: list[str] | None) -> None:
    assert parse_object_list(reply) == objects


@pytest.fixture
def vocab(tmp_path: Path) -> ObjHalVocabulary:
    path = tmp_path / "synonyms_refine.txt"
    path.write_text(SYNONYMS)
    require_nltk_data(NLTK_RESOURCES, NLTK_DIR)
    return ObjHalVocabulary.load(path)


def test_objects_are_refined_into_names(vocab: ObjHalVocabulary) -> None:
    tag = nltk_tagger()
    assert refine_objects(["man", "red car", "park", "man"], vocab, tag) == ["man", "car", "park"]
    assert refine_objects(["stop light", "toilet seat", "baby elephant"], vocab, tag) == [
        "stop light",
        "toilet",
        "elephant",
    ]
    assert refine_objects(["cars"], vocab, tag) == ["car"]
    assert vocab.coco_names(["toilet", "seat", "park", "van"]) == ["toilet", "van"]
    assert vocab.caption_categories("A toilet seat and two puppies near stop lights.") == [
        "toilet",
        "dog",
        "traffic light",
    ]


@pytest.fixture
def bench(tmp_path: Path) -> dict[str, Path]:
    """COCO annotations of four images, the synonym list, the prompt and six answers."""
    coco = tmp_path / "annotations"
    coco.mkdir()
    categories = [{"id": i, "name": name} for i, name in enumerate(CATEGORIES, start=1)]
    objects = {101: [1, 2], 102: [3, 5], 103: [6], 104: [8]}
    annotations = [{"id": n, "image_id": i, "category_id": c} for n, (i, c) in
                   enumerate(((i, c) for i, cs in objects.items() for c in cs), start=1)]  # fmt: skip
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in objects]
    (coco / "instances_val2014.json").write_text(
        json.dumps({"images": images, "categories": categories, "annotations": annotations})
    )
    captions = {101: "A man walks his puppies near a table.", 102: "Cars wait at the stop lights.",
                103: "A toilet seat in a bathroom.", 104: "An elephant."}  # fmt: skip
    (coco / "captions_val2014.json").write_text(
        json.dumps({"images": images,
                    "annotations": [{"id": i, "image_id": i, "caption": c} for i, c in captions.items()]})
    )  # fmt: skip
    answers = [
        (101, "Assistant: A man and a woman walk a dog past a red car in the park."),
        (102, "There are two cars and a stop light."),
        (103, "A toilet seat next to a chair."),
        (104, "An elephant."),
        (104, "The big grey elephant stands there."),
        (101, "Just a table with nothing else."),
    ]
    rows = [{"question_id": i, "image_id": image, "prompt": "Describe the image {in detail}.", "text": text}
            for i, (image, text) in enumerate(answers)]  # fmt: skip
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "synonyms_refine.txt").write_text(SYNONYMS)
    (tmp_path / "prompt.txt").write_text(PROMPT)
    return {"dir": tmp_path, "coco": coco}


REPLIES = {
    "A man and a woman": '["man", "woman", "dog", "red car", "park"]',
    "two cars": 'Objects:\n["cars", "stop light"]',
    "toilet seat next": '["toilet seat", "chair"]',
    "grey elephant": "I cannot tell.",
    "Just a table": "[]",
}


def reply_for(prompt: str) -> str:
    return next(reply for key, reply in REPLIES.items() if key in prompt)


def objhal_args(bench: dict[str, Path], url: str, *extra: str) -> list[str]:
    d = bench["dir"]
    return ["--answers", str(d / "answers.jsonl"), "--coco_annotations", str(bench["coco"]),
            "--synonyms", str(d / "synonyms_refine.txt"), "--prompt", str(d / "prompt.txt"),
            "--judge_url", url, "--judge_model", "gpt-3.5-turbo-0613", "--out", str(d / "objhal.json"),
            "--nltk_data", str(NLTK_DIR), *extra]  # fmt: skip


def test_every_figure_equals_the_hand_computation(bench: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-objhal-secret")
    with StubChatServer(reply_for) as server:
        main(objhal_args(bench, server.url))
        bodies = [r["body"] for r in server.requests]
        assert {r["headers"]["Authorization"] for r in server.requests} == {"Bearer sk-objhal-secret"}
    # answers of more than three words are asked, one system message, the prompt filled by plain replacement
    assert len(bodies) == 5
    first = next(b for b in bodies if "two cars" in b["messages"][0]["content"])
    assert first["messages"] == [
        {"role": "system", "content": PROMPT.replace("{question}", "Describe the image {in detail}.").replace(
            "{answer}", "There are two cars and a stop light.")}
    ]  # fmt: skip
    assert all(b["temperature"] == 0.0 and "max_tokens" not in b for b in bodies)
    assert not any("Assistant:" in b["messages"][0]["content"] for b in bodies)

    metrics = json.loads((bench["dir"] / "objhal.json").read_text())
    # answer 4 is unreadable and left out. Names: 0: man, woman, dog, car (car hallucinated; person, dog correct);
    # 1: car, stop light (both correct); 2: toilet, chair (chair hallucinated); 3 and 5: none.
    c = metrics["counts"]
    assert (c["answers"], c["coco_answers"], c["hallucinated_answers"]) == (5, 3, 2)
    assert (c["names"], c["hallucinated_names"], c["correct_categories"], c["gt_objects"]) == (8, 2, 5, 10)
    assert c["words"] == 15 + 8 + 7 + 2 + 6
    assert metrics["Response Hall"] == 66.67 and metrics["Object Hall"] == 25.0
    assert metrics["Response Correct"] == 33.33 and metrics["Object Correct"] == 75.0
    assert metrics["Object Recall"] == 50.0 and metrics["Average Length"] == 7.6
    assert metrics["CHAIR_s (all answers)"] == 40.0
    assert metrics["unparseable"] == 1 and metrics["unparseable_ids"] == [4]
    reviews = [json.loads(line) for line in (bench["dir"] / "objhal.reviews.jsonl").read_text().splitlines()]
    assert reviews[0]["hallucinated"] == [["car", "car"]] and reviews[3]["asked"] is False
    assert reviews[4]["names"] is None
    written = "".join(p.read_text() for p in bench["dir"].iterdir() if p.is_file())
    assert "sk-objhal-secret" not in written

    # a rerun asks nothing: every reply is in the cache
    with StubChatServer(reply_for) as server:
        main(objhal_args(bench, server.url))
        assert server.requests == []
    assert json.loads((bench["dir"] / "objhal.json").read_text())["Object Hall"] == 25.0


def test_answers_without_image_ids_take_them_from_the_question_file(bench: dict[str, Path]) -> None:
    from capdpo.evaluation.objhal import read_answers

    d = bench["dir"]
    rows = [json.loads(line) for line in (d / "answers.jsonl").read_text().splitlines()]
    (d / "bare.jsonl").write_text(
        "".join(json.dumps({"question": r["prompt"], "answer": r["text"]}) + "\n" for r in rows)
    )
    questions = d / "questions.jsonl"
    questions.write_text("".join(json.dumps({"image_id": str(r["image_id"]), "question": "q"}) + "\n" for r in rows))
    answers = read_answers(d / "bare.jsonl", questions)
    assert [a.image_id for a in answers] == [r["image_id"] for r in rows]
    assert answers[0].caption.startswith("A man")
    with pytest.raises(InputError, match=r"bare.jsonl:1: no 'image_id'; pass --questions"):
        read_answers(d / "bare.jsonl")


def test_bad_inputs_name_the_problem(bench: dict[str, Path], tmp_path: Path) -> None:
    d = bench["dir"]
    (d / "bad_prompt.txt").write_text("no placeholders here")
    with pytest.raises(ConfigError, match=r"lacks \{question\} and \{answer\}"):
        from capdpo.evaluation.objhal import run
        from capdpo.sections import load_config

        args = objhal_args(bench, "http://127.0.0.1:9/v1")
        args[args.index("--prompt") + 1] = str(d / "bad_prompt.txt")
        run(load_config("objhal", args))
    with pytest.raises(ConfigError, match="only the published protocol"):
        run(load_config("objhal", [*objhal_args(bench, "http://127.0.0.1:9/v1"), "--protocol", "capdpo"]))
    (d / "unknown.jsonl").write_text(json.dumps({"image_id": 999, "prompt": "q", "text": "a b c d e"}) + "\n")
    with pytest.raises(InputError, match="image 999"):
        args = objhal_args(bench, "http://127.0.0.1:9/v1")
        args[args.index("--answers") + 1] = str(d / "unknown.jsonl")
        run(load_config("objhal", args))


def test_answers_from_the_published_question_file(
    tmp_path: Path, sample_images: list[Path], tiny_models: dict[str, Path]
) -> None:
    """RLAIF-V's question file carries each image as base64: written once by content, answered, ids kept."""
    rows = [{"image_id": 100 + i, "question": "Describe this image in detail.",
             "image": base64.b64encode(sample_images[i % 2].read_bytes()).decode()} for i in range(3)]  # fmt: skip
    data = tmp_path / "obj_halbench_300_with_image.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers" / "objhal.jsonl"
    answers_main(["--benchmark", "objhal", "--model", str(tiny_models["strong"]), "--data", str(data),
                  "--out", str(out), "--max_new_tokens", "4", "--device", "cpu"])  # fmt: skip
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["question_id"], r["image_id"], r["prompt"]) for r in written] == [
        (i, 100 + i, "Describe this image in detail.") for i in range(3)
    ]
    assert len(list((tmp_path / "answers" / "objhal.images").iterdir())) == 2  # two distinct images
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image_id": 1, "question": "q", "image": "not base64!"}) + "\n")
    with pytest.raises(SystemExit):
        answers_main(["--benchmark", "objhal", "--model", str(tiny_models["strong"]), "--data", str(bad),
                      "--out", str(tmp_path / "b.jsonl")])  # fmt: skip


def test_a_local_judge_extracts_objects(bench: dict[str, Path], tiny_models: dict[str, Path]) -> None:
    """A local model as the judge (text only, the prompt as its system message); a random model's replies are
    unreadable, counted and left out, and a rerun reads every reply from the cache."""
    args = objhal_args(bench, "")
    at = args.index("--judge_url")
    del args[at : at + 4]  # no endpoint, no model name
    args += ["--judge_local", str(tiny_models["strong"]), "--judge_max_tokens", "4", "--device", "cpu"]
    main(args)
    metrics = json.loads((bench["dir"] / "objhal.json").read_text())
    assert metrics["judge"]["kind"] == "local" and metrics["cache"] == {"hits": 0, "requests": 5}
    readable = 5 - metrics["unparseable"]
    assert metrics["counts"]["answers"] == 1 + readable  # the short answer needs no reply
    main(args)
    assert json.loads((bench["dir"] / "objhal.json").read_text())["cache"] == {"hits": 5, "requests": 0}
