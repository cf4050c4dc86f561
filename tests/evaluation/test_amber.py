"""AMBER scoring on responses built from the official annotations, with figures worked out by hand.

Every expected figure below is derived in the comment above it from the annotation entries and the official
definitions (counters start at 0 and denominators at 0.001, as in AMBER's metrics.txt; F1 is computed from the
rounded precision and recall with +0.0001 in the denominator, +0.001 for existence).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from capdpo.evaluation import amber
from capdpo.evaluation.amber import AmberResponse

ROOT = Path(__file__).resolve().parents[2]
AMBER_DIR = ROOT / "../shared/data/amber"
NLTK_DIR = ROOT / "../shared/data/nltk_data"

# Hand-checked descriptions (NLTK tags every listed noun as NN/NNS; verbs such as "walks", "sits", "fly" are not).
# id 1: truth sky, forest, grass, person, lake, mountain, road; hallu cloud, sun, bird, dog, flower.
#   "man" is an associated word of person; "ground" is associated with both grass and road and marks grass, the
#   first object that lists it.
DESC_1 = "A man walks along a road beside a lake under the sky."
DESC_1_GROUND = DESC_1 + " The ground is wet."
# id 2: truth sky, man, ship, ship, forest, bridge, mountain, cloud, lake, building (10, "ship" twice).
DESC_2 = "There is a ship near a bridge."
# id 3: truth child, grass, flower; hallu sky, cloud, tree, house, bench.
DESC_3_TRUTH = "A child sits on the grass."
DESC_3 = "A child sits on the grass near a bench and a dog."  # bench: an absent object; dog: not annotated at all
# id 4: truth sky, cloud, forest, lake, woman, paddle, watch; hallu ship, sun, ground, bird, grass.
#   "Dog" (capitalised, NNP) stays "Dog", which is no object word; "light" and "camera" are global safe words:
#   never hallucinations, yet counted among the object nouns; "people" is associated with woman; "street" is an
#   object word of neither list (a hallucination, not in Cog); "birds" -> bird and "boats" -> boat (associated with
#   ship) are absent objects.
DESC_4 = "Dog in the light. The people stand in the street with a camera. Two birds fly over the boats."


@pytest.fixture(scope="module")
def data() -> amber.AmberData:
    amber.ensure_nltk_data(NLTK_DIR)
    return amber.load_amber_data(AMBER_DIR)


def responses(pairs: list[tuple[int, str]]) -> list[AmberResponse]:
    return [AmberResponse(i, text, f"entry {n}") for n, (i, text) in enumerate(pairs, start=1)]


def metrics_of(data: amber.AmberData, pairs: list[tuple[int, str]], kind: str, **kw) -> dict:
    return amber.amber_metrics(amber.score_responses(data, responses(pairs), **kw), kind)


def discriminative_ids(data: amber.AmberData) -> list[int]:
    return [i for i in range(1, len(data.annotations) + 1) if data.annotation(i)["type"] != "generative"]


# --- data folder -----------------------------------------------------------------------------------------------


def test_data_folder_and_its_data_subfolder_both_work(data, tmp_path):
    assert len(data.annotations) == 15220
    assert data.initial_counters["chair_num"] == 0.001 and data.initial_counters["chair_score"] == 0
    parent = tmp_path / "AMBER"
    (parent / "data").mkdir(parents=True)
    for name in ("annotations.json", "relation.json", "safe_words.txt"):
        (parent / "data" / name).symlink_to((AMBER_DIR / name).resolve())
    assert amber.find_data_folder(parent) == parent / "data"
    # Without metrics.txt the official starting values are used.
    assert amber.load_amber_data(parent).initial_counters == data.initial_counters


# --- generative ------------------------------------------------------------------------------------------------


def test_empty_descriptions_score_zero(data):
    # No nouns at all: CHAIR = 0/0.001, Cover = 0/(0.001 + all truth objects), Cog likewise 0;
    # Hal = 100 - 1004/1004.001*100 = 0.0000996 -> 0.0.
    pairs = [(i, "") for i in range(1, 1005)]
    assert metrics_of(data, pairs, "g") == {"CHAIR": 0.0, "Cover": 0.0, "Hal": 0.0, "Cog": 0.0}


def test_descriptions_naming_only_truth_objects(data):
    items = {
        i.id: i
        for i in amber.score_responses(
            data, responses([(1, DESC_1_GROUND), (2, DESC_2), (3, DESC_3_TRUTH)]), None
        ).generative_items
    }
    # id 1: man -> person, road, lake, sky, ground -> grass (not road): 5 of 7 objects.
    assert items[1].nouns == ["man", "road", "lake", "sky", "ground"]
    assert sorted(items[1].truth_covered) == ["grass", "lake", "person", "road", "sky"]
    # id 2: "ship" marks the first of the two annotated ships only: 2 of 10.
    assert items[2].truth_covered == ["ship", "bridge"]
    assert items[3].truth_covered == ["child", "grass"]
    assert all(not item.hallucinated and not item.hallu_mentioned for item in items.values())
    # CHAIR = 0/(0.001+9) = 0.0; Cover = (5+2+2)/(0.001+7+10+3) = 9/20.001 = 44.998 -> 45.0;
    # Hal = 100 - 3/3.001*100 = 0.033 -> 0.0; Cog = 0/(0.001+15) = 0.0.
    pairs = [(1, DESC_1_GROUND), (2, DESC_2), (3, DESC_3_TRUTH)]
    assert metrics_of(data, pairs, "g") == {"CHAIR": 0.0, "Cover": 45.0, "Hal": 0.0, "Cog": 0.0}


def test_truth_and_hallucinated_objects(data):
    item3 = amber.score_description(data, 3, DESC_3, None, 0.8)
    assert (item3.nouns, item3.hallucinated) == (["child", "grass", "bench", "dog"], ["bench", "dog"])
    assert (item3.truth_covered, item3.hallu_mentioned) == (["child", "grass"], ["bench"])
    item4 = amber.score_description(data, 4, DESC_4, None, 0.8)
    assert item4.nouns == ["light", "people", "street", "camera", "bird", "boat"]
    assert item4.hallucinated == ["street", "bird", "boat"]
    assert (item4.truth_covered, item4.hallu_mentioned) == (["woman"], ["ship", "bird"])
    # ids 1, 3, 4: hallucinated nouns 0+2+3 = 5 of 4+4+6 = 14 -> CHAIR = 5/14.001 = 35.712 -> 35.7;
    # Cover = (4+2+1)/(0.001+7+3+7) = 7/17.001 = 41.17 -> 41.2; two of three descriptions hallucinate:
    # Hal = 100 - 1/3.001*100 = 66.678 -> 66.7; Cog = (0+1+2)/(0.001+5+5+5) = 3/15.001 = 19.999 -> 20.0.
    pairs = [(1, DESC_1), (3, DESC_3), (4, DESC_4)]
    assert metrics_of(data, pairs, "g") == {"CHAIR": 35.7, "Cover": 41.2, "Hal": 66.7, "Cog": 20.0}


def test_word_similarity_step_follows_the_official_order(data):
    table = {("dog", "house"): 0.95, ("dog", "ground"): 0.8, ("dog", "child"): 0.9}

    def similarity(a: str, b: str) -> float:
        return 1.0 if a == b else table.get((a, b), 0.0)

    # id 3, "A child sits near a bench and a dog.": bench is an absent object (exact match, then itself by
    # similarity) and stays a hallucination. dog: among the absent objects' words it first resembles "house"
    # (Cog), then among the annotated objects' words "ground" scores exactly the threshold (not above it) and
    # "child" above it, so dog is spared and marks child.
    item = amber.score_description(data, 3, "A child sits near a bench and a dog.", similarity, 0.8)
    assert item.hallucinated == ["bench"]
    assert item.truth_covered == ["child"]
    assert item.hallu_mentioned == ["house", "bench"]
    # Without the step dog is a hallucination and marks nothing.
    plain = amber.score_description(data, 3, "A child sits near a bench and a dog.", None, 0.8)
    assert (plain.hallucinated, plain.hallu_mentioned) == (["bench", "dog"], ["bench"])


def test_spacy_similarity_uses_the_named_model(monkeypatch):
    loaded = []

    class Doc:
        def __init__(self, text: str) -> None:
            self.text = text

        def similarity(self, other: Doc) -> float:
            return 0.5 if self.text != other.text else 1.0

    def load(name: str):
        loaded.append(name)
        if name != "en_core_web_md":
            raise OSError(f"[E050] Can't find model '{name}'.")
        return Doc

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=load))
    similarity, why = amber.spacy_similarity("en_core_web_md")
    assert why == "" and similarity("cat", "dog") == 0.5 and similarity("cat", "cat") == 1.0
    missing, why = amber.spacy_similarity("en_core_web_lg")
    assert missing is None and "en_core_web_lg" in why
    monkeypatch.setitem(sys.modules, "spacy", None)  # not installed
    assert amber.spacy_similarity("en_core_web_lg") == (None, "spaCy is not installed")


# --- discriminative --------------------------------------------------------------------------------------------
# Truth counts in annotations.json: existence 4924 "no"; state 2382 yes / 2382 no; number 1036 / 1036;
# action 396 / 396; relation 975 yes / 689 no. In all: 4789 "yes" and 9427 "no" of 14216.


def test_all_no_answers(data):
    pairs = [(i, "No") for i in discriminative_ids(data)]
    attribute_half = {"Accuracy": 50.0, "Precision": 50.0, "Recall": 100.0, "F1": 66.7}
    assert metrics_of(data, pairs, "d") == {
        # 9427/14216.001 = 66.31 -> 66.3 (accuracy and precision); recall 9427/9427.001 -> 100.0;
        # F1 = 2*.663*1/(.663+1+.0001) = 79.73 -> 79.7.
        "Accuracy": 66.3,
        "Precision": 66.3,
        "Recall": 100.0,
        "F1": 79.7,
        # All 4924 truths are "no": 100.0 everywhere; F1 = 2/(2.001) = 99.950025 -> 100.0.
        "existence": {"Accuracy": 100.0, "Precision": 100.0, "Recall": 100.0, "F1": 100.0},
        # Half of every attribute kind is "no": 3814/7628.003 = 49.99998 -> 50.0; F1 = 1/1.5001 = 66.66 -> 66.7.
        "attribute": {**attribute_half, "state": attribute_half, "number": attribute_half, "action": attribute_half},
        # 689/1664.001 = 41.41 -> 41.4; F1 = 2*.414/(1.414+.0001) = 58.55 -> 58.6.
        "relation": {"Accuracy": 41.4, "Precision": 41.4, "Recall": 100.0, "F1": 58.6},
    }


def test_oracle_answers(data):
    pairs = [(i, "Yes" if data.annotation(i)["truth"] == "yes" else "No") for i in discriminative_ids(data)]
    perfect = {"Accuracy": 100.0, "Precision": 100.0, "Recall": 100.0, "F1": 100.0}
    # Every ratio is n/(n+0.001) -> 100.0; F1 = 2/2.0001 = 99.995 -> 100.0 (existence 2/2.001 -> 100.0).
    assert metrics_of(data, pairs, "d") == {
        **perfect,
        "existence": perfect,
        "attribute": {**perfect, "state": perfect, "number": perfect, "action": perfect},
        "relation": perfect,
    }


def test_per_dimension_split_and_exact_answer_strings(data):
    # existence all "No" (right), attribute all "Yes", relation answered in a sentence: the official scorer only
    # knows the exact strings "Yes" and "No", so every relation answer is wrong.
    def answer(i: int) -> str:
        kind = data.annotation(i)["type"]
        if kind == "discriminative-hallucination":
            return "No"
        return "Yes" if "attribute" in kind else "Yes, there is."

    pairs = [(i, answer(i)) for i in discriminative_ids(data)]
    score = amber.score_responses(data, responses(pairs))
    assert score.not_yes_no == 1664
    zero = {"Accuracy": 0.0, "Precision": 0.0, "Recall": 0.0, "F1": 0.0}
    yes_half = {"Accuracy": 50.0, "Precision": 0.0, "Recall": 0.0, "F1": 0.0}
    assert amber.amber_metrics(score, "d") == {
        # correct 4924 + 3814 = 8738 of 14216.001 -> 61.47 -> 61.5; precision 4924/4924.001 -> 100.0;
        # recall 4924/9427.001 = 52.23 -> 52.2; F1 = 2*1*.522/(1.522+.0001) = 68.59 -> 68.6.
        "Accuracy": 61.5,
        "Precision": 100.0,
        "Recall": 52.2,
        "F1": 68.6,
        "existence": {"Accuracy": 100.0, "Precision": 100.0, "Recall": 100.0, "F1": 100.0},
        # "Yes" everywhere: right on the 3814 "yes" truths (50.0); no "No" answer, so precision 0/0.003 = 0.
        "attribute": {**yes_half, "state": yes_half, "number": yes_half, "action": yes_half},
        "relation": zero,
    }
    assert amber.amber_metrics(score, "de") == {"existence": amber.amber_metrics(score, "d")["existence"]}
    assert set(amber.amber_metrics(score, "da")) == {"attribute"}
    assert set(amber.amber_metrics(score, "dr")) == {"relation"}
    # Normalised first, "Yes, there is." counts as Yes: right on the 975 "yes" truths: 975/1664.001 = 58.59 -> 58.6.
    normalised = amber.amber_metrics(amber.score_responses(data, responses(pairs), normalize_answers=True), "dr")
    assert normalised["relation"] == {"Accuracy": 58.6, "Precision": 0.0, "Recall": 0.0, "F1": 0.0}


def test_normalize_yes_no():
    assert amber.normalize_yes_no("Yes, there is a dog.") == "Yes"
    assert amber.normalize_yes_no("  no.") == "No"
    assert amber.normalize_yes_no("NO") == "No"
    assert amber.normalize_yes_no("There is no dog.") == "No"  # the same rule as eval/answers.py
    assert amber.normalize_yes_no("Maybe, hard to say.") == "Maybe, hard to say."
    assert amber.normalize_yes_no("Nope") == "Nope"
    assert amber.normalize_yes_no("") == ""


def test_missing_dimensions(data):
    state = [i for i in discriminative_ids(data) if data.annotation(i)["type"] == "discriminative-attribute-state"]
    yes = [i for i in state if data.annotation(i)["truth"] == "yes"][:5]
    no = [i for i in state if data.annotation(i)["truth"] == "no"][:5]
    score = amber.score_responses(data, responses([(i, "No") for i in yes + no]))
    attribute = amber.amber_metrics(score, "da")["attribute"]
    # Officially an unanswered kind prints 0.0; here it is null (not measured).
    assert attribute["number"] is None and attribute["action"] is None
    # 5 right of 10: 5/10.001 = 49.995 -> 50.0; precision 5/10.001 -> 50.0; recall 5/5.001 = 99.98 -> 100.0.
    assert attribute["state"] == {"Accuracy": 50.0, "Precision": 50.0, "Recall": 100.0, "F1": 66.7}
    with pytest.raises(amber.InputError, match="existence / relation"):
        amber.amber_metrics(score, "d")
    with pytest.raises(amber.InputError, match="generative"):
        amber.amber_metrics(score, "g")


def test_amber_score_combines_chair_and_f1(data):
    pairs = [(1, DESC_1), (3, DESC_3), (4, DESC_4)] + [(i, "No") for i in discriminative_ids(data)]
    figures = metrics_of(data, pairs, "a")
    # CHAIR 35.7 (generative test above), F1 79.7 (all-"No" test): ½·(100 - 35.7 + 79.7) = 72.0.
    assert (figures["CHAIR"], figures["F1"], figures["AMBER"]) == (35.7, 79.7, 72.0)
    assert amber.amber_score(7.8, 86.5) == 89.4  # 89.35 rounds half up


# --- command line ----------------------------------------------------------------------------------------------

TOP_KEYS = {"CHAIR", "Cover", "Hal", "Cog", "Accuracy", "Precision", "Recall", "F1"}


def run_amber(*args: str, nltk_data: Path | None = NLTK_DIR) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NLTK_DATA", None)
    if nltk_data:
        env["NLTK_DATA"] = str(nltk_data)
    cmd = [sys.executable, str(ROOT / "eval" / "amber.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_cli_end_to_end(tmp_path):
    data = amber.load_amber_data(AMBER_DIR)
    answers = [{"id": 1, "response": DESC_1}, {"id": 3, "response": DESC_3}, {"id": 4, "response": DESC_4}]
    answers += [{"id": i, "response": "No"} for i in discriminative_ids(data)]
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(answers))
    out, details = tmp_path / "eval" / "amber.json", tmp_path / "details.jsonl"
    result = run_amber(
        "--amber-dir",
        str(AMBER_DIR),
        "--responses",
        str(path),
        "--type",
        "a",
        "--out",
        str(out),
        "--details",
        str(details),
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert set(figures) == TOP_KEYS | {"existence", "attribute", "relation", "AMBER"}
    assert set(figures["attribute"]) == {"Accuracy", "Precision", "Recall", "F1", "state", "number", "action"}
    assert set(figures["existence"]) == set(figures["relation"]) == {"Accuracy", "Precision", "Recall", "F1"}
    assert (figures["CHAIR"], figures["Cover"], figures["Hal"], figures["Cog"]) == (35.7, 41.2, 66.7, 20.0)
    assert (figures["Accuracy"], figures["F1"], figures["AMBER"]) == (66.3, 79.7, 72.0)
    # spaCy is not a dependency: one warning, and the table on stdout.
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "similarity" in warnings[0]
    assert "CHAIR" in result.stdout and "relation" in result.stdout and "72.0" in result.stdout
    rows = [json.loads(line) for line in details.read_text().splitlines()]
    assert len(rows) == len(answers) and rows[0]["hallucinated"] == []

    # JSONL answers, the parent folder of data/, and --type g: only the generative figures.
    parent = tmp_path / "AMBER"
    (parent / "data").mkdir(parents=True)
    for name in ("annotations.json", "relation.json", "safe_words.txt", "metrics.txt"):
        (parent / "data" / name).symlink_to((AMBER_DIR / name).resolve())
    jsonl = tmp_path / "answers.jsonl"
    jsonl.write_text("".join(json.dumps(a) + "\n" for a in answers[:3]))
    result = run_amber(
        "--amber-dir", str(parent), "--responses", str(jsonl), "--type", "g", "--out", str(out), "--no-similarity"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == {"CHAIR": 35.7, "Cover": 41.2, "Hal": 66.7, "Cog": 20.0}
    assert "warning" not in result.stderr


@pytest.mark.parametrize(
    "content, args, message",
    [
        (None, (), "answers.json: file not found"),
        ('[\n  {"id": 1,\n   "response": }\n]', (), "answers.json:3: not valid JSON"),
        ('[{"id": 1, "response": "a cat"}, {"id": 99999, "response": "No"}]', (), "entry 2: unknown id 99999"),
        ('[{"id": "1", "response": "a cat"}]', (), "entry 1: 'id' should be an integer"),
        ('[{"id": 1, "response": "a"}, {"id": 1, "response": "b"}]', (), "id 1 appears a second time"),
        ('[{"id": 1, "response": "a cat"}]', ("--type", "x"), "invalid choice: 'x'"),
        ('[{"id": 1, "response": "a cat"}]', ("--typo", "g"), "unknown flag '--typo' — did you mean '--type'?"),
        ('[{"id": 1, "response": "a cat"}]', ("--type", "d"), "no existence / attribute / relation answers"),
        (
            '[{"id": 1, "response": "a cat"}]',
            ("--amber-dir", "/nonexistent/amber"),
            "/nonexistent/amber: AMBER folder not found",
        ),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, args, message):
    path = tmp_path / "answers.json"
    if content is not None:
        path.write_text(content)
    argv = ["--amber-dir", str(AMBER_DIR), "--responses", str(path), "--nltk-data", str(NLTK_DIR), "--no-similarity"]
    with pytest.raises(SystemExit) as exit_info:
        amber.main([*argv, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err


def test_missing_nltk_data_is_a_clear_error(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(
        amber.ConfigError, match=r"NLTK data missing: punkt_tab, averaged_perceptron_tagger_eng, wordnet"
    ):
        amber.ensure_nltk_data()
    with pytest.raises(amber.ConfigError, match="is not a folder"):
        amber.ensure_nltk_data(tmp_path / "nowhere")
