"""VQAv2: EvalAI submission file over the full test list, and local official accuracy on hand-made annotations."""

import json

import pytest

from eval import vqav2
from eval.common import EvalInputError
from tests.helpers import write_jsonl


def answer(qid, text=None, error=None):
    row = {"question_id": qid, "prompt": "q", "tokens": {"prompt": 60}}
    return {**row, "error": error} if error else {**row, "text": text}


@pytest.fixture
def test_files(tmp_path):
    test2015 = write_jsonl(tmp_path / "test2015.jsonl", [{"question_id": i, "text": "q"} for i in range(1, 7)])
    testdev = write_jsonl(tmp_path / "test-dev2015.jsonl", [{"question_id": i, "text": "q"} for i in range(1, 5)])
    answers = write_jsonl(tmp_path / "merge.jsonl", [answer(2, "The cat."), answer(1, "Two"), answer(3, error="oom")])
    return test2015, testdev, answers


def test_submission_covers_every_test_question(test_files, tmp_path):
    test2015, testdev, answers = test_files
    out = tmp_path / "answers_upload" / "test-dev" / "ckpt.json"
    result_json = tmp_path / "results" / "ckpt.json"
    args = ["--test-file", str(test2015), "--question-file", str(testdev), "--result-file", str(answers)]
    result = vqav2.main([*args, "--out", str(out), "--result-json", str(result_json)])
    assert json.loads(out.read_text()) == [
        {"question_id": 1, "answer": "2"},
        {"question_id": 2, "answer": "cat"},
        {"question_id": 3, "answer": ""},
        {"question_id": 4, "answer": ""},
        {"question_id": 5, "answer": ""},
        {"question_id": 6, "answer": ""},
    ]
    metrics = result["metrics"]
    assert (metrics["questions"], metrics["answered"], metrics["unanswered"]) == (6, 2, 4)
    assert (metrics["missing"], metrics["errors"], result["count"]) == (1, 1, 4)
    written = json.loads(result_json.read_text())
    assert written["headline"] is None and "EvalAI" in written["headline_note"]
    assert written["tokens"] == {"prompt": 60.0}


def test_submission_refuses_unknown_ids_and_needs_out(test_files, tmp_path):
    test2015, _, _ = test_files
    stray = write_jsonl(tmp_path / "stray.jsonl", [answer(1, "yes"), answer(7, "no")])
    with pytest.raises(EvalInputError, match="not in the benchmark, e.g. '7'"):
        vqav2.main(["--test-file", str(test2015), "--result-file", str(stray), "--out", str(tmp_path / "o.json")])
    with pytest.raises(SystemExit):
        vqav2.main(["--test-file", str(test2015), "--result-file", str(stray)])


def annotation(qid, answer_type, humans):
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1} for n, a in enumerate(humans)]
    return {"question_id": qid, "image_id": 1, "answer_type": answer_type, "answers": answers}


@pytest.fixture
def val_annotations(tmp_path):
    annotations = [
        annotation(10, "yes/no", ["yes"] * 10),
        annotation(11, "number", ["2"] * 2 + ["3"] * 8),
        annotation(12, "other", ["red"] * 10),
        annotation(13, "other", ["blue"] * 10),
    ]
    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    path.write_text(json.dumps({"annotations": annotations}))
    return path


def test_local_accuracy_by_answer_type(val_annotations, tmp_path):
    answers = write_jsonl(tmp_path / "merge.jsonl", [answer(10, "Yes"), answer(11, "two"), answer(12, "red.")])
    result = vqav2.main(["--annotation-file", str(val_annotations), "--result-file", str(answers)])
    # 11: 2 of 10 humans said 2 -> 2 subsets with 1 match (1/3), 8 with 2 (2/3) -> 0.6. 13 unanswered -> 0.
    assert result["metrics"]["accuracy"] == pytest.approx(
        {"overall": 100 * (1 + 0.6 + 1 + 0) / 4, "yes/no": 100.0, "number": 60.0, "other": 50.0}
    )
    assert result["headline"] == pytest.approx(65.0)
    assert (result["metrics"]["missing"], result["count"]) == (1, 4)


def test_question_json_fixes_the_question_set(val_annotations, tmp_path):
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({"questions": [{"question_id": 10}, {"question_id": 11}]}))
    answers = write_jsonl(tmp_path / "merge.jsonl", [answer(10, "no"), answer(11, "3")])
    args = ["--annotation-file", str(val_annotations), "--question-json", str(questions), "--result-file", str(answers)]
    assert vqav2.main(args)["headline"] == pytest.approx(100 * (0 + 1) / 2)
    questions.write_text(json.dumps({"questions": [{"question_id": 10}, {"question_id": 99}]}))
    with pytest.raises(EvalInputError, match="questions without annotation.*99"):
        vqav2.main(args)


def test_bad_annotations_are_named(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"annotations": [annotation(5, "colour", ["a"] * 10)]}))
    answers = write_jsonl(tmp_path / "merge.jsonl", [])
    with pytest.raises(EvalInputError, match="question_id 5.*answer_type"):
        vqav2.main(["--annotation-file", str(path), "--result-file", str(answers)])
    path.write_text(json.dumps({"annotations": [annotation(5, "other", ["a"] * 3)]}))
    with pytest.raises(EvalInputError, match="question_id 5.*expected 10 human answers"):
        vqav2.main(["--annotation-file", str(path), "--result-file", str(answers)])


def test_answer_normalised_to_empty_is_still_compared_with_the_humans(tmp_path):
    # Disagreeing humans are processed too: "a" and "the" both become "", which the answer "The" matches.
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"annotations": [annotation(20, "other", ["a"] * 4 + ["the"] * 6)]}))
    answers = write_jsonl(tmp_path / "merge.jsonl", [answer(20, "The")])
    result = vqav2.main(["--annotation-file", str(path), "--result-file", str(answers)])
    assert result["metrics"]["empty_after_normalisation"] == 1
    assert result["headline"] == pytest.approx(100.0)
    # A failed run is not an answer, even though its submitted entry is "" as well.
    failed = write_jsonl(tmp_path / "failed.jsonl", [answer(20, error="oom")])
    assert vqav2.main(["--annotation-file", str(path), "--result-file", str(failed)])["headline"] == 0.0
