"""POPE scorer on hand-made POPE label files and a LLaVA question file; counts and F1 computed by hand."""

import doctest
import json
import random

import pytest

from eval import pope
from eval.common import EvalInputError
from tests.helpers import read_jsonl, write_jsonl

SUFFIX = "\nAnswer the question using a single word or phrase."
# (question id, category, image, object, label); POPE asks about several objects per image, and its own label files
# number their lines from 1 in each file.
QUESTIONS = [
    (1, "adversarial", "a1.jpg", "dog", "yes"),
    (2, "adversarial", "a1.jpg", "cat", "no"),
    (3, "adversarial", "a2.jpg", "dog", "no"),
    (4, "adversarial", "a2.jpg", "cat", "yes"),
    (5, "random", "r1.jpg", "dog", "yes"),
    (6, "random", "r1.jpg", "cat", "yes"),
    (7, "random", "r2.jpg", "bird", "no"),
    (8, "random", "r2.jpg", "dog", "yes"),
]
ASKED = {qid: f"Is there a {thing} in the image?" for qid, _, _, thing, _ in QUESTIONS}
ANSWERS = {
    1: "Yes, there is a dog.",  # TP
    2: "No.",  # TN
    3: "Yes",  # FP
    4: "There is not a cat. Yes",  # first sentence says not: FN
    5: "yes",  # TP
    6: "Yes.",  # TP
    # 7 (label no) has no answer: scored as a false alarm; 8 (label yes) is a runner error: a miss.
}


@pytest.fixture
def files(tmp_path):
    coco = tmp_path / "coco"
    coco.mkdir()
    for category in ("adversarial", "random"):
        lines = [
            {"question_id": n, "image": image, "text": ASKED[qid], "label": label}
            for n, (qid, _, image, _, label) in enumerate([q for q in QUESTIONS if q[1] == category], 1)
        ]
        write_jsonl(coco / f"coco_pope_{category}.json", lines)
    questions = [
        {"question_id": qid, "image": image, "text": ASKED[qid] + SUFFIX, "category": category}
        for qid, category, image, _, _ in QUESTIONS
    ]
    return coco, write_jsonl(tmp_path / "llava_pope_test.jsonl", questions)


def write_answers(path, order=None, extra=()):
    rows = [
        {"question_id": qid, "prompt": ASKED[qid] + SUFFIX, "text": text, "tokens": {"kv_final": qid}}
        for qid, text in ANSWERS.items()
    ]
    rows.append({"question_id": 8, "prompt": ASKED[8] + SUFFIX, "error": "image not found"})
    if order is not None:
        random.Random(order).shuffle(rows)
    return write_jsonl(path, [*rows, *extra])


def run(files, result_file):
    coco, question_file = files
    args = ["--annotation-dir", str(coco), "--question-file", str(question_file), "--result-file", str(result_file)]
    return pope.main(args)


