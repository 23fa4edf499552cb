"""TextVQA scorer on a hand-made TextVQA_0.5.1_val.json: both matching modes, prompt formats, bad input."""

import json

import pytest

from eval import textvqa
from eval.common import EvalInputError

SUFFIX = "Answer the question using a single word or phrase."
ANNOTATIONS = [
    {
        "question_id": 101,
        "image_id": "img1",
        "question": "What brand is this?",
        "answers": ["nike"] * 3 + ["adidas"] * 7,
    },
    {"question_id": 102, "image_id": "img1", "question": "What color is the shirt?", "answers": ["red"] * 10},
    {"question_id": 103, "image_id": "img2", "question": "What number is shown?", "answers": ["two"] * 5 + ["2"] * 5},
    {"question_id": 104, "image_id": "img3", "question": "What is written?", "answers": ["stop"] * 10},
    {"question_id": 105, "image_id": "img4", "question": "Who made it?", "answers": ["ford"] * 10},
]
# (annotation question_id, image id, prompt, text). 104 is unanswered, 105 a runner error.
ANSWERS = [
    (101, "img1", f"What brand is this?\nReference OCR token: Nike, Just\n{SUFFIX}", "Nike"),  # 3 of 10: 0.9
    (102, "img1", f"What color is the shirt?\n{SUFFIX}", "Red."),  # 1.0
    (103, "img2", f"Reference OCR token: 2\nWhat number is shown?\n{SUFFIX}", "Two"),  # 1.0
]
EXPECTED = 100 * (0.9 + 1 + 1 + 0 + 0) / 5


@pytest.fixture
def annotation_file(tmp_path):
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_name": "textvqa", "data": ANNOTATIONS}))
    return path


def write_answers(path, by="image", reverse=False, extra=()):
    rows = [
        {"question_id": image if by == "image" else qid, "prompt": prompt, "text": text, "tokens": {"generated": 2}}
        for qid, image, prompt, text in ANSWERS
    ]
    rows.append({"question_id": "img4" if by == "image" else 105, "prompt": f"Who made it?\n{SUFFIX}", "error": "x"})
    rows = rows[::-1] if reverse else rows
    path.write_text("".join(json.dumps(row) + "\n" for row in [*rows, *extra]))
    return path


def run(annotation_file, result_file, *extra):
    return textvqa.main(["--annotation-file", str(annotation_file), "--result-file", str(result_file), *extra])[0]


@pytest.mark.parametrize("reverse", [False, True])
def test_upstream_key_by_image_and_question(annotation_file, tmp_path, reverse, capsys):
    result = run(annotation_file, write_answers(tmp_path / "a.jsonl", reverse=reverse))
    assert result["headline"] == pytest.approx(EXPECTED)
    assert result["metrics"] == {"accuracy": pytest.approx(EXPECTED), "answered": 4, "missing": 1, "errors": 1}
    assert (result["count"], result["tokens"]) == (5, {"generated": 2.0})
    out = capsys.readouterr().out
    assert "matched by image_question" in out and "counted 0): 104" in out


def test_numeric_question_ids_match_directly(annotation_file, tmp_path, capsys):
    result = run(annotation_file, write_answers(tmp_path / "a.jsonl", by="id"))
    assert result["headline"] == pytest.approx(EXPECTED)
    assert "matched by question_id" in capsys.readouterr().out


def test_question_recovered_from_each_prompt_format():
    assert textvqa.question_from_prompt("OCR tokens: a b Question: What IS it? Short answer:", "q") == "what is it?"
    assert textvqa.question_from_prompt(f"Q1?\nReference OCR token: a\n{SUFFIX}", "q") == "q1?"
    assert textvqa.question_from_prompt(f"Reference OCR token: a\nQ2?\n{SUFFIX}", "q") == "q2?"
    assert textvqa.question_from_prompt(f"Q3?\n{SUFFIX}", "q") == "q3?"
    with pytest.raises(EvalInputError, match="question_id 'img9': cannot find the question"):
        textvqa.question_from_prompt("one line only", "question_id 'img9'")


def test_result_dir_scores_every_file(annotation_file, tmp_path):
    answers = tmp_path / "answers"
    answers.mkdir()
    write_answers(answers / "ckpt-a.jsonl")
    (answers / "ckpt-b.jsonl").write_text("")
    out = tmp_path / "results"
    results = textvqa.main(
        ["--annotation-file", str(annotation_file), "--result-dir", str(answers), "--result-json", str(out)]
    )
    assert [r["headline"] for r in results] == [pytest.approx(EXPECTED), 0.0]
    assert json.loads((out / "ckpt-b.json").read_text())["metrics"]["missing"] == 5


def test_identical_questions_take_answers_in_order(tmp_path):
    twice = [dict(ANNOTATIONS[3], question_id=201), dict(ANNOTATIONS[3], question_id=202, answers=["go"] * 10)]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"data": twice}))
    prompt = f"What is written?\n{SUFFIX}"
    rows = [{"question_id": "img3", "prompt": prompt, "text": text} for text in ("stop", "go")]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run(path, tmp_path / "a.jsonl")["headline"] == pytest.approx(100.0)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    with pytest.raises(EvalInputError, match="answered 4 times"):
        run(path, tmp_path / "b.jsonl")


def test_unknown_answers_and_bad_prompts_are_errors(annotation_file, tmp_path):
    stray = {"question_id": "img9", "prompt": f"What?\n{SUFFIX}", "text": "x"}
    with pytest.raises(EvalInputError, match="image 'img9' question 'what\\?' matches no annotation"):
        run(annotation_file, write_answers(tmp_path / "a.jsonl", extra=[stray]))
    stray = {"question_id": 999, "prompt": "p", "text": "x"}
    with pytest.raises(EvalInputError, match="999"):
        run(annotation_file, write_answers(tmp_path / "b.jsonl", by="id", extra=[stray]), "--match", "question_id")
    bad_prompt = {"question_id": "img3", "prompt": "a\nb\nc\nd", "text": "x"}
    with pytest.raises(EvalInputError, match="question_id 'img3': cannot find the question"):
        run(annotation_file, write_answers(tmp_path / "c.jsonl", extra=[bad_prompt]))


def test_bad_annotation_file_is_named(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"data": [dict(ANNOTATIONS[0], answers=["a"] * 9)]}))
    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(EvalInputError, match="question_id 101.*expected 10 human answers, found 9"):
        run(path, tmp_path / "a.jsonl")
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(EvalInputError, match="'data' list"):
        run(path, tmp_path / "a.jsonl")
