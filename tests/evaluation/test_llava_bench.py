"""LLaVA-Bench: score-pair parser, relative-score arithmetic, and judging end to end against a stub endpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from capdpo.errors import InputError
from capdpo.evaluation.llava_bench import llava_metrics, main, parse_scores
from capdpo.jsonl import read_jsonl
from tests.evaluation.stub_server import StubChatServer

DATA = Path(__file__).parent / "data"


def scripted_judge(user_message: str) -> str:
    """Scores by the marker in each model answer: [s=R M] -> "R M" on the first line; [garble] -> prose only."""
    match = re.search(r"\[s=(\d+) (\d+)\]", user_message)
    if match:
        return f"{match.group(1)} {match.group(2)}\nAssistant 1 is more detailed than assistant 2."
    return "Both assistants answer reasonably well.\n7 and 7"


@pytest.mark.parametrize(
    "reply, scores",
    [
        ("8 7\nexplanation", (8.0, 7.0)),
        ("\n  8, 7.5  \nmore", (8.0, 7.5)),
        ("**9 6**", (9.0, 6.0)),
        ("Assistant 1: 8, Assistant 2: 6", (8.0, 6.0)),
        ("8/10 7/10", (8.0, 7.0)),
        ("8\n7", None),  # one number on the first line
        ("8 7 6", None),
        ("11 7", None),  # out of the 1-10 scale
        ("Both are good.\n8 7", None),  # the published format puts the scores on the first line
        ("", None),
    ],
)
def test_parse_scores(reply: str, scores: tuple[float, float] | None) -> None:
    assert parse_scores(reply) == scores


def test_relative_scores_by_hand() -> None:
    m = llava_metrics(["conv", "conv", "detail", "complex"], [(8, 6), (6, 3), None, (10, 5)])
    # conv: mean model 4.5 / mean reference 7 -> 64.3; all: 14/3 / 8 -> 58.3
    assert m["categories"]["conv"]["relative_score"] == 64.3
    assert m["categories"]["conv"]["reference_score"] == 7.0 and m["categories"]["conv"]["model_score"] == 4.5
    assert m["categories"]["detail"] == {
        "relative_score": None,
        "reference_score": None,
        "model_score": None,
        "n_scored": 0,
        "n": 1,
    }
    assert m["categories"]["complex"]["relative_score"] == 50.0
    assert m["relative_score"] == 58.3
    assert (m["n"], m["n_scored"], m["unparseable"]) == (4, 3, 1)


def args(tmp_path: Path, url: str) -> list[str]:
    return [
        "--answers", str(DATA / "llava_answers.jsonl"), "--questions", str(DATA / "llava_questions.jsonl"),
        "--context", str(DATA / "llava_context.jsonl"), "--reference", str(DATA / "llava_reference.jsonl"),
        "--out", str(tmp_path / "llava_bench.json"), "--judge-url", url, "--judge-model", "stub-gpt",
        "--api-key-env", "CAPDPO_TEST_JUDGE_KEY", "--backoff", "0",
    ]  # fmt: skip


def test_judge_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPDPO_TEST_JUDGE_KEY", "sk-llava-secret")
    with StubChatServer(scripted_judge) as server:
        server.fail_next(500)
        main(args(tmp_path, server.url))
        assert len(server.requests) == 6 + 1
        last = server.requests[-1]["body"]["messages"]
        assert last[0]["role"] == "system"
        user = last[1]["content"]
        # reference answer is Assistant 1, the model's is Assistant 2; list captions are joined by lines
        assert user.index("Reference answer") < user.index("Model answer")
        assert "A photo number 1.\nIt has a red ball." in "".join(
            r["body"]["messages"][1]["content"] for r in server.requests
        )
        main(args(tmp_path, server.url))
        assert len(server.requests) == 7  # the rerun is answered from the cache

    m = json.loads((tmp_path / "llava_bench.json").read_text())
    # fixture scores: q0 conv 8/6, q1 detail 9/9, q2 complex 10/5, q3 conv 6/3, q4 detail garbled, q5 complex 8/8
    assert m["categories"]["conv"]["relative_score"] == 64.3  # 4.5 / 7
    assert m["categories"]["detail"]["relative_score"] == 100.0
    assert m["categories"]["complex"]["relative_score"] == 72.2  # 6.5 / 9
    assert m["relative_score"] == 75.6  # 6.2 / 8.2
    assert m["unparseable"] == 1 and m["unparseable_ids"] == [4]
    assert m["cache"] == {"hits": 6, "requests": 0}
    reviews = read_jsonl(tmp_path / "llava_bench.reviews.jsonl")
    assert [r["scores"] for r in reviews][:3] == [[8.0, 6.0], [9.0, 9.0], [10.0, 5.0]]
    assert reviews[4]["parsed"] is False and reviews[4]["category"] == "detail"
    for path in tmp_path.iterdir():
        assert "sk-llava-secret" not in path.read_text()


def test_missing_answer_is_named(tmp_path: Path) -> None:
    answers = tmp_path / "answers.jsonl"
    lines = (DATA / "llava_answers.jsonl").read_text().splitlines()
    answers.write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    argv = args(tmp_path, "http://127.0.0.1:9/v1")
    argv[1] = str(answers)
    with pytest.raises(InputError, match=r"answers.jsonl: no model answer \(with 'text'\) for question_id 3"):
        from capdpo.evaluation.llava_bench import run
        from capdpo.sections import load_config

        run(load_config("llava_bench", argv))
