"""MMBench on a hand-made TSV: submission xlsx, single-pass and circular accuracy (rotated rows and rounds)."""

import json

import pandas as pd
import pytest

from eval import mmbench
from eval.common import EvalInputError

NAN = float("nan")
# index, options, answer, category, l2-category; 1000001 and 1000002 are the TSV's rotated copies of 1 and 2.
ROWS = [
    (1, ["cat", "dog", "bird"], "B", "attr", "perception"),
    (1000001, ["dog", "bird", "cat"], "A", "attr", "perception"),
    (2, ["red", "blue"], "A", "color", "perception"),
    (1000002, ["blue", "red"], "B", "color", "perception"),
    (3, ["1", "10", "100", "1000"], "D", "count", "reasoning"),
    (4, ["x", "y"], "A", "color", "perception"),
]
ANSWERS = {1: "B", 1000001: "A. dog", 2: "The answer is A", 1000002: "A", 3: "(D) 1000"}  # 4 is unanswered


def write_tsv(path, rows, with_answer=True):
    records = []
    for index, options, answer, category, l2 in rows:
        padded = options + [NAN] * (4 - len(options))
        record = {"index": index, "question": "What is it?", "hint": NAN, **dict(zip("ABCD", padded, strict=True))}
        if with_answer:
            record["answer"] = answer
        record |= {"category": category, "image": "aGVsbG8=", "source": "s", "l2-category": l2, "comment": NAN}
        records.append(record | {"split": "dev"})
    pd.DataFrame(records).to_csv(path, sep="\t", index=False)
    return path


def write_answers(path, answers):
    lines = [
        {"question_id": qid, "round_id": r, "prompt": "p", "text": t, "tokens": {"generated": 1}}
        for (qid, r), t in answers
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run(tsv, answers, *extra):
    return mmbench.main(["--annotation-file", str(tsv), "--result-file", str(answers), *extra])


def test_single_pass_and_circular_by_hand(tmp_path):
    tsv = write_tsv(tmp_path / "mmbench_dev.tsv", ROWS)
    answers = write_answers(tmp_path / "ckpt.jsonl", [((qid, 0), text) for qid, text in ANSWERS.items()])
    result = run(tsv, answers, "--upload-dir", str(tmp_path / "upload"), "--result-json", str(tmp_path / "r.json"))
    metrics = result["metrics"]
    # Rows right: 1, 1000001, 2, 3 of 6. Groups right: 1 and 3 of 4 (2's rotated copy is wrong, 4 unanswered).
    assert metrics["single_pass"] == pytest.approx(
        {
            "overall": 400 / 6,
            "category/attr": 100.0,
            "category/color": 100 / 3,
            "category/count": 100.0,
            "l2/perception": 60.0,
            "l2/reasoning": 100.0,
        }
    )
    assert metrics["circular"] == pytest.approx(
        {
            "overall": 50.0,
            "category/attr": 100.0,
            "category/color": 0.0,
            "category/count": 100.0,
            "l2/perception": 100 / 3,
            "l2/reasoning": 100.0,
        }
    )
    assert result["headline"] == pytest.approx(50.0)
    assert (result["count"], metrics["rows"], metrics["outcomes"]) == (4, 6, {"missing": 1, "right": 4, "wrong": 1})
    assert result["benchmark"] == "mmbench"

    upload = pd.read_excel(tmp_path / "upload" / "ckpt.xlsx")
    assert list(upload.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert upload["prediction"].tolist()[:5] == ["B", "A. dog", "The answer is A", "A", "(D) 1000"]
    assert pd.isna(upload["prediction"].iloc[5])


ROUND_ROWS = [(5, ["cat", "dog", "bird"], "C", "attr", "perception"), (6, ["yes", "no"], "A", "bool", "reasoning")]
# (question id, round): shown options, option_char, answer text. Round r shows the options rotated left by r.
ROUNDS = {
    (5, 0): (["cat", "dog", "bird"], ["A", "B", "C"], "C"),  # bird: right
    (5, 1): (["dog", "bird", "cat"], ["B", "C", "A"], "B"),  # shown B is original C: right
    (5, 2): (["bird", "cat", "dog"], ["C", "A", "B"], "A"),  # shown A is original C: right
    (6, 0): (["yes", "no"], ["A", "B"], "A"),  # right
    (6, 1): (["no", "yes"], ["B", "A"], "A"),  # shown A is "no" (original B): wrong
}


@pytest.mark.parametrize("with_option_char", [True, False])
def test_all_rounds_answers_are_circular(tmp_path, with_option_char):
    tsv = write_tsv(tmp_path / "dev.tsv", ROUND_ROWS)
    lines = []
    for (qid, round_id), (options, chars, text) in ROUNDS.items():
        line = {"question_id": qid, "round_id": round_id, "prompt": "p", "text": text}
        lines.append(line | ({"options": options, "option_char": chars} if with_option_char else {}))
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run(tsv, answers, "--lang", "cn")
    assert result["metrics"]["single_pass"]["overall"] == pytest.approx(100.0)
    assert result["metrics"]["circular"]["overall"] == pytest.approx(50.0)
    assert result["metrics"]["all_rounds"] is True and result["benchmark"] == "mmbench_cn"

    answers.write_text("".join(json.dumps(line) + "\n" for line in lines if line["round_id"] != 2))
    result = run(tsv, answers)
    assert result["metrics"]["circular"]["overall"] == 0.0
    assert result["metrics"]["outcomes"]["missing"] == 1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("A.", "A"),
        ("B. dog", "B"),
        ("(C) bird", "C"),
        ("The answer is C.", "C"),
        ("Answer: (B)", "B"),
        ("I pick B here", "B"),
        ("It is a dog.", "B"),
        ("bird", "C"),
        ("A dog and a bird", None),  # the lone A is not among the last four words; two option texts
        ("B or C", None),
        ("no idea", None),
        # VLMEvalKit's rules: a lone capital near the end is the letter, even "A" followed by a word ...
        ("A is correct.", "A"),
        ("A is the answer", "A"),
        ("**C**", "C"),
        # ... but not when it opens a longer answer; then "answer is X" decides, then the option texts
        ("B is right because the cat sits on the mat", None),
        ("Looking at the picture, I think the right one is C", "C"),  # C is among the last four words
        ("The correct answer is **B**. Here the dog sits on the mat.", "B"),
        ("The answer is a dog", "A"),  # VLMEvalKit's pattern reads the article: kept for comparable numbers
        ("答案是B", None),  # no word boundary around B: VLMEvalKit leaves it to its GPT judge
        ("Z", None),  # "none of the options"
        ("Cannot determine the answer. It looks like a dog", None),  # a refusal picks nothing, whatever follows
        ("I pick cat", "A"),
    ],
)
def test_letter_extraction(text, expected):
    assert mmbench.extract_letter(text, ["cat", "dog", "bird"]) == expected


