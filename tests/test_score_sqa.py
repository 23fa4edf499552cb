"""ScienceQA scorer on a hand-made problems.json: parsing, IMG accuracy, the official breakdown, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval import sqa
from eval.common import EvalInputError


def problem(subject, grade, n_choices, answer, hint="", image=None):
    return {
        "question": "q",
        "choices": [f"option {i}" for i in range(n_choices)],
        "answer": answer,
        "hint": hint,
        "image": image,
        "subject": subject,
        "grade": grade,
        "split": "test",
    }


PROBLEMS = {
    "1": problem("natural science", "grade3", 3, 1, image="image.png"),
    "2": problem("social science", "grade8", 2, 0, hint="ctx"),
    "3": problem("language science", "grade10", 4, 2),
    "4": problem("natural science", "grade1", 3, 0, hint="h", image="image.png"),
    "5": problem("natural science", "grade2", 3, 1, image="image.png"),
    "6": problem("social science", "grade7", 2, 0),
    "7": problem("language science", "grade12", 2, 1, hint="h"),
    "8": problem("natural science", "grade6", 2, 0, image="image.png"),
    "99": problem("natural science", "grade6", 2, 0),
}

# (pid, text, prompt has <image>); problem 5 has no answer, problem 6 is a runner error line.
ANSWERS = [
    ("1", "B", True),  # bare letter: correct
    ("2", "A. yes", False),  # "X. ..." prefix: correct
    ("3", "Because of x. The answer is C.", False),  # one "The answer is X.": correct
    ("4", "I think A or B", True),  # FAILED
    ("7", "E", False),  # a letter beyond the problem's 2 choices: wrong
    ("8", "The answer is A. The answer is A.", True),  # two matches: FAILED
]


@pytest.fixture
def base_dir(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    splits = {"test": [str(i) for i in range(1, 9)], "val": ["99"]}
    (tmp_path / "pid_splits.json").write_text(json.dumps(splits))
    return tmp_path


def write_answers(path, extra=()):
    rows = []
    for pid, text, image in ANSWERS:
        prompt = ("<image>\n" if image else "") + "question\nA. x\nB. y"
        rows.append({"question_id": pid, "prompt": prompt, "text": text, "tokens": {"prompt": 10 * int(pid)}})
    rows.append({"question_id": "6", "prompt": "q", "error": "CUDA out of memory", "tokens": {}})
    rows += list(extra)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("B. the second one", "B"),
        ("The answer is B.", "B"),
        ("The answer is D, clearly", "D"),
        ("the answer is D.", "FAILED"),
        ("b", "FAILED"),
        ("B.", "FAILED"),
        ("The answer is B", "FAILED"),
        ("The answer is A. The answer is B.", "FAILED"),
        ("I cannot tell", "FAILED"),
        (None, "FAILED"),
    ],
)
def test_parse_answer_follows_upstream(text, expected):
    assert sqa.parse_answer(text) == expected


def test_scores_by_hand(base_dir, tmp_path, capsys):
    result_file = write_answers(tmp_path / "answers.jsonl")
    out = tmp_path / "out"
    result = sqa.main(
        [
            "--base-dir",
            str(base_dir),
            "--result-file",
            str(result_file),
            "--output-file",
            str(out / "output.json"),
            "--output-result",
            str(out / "upstream.json"),
            "--result-json",
            str(out / "result.json"),
        ]
    )
    metrics = result["metrics"]
    assert (metrics["correct"], metrics["total"]) == (3, 8)
    assert metrics["accuracy"] == pytest.approx(37.5)
    # IMG: 1 (right), 4, 8 (prompt has <image>) and 5 (unanswered, image in problems.json).
    assert (metrics["img_total"], metrics["img_accuracy"]) == (4, pytest.approx(25.0))
    assert result["headline"] == pytest.approx(25.0)
    assert (metrics["failed_parse"], metrics["missing"], metrics["errors"]) == (4, 1, 1)
    assert metrics["breakdown"] == pytest.approx(
        {"NAT": 25.0, "SOC": 50.0, "LAN": 50.0, "TXT": 100 / 3, "IMG": 25.0, "NO": 50.0, "G1-6": 25.0, "G7-12": 50.0}
    )
    assert result["tokens"] == {"prompt": pytest.approx(10 * (1 + 2 + 3 + 4 + 7 + 8) / 6)}
    assert json.loads((out / "result.json").read_text())["headline"] == pytest.approx(25.0)

    upstream = json.loads((out / "upstream.json").read_text())
    assert upstream["results"] == {"1": 1, "2": 0, "3": 2, "4": -1, "5": -1, "6": -1, "7": -1, "8": -1}
    analysis = json.loads((out / "output.json").read_text())
    assert sorted(r["question_id"] for r in analysis["correct"]) == ["1", "2", "3"]
    assert "1 problems have no answer (counted wrong): '5'" in capsys.readouterr().out


def test_integer_ids_match_string_pids(base_dir, tmp_path):
    rows = [{"question_id": 1, "prompt": "<image>\nq", "text": "B"}]
    (tmp_path / "a.jsonl").write_text(json.dumps(rows[0]) + "\n")
    result = sqa.main(["--base-dir", str(base_dir), "--result-file", str(tmp_path / "a.jsonl")])
    assert result["metrics"]["correct"] == 1


def test_answer_outside_the_split_is_an_error(base_dir, tmp_path):
    bad = {"question_id": "99", "prompt": "q", "text": "A"}
    result_file = write_answers(tmp_path / "answers.jsonl", extra=[bad])
    with pytest.raises(EvalInputError, match="'99'"):
        sqa.main(["--base-dir", str(base_dir), "--result-file", str(result_file)])


def test_duplicate_and_malformed_answers_are_errors(base_dir, tmp_path):
    dup = write_answers(tmp_path / "dup.jsonl", extra=[{"question_id": "1", "prompt": "q", "text": "B"}])
    with pytest.raises(EvalInputError, match="answered twice"):
        sqa.main(["--base-dir", str(base_dir), "--result-file", str(dup)])
    (tmp_path / "nan.jsonl").write_text('{"question_id": "1", "prompt": "q", "text": NaN}\n')
    with pytest.raises(EvalInputError, match="question_id '1'.*'text'"):
        sqa.main(["--base-dir", str(base_dir), "--result-file", str(tmp_path / "nan.jsonl")])
    (tmp_path / "broken.jsonl").write_text('{"question_id": "1", "text": \n')
    with pytest.raises(EvalInputError, match="broken.jsonl:1"):
        sqa.main(["--base-dir", str(base_dir), "--result-file", str(tmp_path / "broken.jsonl")])


def test_bad_problems_file_and_split_are_named(base_dir, tmp_path):
    answers = write_answers(tmp_path / "answers.jsonl")
    with pytest.raises(EvalInputError, match="no split 'minitest'"):
        sqa.main(["--base-dir", str(base_dir), "--result-file", str(answers), "--split", "minitest"])
    broken = dict(PROBLEMS, **{"3": problem("language science", "grade10", 2, 5)})
    (base_dir / "problems.json").write_text(json.dumps(broken))
    with pytest.raises(EvalInputError, match="problem '3'.*'answer' 5"):
        sqa.main(["--base-dir", str(base_dir), "--result-file", str(answers)])


def test_command_line_reports_bad_input_without_traceback(base_dir, tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    args = [sys.executable, "-m", "eval.sqa", "--base-dir", str(base_dir), "--result-file", str(missing)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: file not found: {missing}"
