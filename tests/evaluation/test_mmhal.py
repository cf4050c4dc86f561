"""MMHal-Bench: rating parser, metric arithmetic, and the judge path end to end against a stub endpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from capdpo.errors import InputError
from capdpo.evaluation.mmhal import main, mmhal_metrics, parse_rating, question_type, read_answers
from capdpo.jsonl import read_jsonl
from tests.evaluation.stub_server import StubChatServer

DATA = Path(__file__).parent / "data"
ANSWERS = DATA / "mmhal_answers.json"
SECRET = "sk-test-5ecret-never-written"


def scripted_judge(user_message: str) -> str:
    """Rates by the marker the fixture put in each model answer: [r=N] -> "Rating: N", [garble] -> no rating."""
    match = re.search(r"\[r=(\d)\]", user_message)
    if match:
        return f"The answer agrees with the reference on the main points.\nRating: {match.group(1)}"
    return "Hard to say; the answer is partly right, maybe decent."


@pytest.mark.parametrize(
    "reply, rating",
    [
        ("Explanation.\nRating: 4", 4),
        ("rating: 0", 0),
        ("**Rating:** 6\n", 6),
        ("Rating: 5. Rating: 5", 5),  # repeated, same value
        ("Rating: 2 ... on reflection Rating: 3", None),  # two different ratings
        ("Rating: 7", None),  # out of range
        ("Rating: 4.5", None),
        ("I would give it a four.", None),
        ("", None),
    ],
)
def test_parse_rating(reply: str, rating: int | None) -> None:
    assert parse_rating(reply) == rating


def test_metrics_by_hand() -> None:
    types = ["attribute", "adversarial", "attribute", "adversarial", "other"]
    ratings = [6, 2, 3, None, 0]
    m = mmhal_metrics(types, ratings)
    # scored: 6, 2, 3, 0 -> mean 11/4; below 3: 2 and 0 -> 2/4
    assert m["avg_score"] == 2.75
    assert m["hallucination_rate"] == 0.5
    assert (m["n"], m["n_scored"], m["unparseable"]) == (5, 4, 1)
    assert m["question_types"]["attribute"] == {"avg_score": 4.5, "hallucination_rate": 0.0, "n_scored": 2, "n": 2}
    assert m["question_types"]["adversarial"] == {"avg_score": 2.0, "hallucination_rate": 1.0, "n_scored": 1, "n": 2}
    assert list(m["question_types"]) == ["attribute", "adversarial", "other"]
    zero = mmhal_metrics(types, ratings, "zero")
    assert zero["avg_score"] == 2.2 and zero["hallucination_rate"] == 0.6 and zero["n_scored"] == 5


def test_question_type_falls_back_to_position() -> None:
    assert question_type({"question_type": "counting"}, 0) == "counting"
    assert question_type({}, 3) == "counting"  # the 96 questions cycle through the 8 types
    assert question_type({}, 15) == "other"


def run_mmhal(out: Path, server: StubChatServer, *extra: str) -> dict:
    main(
        [
            "--answers", str(ANSWERS), "--out", str(out), "--judge-url", server.url, "--judge-model", "stub-gpt",
            "--api-key-env", "CAPDPO_TEST_JUDGE_KEY", "--backoff", "0.01", "--workers", "3", *extra,
        ]
    )  # fmt: skip
    return json.loads(out.read_text())


def test_judge_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("CAPDPO_TEST_JUDGE_KEY", SECRET)
    out = tmp_path / "eval" / "mmhal.json"
    with StubChatServer(scripted_judge) as server:
        server.fail_next(500)  # a transient server error: retried
        server.fail_next(503)
        metrics = run_mmhal(out, server)
        first_requests = len(server.requests)

        # 16 questions, two retried failures; every request carried the key as a Bearer token
        assert first_requests == 16 + 2
        assert all(r["headers"]["Authorization"] == f"Bearer {SECRET}" for r in server.requests)
        assert all(r["path"] == "/v1/chat/completions" and r["body"]["model"] == "stub-gpt" for r in server.requests)
        assert all(r["body"]["temperature"] == 0.0 for r in server.requests)

        # ratings of the fixture: [6,2,4,0,3,5,1,garble, 5,3,2,6,4,1,0,3]
        assert metrics["n"] == 16 and metrics["n_scored"] == 15
        assert metrics["unparseable"] == 1 and metrics["unparseable_ids"] == [7]
        assert metrics["avg_score"] == 3.0  # 45 / 15
        assert metrics["hallucination_rate"] == 0.4  # 2,0,1,2,1,0 -> 6 / 15
        per_type = metrics["question_types"]
        assert per_type["attribute"]["avg_score"] == 5.5 and per_type["attribute"]["hallucination_rate"] == 0.0
        assert per_type["holistic"]["avg_score"] == 0.5 and per_type["holistic"]["hallucination_rate"] == 1.0
        assert per_type["other"] == {"avg_score": 3.0, "hallucination_rate": 0.0, "n_scored": 1, "n": 2}
        assert metrics["cache"] == {"hits": 0, "requests": 16}
        assert metrics["judge"]["api_key_env"] == "CAPDPO_TEST_JUDGE_KEY"

        reviews = read_jsonl(tmp_path / "eval" / "mmhal.reviews.jsonl")
        assert len(reviews) == 16
        assert [r["question_id"] for r in reviews if not r["parsed"]] == [7]
        assert reviews[3]["rating"] == 0 and reviews[3]["hallucination"] is True
        printed = capsys.readouterr().out
        assert "unparseable judge replies: 1" in printed

        # rerun: every reply comes from the cache, the server sees no new request
        again = run_mmhal(out, server)
        assert len(server.requests) == first_requests
        assert again["cache"] == {"hits": 16, "requests": 0}
        assert again["avg_score"] == metrics["avg_score"]

        # 'zero' policy: the unparseable reply counts as 0 (as the published script did), still from the cache
        zero = run_mmhal(tmp_path / "eval" / "mmhal_zero.json", server, "--unparseable", "zero",
                         "--cache", str(tmp_path / "eval" / "mmhal.judge_cache.jsonl"))  # fmt: skip
        assert len(server.requests) == first_requests
        assert zero["avg_score"] == 2.8125 and zero["hallucination_rate"] == 0.4375

    # the key reached the server but no file anywhere under the output folder
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path
    assert SECRET not in capsys.readouterr().out


def test_changed_answer_is_judged_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from capdpo.evaluation.judge import default_prompt

    monkeypatch.delenv("CAPDPO_TEST_JUDGE_KEY", raising=False)
    records = json.loads(ANSWERS.read_text())[:4]
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(records))
    with StubChatServer(scripted_judge) as server:
        args = [
            "--answers",
            str(answers),
            "--out",
            str(tmp_path / "m.json"),
            "--judge_url",
            server.url,
            "--judge_model",
            "x",
        ]
        main(args)
        assert len(server.requests) == 4
        assert all("Authorization" not in r["headers"] for r in server.requests)  # no key set: none sent
        records[2]["model_answer"] = "A different answer [r=1]."
        answers.write_text(json.dumps(records))
        main(args)
        assert len(server.requests) == 5  # only the changed question
        main(args)
        assert len(server.requests) == 5  # nothing changed: all from the cache
        # the cache is keyed by the judge and the prompt too: another judge model, or another prompt, asks again
        main([*args[:-1], "y"])
        assert len(server.requests) == 9
        prompt = tmp_path / "prompt.txt"
        prompt.write_text(default_prompt("mmhal").read_text(encoding="utf-8") + "\nBe strict.\n", encoding="utf-8")
        main([*args, "--prompt", str(prompt)])
        assert len(server.requests) == 13
        main(args)
        assert len(server.requests) == 13  # the first judge and prompt: still cached
    assert json.loads((tmp_path / "m.json").read_text())["question_types"]["comparison"]["avg_score"] == 1.0


def test_read_answers_names_the_problem(tmp_path: Path) -> None:
    records = json.loads(ANSWERS.read_text())
    del records[5]["model_answer"]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records))
    with pytest.raises(InputError, match=r"record 5 has no text field 'model_answer'"):
        read_answers(path)


def test_cli_script_exit_code(tmp_path: Path) -> None:
    from tests.helpers import run_script

    done = run_script("eval/mmhal.py", "--answers", str(ANSWERS), "--out", str(tmp_path / "m.json"))
    assert done.returncode == 2
    assert "error: judge: give --judge_url" in done.stderr


# ---- the published protocol --------------------------------------------------------------------------------
TEMPLATE = Path(__file__).resolve().parents[2] / "../shared/data/judges/mmhal_template.txt"
# judge replies by question index, with what the published rule and capdpo's parser read in each
PUBLISHED_CASES = [
    ("Explanation.\nRating: 2.", 2, 2),
    ("Rating: 5. The answer is good.", 5, 5),
    ("**Rating:** 6", 0, 6),
    ("Rating:6", 0, 6),
    ("Rating: 5.5", 5, None),
    ("The answer is fine. Rating: 3", 3, 3),
    ("Rating: 1 ... on reflection Rating: 4", 0, None),
    ("rating: 4\nRating: 4", 4, 4),
    ("I cannot rate this.", 0, None),
    ("Rating: 0", 0, 0),
]


def published_records(tmp_path: Path) -> Path:
    records = [
        {
            "question_type": "other",  # ignored by the published protocol: types come from the position
            "image_content": ["Cat", "Lynx"],
            "question": f"How many cats? {{q{i}}}",
            "gt_answer": "Two cats.",
            "model_answer": f"[case={i}] There are {{two}} cats.",
            "image_id": f"img{i}",
        }
        for i in range(len(PUBLISHED_CASES))
    ]
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def case_reply(user_message: str) -> str:
    return PUBLISHED_CASES[int(re.search(r"\[case=(\d+)\]", user_message).group(1))][0]


@pytest.mark.parametrize("reply, published, capdpo", PUBLISHED_CASES)
def test_published_and_capdpo_rating_rules(reply: str, published: int, capdpo: int | None) -> None:
    from capdpo.evaluation.mmhal import parse_rating_published

    assert (parse_rating_published(reply) or 0) == published
    assert parse_rating(reply) == capdpo


def test_published_protocol_end_to_end(tmp_path: Path) -> None:
    """The benchmark's template filled positionally, one user message at temperature 0 with no token limit, the
    published rating rule (unreadable = 0), types by position, figures rounded to 2 decimals as printed."""
    answers = published_records(tmp_path)
    out = tmp_path / "mmhal.json"
    with StubChatServer(case_reply) as server:
        main(["--answers", str(answers), "--out", str(out), "--judge_url", server.url, "--judge_model", "gpt-4-0314",
              "--prompt", str(TEMPLATE)])  # fmt: skip
        bodies = [r["body"] for r in server.requests]
    metrics = json.loads(out.read_text())
    assert metrics["protocol"] == "published"
    # figures are comparable only with the same judge: the JSON names it and the prompt file's sha256
    import hashlib

    assert metrics["judge"]["prompt_sha256"] == hashlib.sha256(TEMPLATE.read_bytes()).hexdigest()
    assert "gpt-4-0314" in json.dumps(metrics["judge"])
    template = TEMPLATE.read_text(encoding="utf-8")
    first = next(b for b in bodies if "[case=0]" in b["messages"][0]["content"])
    assert first["messages"] == [
        {"role": "user", "content": template.format("Cat, Lynx", "How many cats? {q0}", "Two cats.",
                                                    "[case=0] There are {two} cats.")}
    ]  # fmt: skip
    assert all(b["temperature"] == 0.0 and "max_tokens" not in b for b in bodies)
    # scores [2, 5, 0, 0, 5, 3, 0, 4, 0, 0]: mean 19 / 10; below 3: questions 0, 2, 3, 6, 8, 9
    assert metrics["avg_score"] == 1.9 and metrics["hallucination_rate"] == 0.6
    assert metrics["unparseable"] == 4 and metrics["unparseable_ids"] == [2, 3, 6, 8]
    per_type = {name: row["avg_score"] for name, row in metrics["question_types"].items()}
    # position i mod 8: attribute = questions 0 and 8, adversarial = 1 and 9, then one question each
    assert per_type == {"attribute": 1.0, "adversarial": 2.5, "comparison": 0.0, "counting": 0.0, "relation": 5.0,
                        "environment": 3.0, "holistic": 0.0, "other": 4.0}  # fmt: skip

    # the capdpo protocol on the same replies (from the cache): stricter parsing, unreadable replies left out
    capdpo = tmp_path / "mmhal_capdpo.json"
    main(["--answers", str(answers), "--out", str(capdpo), "--judge_url", "http://127.0.0.1:9/v1",
          "--judge_model", "gpt-4-0314", "--prompt", str(TEMPLATE), "--protocol", "capdpo",
          "--judge_temperature", "0", "--judge_max_tokens", "0", "--max_retries", "0",
          "--cache", str(tmp_path / "mmhal.judge_cache.jsonl")])  # fmt: skip
    strict = json.loads(capdpo.read_text())
    # read: 2, 5, 6, 6, -, 3, -, 4, -, 0 -> 26 / 7; below 3: 2 and 0
    assert strict["avg_score"] == round(26 / 7, 4) and strict["hallucination_rate"] == round(2 / 7, 4)
    assert strict["unparseable_ids"] == [4, 6, 8]


def test_published_protocol_needs_the_published_template(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    answers = published_records(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--answers", str(answers), "--out", str(tmp_path / "m.json"), "--judge_url", "http://127.0.0.1:9/v1",
              "--judge_model", "x", "--protocol", "published"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "pass it with --prompt" in capsys.readouterr().err