def test_option_text_needs_a_unique_containment():
    # "1000" contains all four options' texts: VLMEvalKit picks none (no exact-match preference)
    assert mmbench.extract_letter("1000", ["1", "10", "100", "1000"]) is None
    assert mmbench.extract_letter("10", ["1", "10", "100", "1000"]) is None
    assert mmbench.extract_letter("It is blue", ["red", "blue"]) == "B"


def test_test_split_without_answers_only_writes_the_submission(tmp_path):
    tsv = write_tsv(tmp_path / "mmbench_test.tsv", ROWS, with_answer=False)
    answers = write_answers(tmp_path / "ckpt.jsonl", [((1, 0), "B")])
    result = run(tsv, answers, "--upload-dir", str(tmp_path / "up"), "--experiment", "exp1")
    assert result["headline"] is None and "OpenCompass" in result["headline_note"]
    upload = pd.read_excel(tmp_path / "up" / "exp1.xlsx")
    assert list(upload.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "split"]


def test_bad_inputs_are_named(tmp_path):
    tsv = write_tsv(tmp_path / "dev.tsv", ROWS)
    with pytest.raises(EvalInputError, match="\\('7', 0\\)"):
        run(tsv, write_answers(tmp_path / "a.jsonl", [((7, 0), "A")]))
    with pytest.raises(EvalInputError, match="\\('1', 3\\)"):  # index 1 has 3 options: rounds 0-2
        run(tsv, write_answers(tmp_path / "b.jsonl", [((1, 3), "A")]))
    with pytest.raises(EvalInputError, match="round 0 answered twice"):
        run(tsv, write_answers(tmp_path / "c.jsonl", [((1, 0), "A"), ((1, 0), "B")]))
    bad = write_tsv(tmp_path / "bad.tsv", [(9, ["x", "y"], "C", "c", "l")])
    with pytest.raises(EvalInputError, match="index 9: answer 'C' is not one of its option letters"):
        run(bad, write_answers(tmp_path / "d.jsonl", []))


def test_control_characters_in_answers_do_not_break_the_xlsx(tmp_path):
    tsv = write_tsv(tmp_path / "mmbench_test.tsv", ROWS, with_answer=False)
    answers = write_answers(tmp_path / "ckpt.jsonl", [((1, 0), "A\u0006\u0000 dog")])
    run(tsv, answers, "--upload-dir", str(tmp_path / "up"), "--experiment", "exp1")
    upload = pd.read_excel(tmp_path / "up" / "exp1.xlsx")
    assert upload.loc[upload["index"] == 1, "prediction"].item() == "A dog"
