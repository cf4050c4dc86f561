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


# ---- the published protocol --------------------------------------------------------------------------------
RULES = Path(__file__).resolve().parents[2] / "../shared/data/judges/llava_bench_rule.json"
# (category, judge reply): what the published parser and capdpo's read differs on the marked lines
PUBLISHED_CASES = [
    ("conv", "1 1\nBoth fine."),
    ("conv", "1 1"),
    ("conv", "2 3"),
    ("detail", "8 7 \nA trailing space: three parts, [-1, -1] when published."),
    ("detail", "Assistant 1: 8, Assistant 2: 7"),  # published: [-1, -1]
    ("complex", "7.5 9"),
    ("complex", "**8 7**"),  # published: float('**8') fails -> [-1, -1]
]


def write_published_inputs(tmp_path: Path) -> list[str]:
    def jsonl(name: str, rows: list[dict]) -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(path)

    n = len(PUBLISHED_CASES)
    return [
        "--questions", jsonl("q.jsonl", [{"question_id": i, "image": f"{i}.jpg", "text": f"Q{i}?", "category": c}
                                         for i, (c, _) in enumerate(PUBLISHED_CASES)]),
        "--context", jsonl("ctx.jsonl", [{"image": f"{i}.jpg", "caption": [f"Line {i}.", "Second line."]}
                                         for i in range(n)]),
        "--reference", jsonl("ref.jsonl", [{"question_id": i, "text": f"Reference {i}."} for i in range(n)]),
        "--answers", jsonl("ans.jsonl", [{"question_id": i, "text": f"[case={i}] Answer {i}."} for i in range(n)]),
    ]  # fmt: skip


def test_published_protocol_end_to_end(tmp_path: Path) -> None:
    """rule.json prompts in the published layout, system message and temperature; the published first-line
    parser keeping [-1, -1] in the means; means rounded to 3 decimals before the relative score."""
    inputs = write_published_inputs(tmp_path)

    def reply(user: str) -> str:
        return PUBLISHED_CASES[int(re.search(r"\[case=(\d+)\]", user).group(1))][1]

    out = tmp_path / "published.json"
    with StubChatServer(reply) as server:
        main([*inputs, "--out", str(out), "--judge_url", server.url, "--judge_model", "gpt-4-0314",
              "--prompt", str(RULES)])  # fmt: skip
        bodies = {json.dumps(r["body"]["messages"]): r["body"] for r in server.requests}
    rule = json.loads(RULES.read_text())["llava_bench_detail"]
    expected_user = (
        "[Context]\nLine 3.\nSecond line.\n\n[Question]\nQ3?\n\n"
        "[Assistant 1]\nReference 3.\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n[case=3] Answer 3.\n\n[End of Assistant 2]\n\n[System]\n{rule['prompt']}\n\n"
    )
    messages = [
        {
            "role": "system",
            "content": "You are a helpful and precise assistant for checking the quality of the answer.",
        },
        {"role": "user", "content": expected_user},
    ]
    body = bodies[json.dumps(messages)]
    assert body["temperature"] == 0.2 and body["max_tokens"] == 1024
    assert all(b["temperature"] == 0.2 for b in bodies.values())

    m = json.loads(out.read_text())
    assert m["protocol"] == "published" and m["unparseable"] == 3
    # conv: means 4/3 -> 1.333 and 5/3 -> 1.667 before dividing: 125.1 (125.0 unrounded)
    assert {k: m["categories"]["conv"][k] for k in ("relative_score", "reference_score", "model_score")} == {
        "relative_score": 125.1, "reference_score": 13.3, "model_score": 16.7}  # fmt: skip
    # detail: both replies malformed -> means -1 and -1
    assert (m["categories"]["detail"]["relative_score"], m["categories"]["detail"]["reference_score"]) == (
        100.0,
        -10.0,
    )
    # complex: (7.5 - 1) / 2 = 3.25 and (9 - 1) / 2 = 4.0
    assert [m["categories"]["complex"][k] for k in ("relative_score", "reference_score", "model_score")] == [
        123.1, 32.5, 40.0]  # fmt: skip
    # all: 8.5 / 7 -> 1.214, 11 / 7 -> 1.571; 1.571 / 1.214 -> 129.4
    assert (m["relative_score"], m["reference_score"], m["model_score"]) == (129.4, 12.1, 15.7)

    # capdpo's protocol on the same rules and replies (from the cache): every reply parses, means unrounded
    strict = tmp_path / "capdpo.json"
    main([*inputs, "--out", str(strict), "--judge_url", "http://127.0.0.1:9/v1", "--judge_model", "gpt-4-0314",
          "--prompt", str(RULES), "--protocol", "capdpo", "--judge_temperature", "0.2", "--max_retries", "0",
          "--cache", str(tmp_path / "published.judge_cache.jsonl")])  # fmt: skip
    c = json.loads(strict.read_text())
    assert c["unparseable"] == 0
    assert c["categories"]["conv"]["relative_score"] == 125.0
    assert c["categories"]["detail"]["relative_score"] == 87.5  # 7 / 8
    assert c["categories"]["complex"]["relative_score"] == 103.2  # 8 / 7.75

    # answers and references matched by question_id: the same files in reversed line order score the same
    for flag in ("--answers", "--reference"):
        path = Path(inputs[inputs.index(flag) + 1])
        path.write_text("".join(reversed(path.read_text(encoding="utf-8").splitlines(keepends=True))))
    shuffled = tmp_path / "shuffled.json"
    main([*inputs, "--out", str(shuffled), "--judge_url", "http://127.0.0.1:9/v1", "--judge_model", "gpt-4-0314",
          "--prompt", str(RULES), "--max_retries", "0", "--cache", str(tmp_path / "published.judge_cache.jsonl")])  # fmt: skip
    again = json.loads(shuffled.read_text())
    assert again["categories"] == m["categories"]
    assert (again["relative_score"], again["unparseable"]) == (m["relative_score"], m["unparseable"])


def test_published_protocol_needs_the_rules(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([*write_published_inputs(tmp_path), "--out", str(tmp_path / "o.json"), "--judge_url",
              "http://127.0.0.1:9/v1", "--judge_model", "x", "--protocol", "published"])  # fmt: skip
    assert "rule.json" in capsys.readouterr().err
