"""The built-in caption critic (`eval/chair.py --critic vlm`): reply parsing, the prompt, one-line errors, a tiny
local VLM end to end, and a canned OpenAI-compatible endpoint (figures by hand, the image and references sent, the
API key kept out of every file, the cache surviving a failed run)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from capdpo.evaluation import chair, critic
from capdpo.evaluation.caption_metrics import CriticRequest
from capdpo.evaluation.judge import JudgePrompt
from capdpo.jsonl import read_jsonl
from tests.evaluation.stub_server import StubChatServer
from tests.evaluation.test_chair import CAPTIONS, INSTANCES, NLTK_DIR, REFERENCES

KEY = "sk-critic-test-5f2a9c"


# ---- reply parsing -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "reply, score",
    [
        ("The caption is accurate. Overall score: 72/100", 72.0),
        ("Overall score: 72", 72.0),
        ("Score: 85", 85.0),
        ("score: 85.", 85.0),
        ("**Overall Score:** 90", 90.0),
        ("I would rate it 72.5 out of 100.", 72.5),
        ("Overall, 85/100.", 85.0),
        ("85 / 100", 85.0),
        ("0 out of 100: nothing is right", 0.0),
        ("100/100", 100.0),
        ("First 40/100, on reflection: Score: 65", 65.0),  # the last score counts
        ("Score: 70/100 ... final answer 80 / 100", 80.0),
        ("Rating: 7/10. Score: 60", 60.0),
        # unreadable: none of the forms, another scale, or out of [0, 100]
        ("A fine caption.", None),
        ("", None),
        ("Score: eighty", None),
        ("Score:", None),
        ("score 85", None),
        ("Score: 8/10", None),
        ("Score: 85/10", None),
        ("85/1000", None),
        ("7.5/10", None),
        ("150/100", None),
        ("-5/100", None),
        ("Score: 101", None),
        ("Score: 60, later 120/100", None),  # the last one is out of range: not the earlier one
        ("item5/100", None),
    ],
)
def test_parse_score(reply: str, score: float | None) -> None:
    assert critic.parse_score(reply) == score


# ---- the prompt and the options -------------------------------------------------------------------------------
def test_prompt_file_fills_question_references_and_caption(tmp_path: Path) -> None:
    prompt = JudgePrompt.load(critic.DEFAULT_PROMPT, critic.PLACEHOLDERS)
    assert "2410.02712" in prompt.path.read_text() and prompt.system == ""
    image = tmp_path / "a.jpg"
    image.write_bytes(b"not decoded here")
    requests = [CriticRequest(7, str(image), "A dog {on} a sofa.", ["A dog sleeps.", " A brown dog. "])]
    (item,) = critic.critic_items(requests, prompt, "Describe it.")
    text = item.messages[-1]["content"]
    assert "Question: Describe it." in text and "The LMM response: A dog {on} a sofa." in text
    assert "Reference descriptions:\n- A dog sleeps.\n- A brown dog.\n" in text
    assert (item.question_id, item.image) == ("7#1", str(image))


def image_folder(tmp_path: Path) -> Path:
    """The four COCO images of the CHAIR test annotations, as small distinct JPEGs."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for n, image_id in enumerate((101, 102, 103, 104)):
        Image.new("RGB", (64 + 8 * n, 48), (40 * n, 200 - 30 * n, 90)).save(
            folder / f"COCO_val2014_{image_id:012d}.jpg"
        )
    return folder


def run_chair(tmp_path: Path, *extra: str, config: dict | None = None) -> dict:
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps(CAPTIONS))
    argv = ["--captions", str(captions), "--coco_instances", str(INSTANCES), "--coco_captions", str(REFERENCES),
            "--nltk_data", str(NLTK_DIR), "--no_text_metrics", *extra]  # fmt: skip
    if config is not None:
        (tmp_path / "critic.json").write_text(json.dumps(config))
        argv += ["--critic_config", str(tmp_path / "critic.json")]
    chair.main(argv)
    return json.loads((tmp_path / "chair.json").read_text())