@pytest.mark.parametrize("order", [None, 1, 2])
def test_counts_and_f1_by_hand(files, tmp_path, order):
    result = run(files, write_answers(tmp_path / "answers.jsonl", order))
    adversarial, rand = result["metrics"]["adversarial"], result["metrics"]["random"]
    assert [adversarial[k] for k in ("tp", "fp", "tn", "fn", "unanswered")] == [1, 1, 1, 1, 0]
    assert [adversarial[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == pytest.approx(
        [50.0, 50.0, 50.0, 50.0, 50.0]
    )
    assert [rand[k] for k in ("tp", "fp", "tn", "fn", "unanswered")] == [2, 1, 0, 1, 2]
    # P = R = 2/3 -> F1 = 2/3; yes-ratio is over the 2 answered questions.
    assert [rand[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == pytest.approx(
        [50.0, 200 / 3, 200 / 3, 200 / 3, 100.0]
    )
    assert result["headline"] == pytest.approx((50 + 200 / 3) / 2)
    assert result["count"] == 8
    assert result["tokens"] == {"kv_final": pytest.approx(21 / 6)}


@pytest.mark.parametrize(
    "text, expected",
    [("Yes", "yes"), ("No", "no"), ("no, it is not.", "no"), ("Not sure", "yes"), ("I see it. It is not", "yes")],
)
def test_parse_follows_upstream(text, expected):
    # Upstream only looks at whole words of the first sentence ("Not" capitalised is not in its list), so "Not sure"
    # is yes, as the docstring says.
    assert pope.parse_yes_no(text) == expected


def test_label_lines_without_ids_pair_in_file_order(files, tmp_path):
    coco, _ = files
    for path in coco.iterdir():
        lines = [
            {k: v for k, v in json.loads(line).items() if k != "question_id"} for line in path.read_text().splitlines()
        ]
        write_jsonl(path, lines)
    assert run(files, write_answers(tmp_path / "answers.jsonl"))["headline"] == pytest.approx((50 + 200 / 3) / 2)


def test_misordered_label_file_is_an_error(files, tmp_path):
    coco, _ = files
    path = coco / "coco_pope_random.json"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    write_jsonl(path, [{**line, "question_id": 10 + n} for n, line in enumerate(lines[::-1])])
    with pytest.raises(EvalInputError, match="question_id 5 is about 'r1.jpg' but its label line is about 'r2.jpg'"):
        run(files, write_answers(tmp_path / "answers.jsonl"))


@pytest.mark.parametrize("with_ids", [False, True])
def test_swapped_label_lines_of_one_image_are_an_error(files, tmp_path, with_ids):
    # Lines 1 and 2 of the random file are both about r1.jpg: only the question text tells them apart. Without ids
    # the lines pair in file order; with ids (a label file from another set whose ids overlap) they pair by id.
    coco, _ = files
    path = coco / "coco_pope_random.json"
    lines = read_jsonl(path)
    lines[0], lines[1] = lines[1], lines[0]
    if with_ids:
        lines = [{**line, "question_id": 5 + n} for n, line in enumerate(lines)]
    else:
        lines = [{k: v for k, v in line.items() if k != "question_id"} for line in lines]
    write_jsonl(path, lines)
    with pytest.raises(EvalInputError) as error:
        run(files, write_answers(tmp_path / "answers.jsonl"))
    message = str(error.value)
    assert str(path) in message and "question_id 5" in message
    assert "'Is there a dog in the image?' but its label line is about 'Is there a cat in the image?'" in message


def test_answers_from_another_pope_set_are_an_error(files, tmp_path):
    # Another set numbered 1..8 too: same ids, other questions. Its answers must not be scored against our labels.
    answers = write_answers(tmp_path / "answers.jsonl")
    rows = read_jsonl(answers)
    rows[2]["prompt"] = "Is there a bird in the image?" + SUFFIX  # question 3 asks about a dog here
    write_jsonl(answers, rows)
    with pytest.raises(EvalInputError) as error:
        run(files, answers)
    message = str(error.value)
    assert str(answers) in message and "question_id 3" in message
    assert (
        "answers 'Is there a bird in the image?' but the question file asks 'Is there a dog in the image?'" in message
    )
    # answers without a prompt (older tools) cannot be checked and are scored by id as before
    write_jsonl(answers, [{k: v for k, v in row.items() if k != "prompt"} for row in rows])
    assert run(files, answers)["headline"] == pytest.approx((50 + 200 / 3) / 2)


def test_bad_inputs_are_named(files, tmp_path):
    coco, _ = files
    with pytest.raises(EvalInputError, match="99"):
        run(files, write_answers(tmp_path / "a.jsonl", extra=[{"question_id": 99, "prompt": "p", "text": "yes"}]))
    (coco / "coco_pope_random.json").rename(coco / "random.json")
    with pytest.raises(EvalInputError, match="no coco_pope_<category>.json for \\['random'\\]"):
        run(files, write_answers(tmp_path / "b.jsonl"))
    (coco / "random.json").rename(coco / "coco_pope_random.json")
    write_jsonl(coco / "coco_pope_adversarial.json", [{"question_id": 1, "image": "a1.jpg", "label": "maybe"}])
    with pytest.raises(EvalInputError, match="coco_pope_adversarial.json: line 1: label must be 'yes' or 'no'"):
        run(files, write_answers(tmp_path / "c.jsonl"))


def test_parse_yes_no_docstring_examples_hold():
    results = doctest.testmod(pope, verbose=False)
    assert results.attempted >= 1 and results.failed == 0