@pytest.mark.parametrize(
    "extra, config, message",
    [
        (("--critic", "vlm"), None, "--critic vlm: the critic looks at the images; pass --coco_images FOLDER"),
        (("--critic_url", "http://127.0.0.1:9/v1"), None, "--critic_url: only with --critic vlm"),
        (
            ("--critic", "tests.evaluation.test_chair:fake_critic", "--critic_model", "m"),
            None,
            "--critic_model: only for the built-in critic",
        ),
        (("--critic", "llava-critic", "--coco_images", "IMAGES"), None, "pass --critic_cache FILE"),
        (
            ("--critic", "vlm", "--coco_images", "IMAGES", "--out", "OUT"),
            {"modle": "x"},
            "critic.json: unknown key 'modle'",
        ),
        (
            ("--critic", "vlm", "--coco_images", "IMAGES", "--out", "OUT"),
            {"batch_size": "4"},
            "critic.json: 'batch_size' should be int",
        ),
        (
            ("--critic", "vlm", "--coco_images", "IMAGES", "--out", "OUT", "--critic_url", "ftp://x"),
            None,
            "critic_url",
        ),
        (("--critic", "vlm", "--coco_images", "IMAGES", "--out", "OUT"), {"critic_model": "m"}, "give critic_url"),
        (
            ("--critic", "vlm", "--coco_images", "IMAGES", "--out", "OUT"),
            {"dtype": "float16"},
            "critic.json: dtype: 'float16'",
        ),
        (
            ("--critic", "vlm", "--coco_images", "IMAGES", "--out", "OUT"),
            {"device": "gpu"},
            "critic.json: device: 'gpu'",
        ),
        (("--critic", "vlm", "--coco_images", "NOWHERE", "--out", "OUT"), {}, "COCO_val2014_000000000101.jpg: image"),
        (("--critic", "vlm", "--coco_images", "IMAGES", "--out", "OUT"), {"prompt": "/no/prompt.txt"}, "not found"),
    ],
)
def test_bad_critic_input_is_one_line_and_exit_2(tmp_path, capsys, extra, config, message) -> None:
    images = image_folder(tmp_path)
    paths = {"IMAGES": str(images), "NOWHERE": str(tmp_path / "nowhere"), "OUT": str(tmp_path / "chair.json")}
    with pytest.raises(SystemExit) as exit_info:
        run_chair(tmp_path, *(paths.get(e, e) for e in extra), config=config)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# ---- a tiny local VLM -------------------------------------------------------------------------------------------
def test_local_critic_on_a_tiny_vlm(tmp_path: Path, tiny_models: dict[str, Path], capsys) -> None:
    """Random weights write random text: check the accounting, the cache and the rerun, not the values."""
    images = image_folder(tmp_path)
    out = tmp_path / "chair.json"
    extra = ("--critic", "vlm", "--critic_model", str(tiny_models["weak"]), "--coco_images", str(images),
             "--out", str(out), "--details", str(tmp_path / "details.jsonl"))  # fmt: skip
    config = {"device": "cpu", "max_new_tokens": 6, "batch_size": 2}
    figures = run_chair(tmp_path, *extra, config=config)
    cache = read_jsonl(tmp_path / "chair.critic_cache.jsonl")
    assert len(cache) == len(CAPTIONS) == len({r["id"] for r in cache})
    assert all(r["judge"]["model"] == str(tiny_models["weak"]) and len(r["image_sha256"]) == 64 for r in cache)
    replies = {r["question_id"]: r["reply"] for r in cache}
    scores = [critic.parse_score(replies[f"{c['image_id']}#{n}"]) for n, c in enumerate(CAPTIONS, start=1)]
    rows = read_jsonl(tmp_path / "details.jsonl")
    assert [r["Critic"] for r in rows] == scores
    assert figures["Critic_unparsed"] == scores.count(None)
    readable = [s for s in scores if s is not None]
    assert figures["Critic"] == (round(sum(readable) / len(readable), 2) if readable else None)
    assert "(0 cached, 5 asked)" in capsys.readouterr().err

    again = run_chair(tmp_path, *extra, config=config)  # everything cached: no model is loaded, nothing asked
    assert again == figures and len(read_jsonl(tmp_path / "chair.critic_cache.jsonl")) == len(CAPTIONS)
    assert "(5 cached, 0 asked)" in capsys.readouterr().err


# ---- a canned OpenAI-compatible endpoint ----------------------------------------------------------------------
REPLIES = {  # caption -> the critic's reply
    CAPTIONS[0]["caption"]: "The teddy bear is not in the image. Overall score: 72/100",
    CAPTIONS[1]["caption"]: "Mostly right, but I cannot decide on a score.",  # unreadable
    CAPTIONS[2]["caption"]: "Accurate and brief; I rate it 85 out of 100.",
    CAPTIONS[3]["caption"]: "The man is invented.\n**Score:** 40",
    CAPTIONS[4]["caption"]: "One cat is invented. Overall score: 55/100",
}


def caption_of(content: list[dict]) -> str:
    text = next(part["text"] for part in content if part["type"] == "text")
    return text.split("The LMM response: ", 1)[1].split("\n", 1)[0]


def test_endpoint_critic_with_a_stub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPDPO_CRITIC_KEY", KEY)
    images = image_folder(tmp_path)
    out = tmp_path / "chair.json"
    with StubChatServer(lambda content: REPLIES[caption_of(content)]) as server:
        extra = ("--critic", "vlm", "--critic_url", server.url, "--critic_model", "llava-critic-7b",
                 "--coco_images", str(images), "--out", str(out), "--details", str(tmp_path / "details.jsonl"))  # fmt: skip
        config = {"api_key_env": "CAPDPO_CRITIC_KEY", "max_new_tokens": 300, "workers": 2}
        figures = run_chair(tmp_path, *extra, config=config)
        # readable 72, 85, 40, 55: mean 63.0; the reply without a score is counted, not dropped
        assert (figures["Critic"], figures["Critic_unparsed"]) == (63.0, 1)
        assert [r["Critic"] for r in read_jsonl(tmp_path / "details.jsonl")] == [72, None, 85, 40, 55]
        assert len(server.requests) == len(CAPTIONS)
        by_caption = {caption_of(r["body"]["messages"][-1]["content"]): r for r in server.requests}
        request = by_caption[CAPTIONS[1]["caption"]]
        assert request["path"] == "/v1/chat/completions" and request["headers"]["Authorization"] == f"Bearer {KEY}"
        body = request["body"]
        assert (body["model"], body["temperature"], body["max_tokens"]) == ("llava-critic-7b", 0.0, 300)
        image_part, text_part = body["messages"][-1]["content"]
        url = image_part["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")
        assert base64.b64decode(url.split(",", 1)[1]) == (images / "COCO_val2014_000000000102.jpg").read_bytes()
        text = text_part["text"]
        assert "Question: Please describe this image in detail." in text
        assert "- Two hot dogs on a table next to a wine glass.\n- Hot dogs with mustard on a plate." in text

        again = run_chair(tmp_path, *extra, config=config)  # a rerun asks nothing
        assert again == figures and len(server.requests) == len(CAPTIONS)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 3 and not any(KEY.encode() in p.read_bytes() for p in written)


def test_a_failed_run_keeps_its_replies(tmp_path: Path, capsys) -> None:
    """The endpoint drops the third caption's request; the replies that arrived (the two before it, and any the
    worker finished before the run stopped) stay cached, and a rerun asks exactly the rest."""
    images = image_folder(tmp_path)
    out = tmp_path / "chair.json"

    def flaky(content: list[dict]) -> str:
        caption = caption_of(content)
        if caption == CAPTIONS[2]["caption"]:
            raise ConnectionError("dropped")  # the stub closes the connection without a reply
        return REPLIES[caption]

    with StubChatServer(flaky) as server:
        extra = ("--critic", "vlm", "--critic_url", server.url, "--coco_images", str(images), "--out", str(out))
        config = {"workers": 1, "max_retries": 0}  # one request at a time, in caption order
        with pytest.raises(SystemExit):
            run_chair(tmp_path, *extra, config=config)
        assert "gave up after 1 tries" in capsys.readouterr().err
    cached = [r["question_id"] for r in read_jsonl(tmp_path / "chair.critic_cache.jsonl")]
    assert {"101#1", "102#2"} <= set(cached) and len(set(cached)) == len(cached) < len(CAPTIONS)
    asked = {f"{c['image_id']}#{n}": c["caption"] for n, c in enumerate(CAPTIONS, start=1)}
    assert all(asked[q] != CAPTIONS[2]["caption"] for q in cached), "the dropped request has no reply"
    with StubChatServer(lambda content: REPLIES[caption_of(content)]) as server:
        extra = extra[:3] + (server.url,) + extra[4:]
        figures = run_chair(tmp_path, *extra, config=config)
        assert sorted(caption_of(r["body"]["messages"][-1]["content"]) for r in server.requests) == sorted(
            caption for q, caption in asked.items() if q not in cached
        )
    assert (figures["Critic"], figures["Critic_unparsed"]) == (63.0, 1)
    assert all(r["judge"]["model"] == critic.DEFAULT_MODEL for r in read_jsonl(tmp_path / "chair.critic_cache.jsonl"))
