"""EvalAI answer normalisation and the 10-choose-9 VQA accuracy, checked against hand-computed values."""

import pytest

from eval.common import EvalInputError
from eval.vqa_text import human_answers, leave_one_out_accuracy, normalize_answer, textvqa_accuracy, vqav2_accuracy


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("the cat.", "cat"),
        ("An Apple", "apple"),
        ("none", "0"),
        ("Yes!", "yes"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("dont", "don't"),
        ("red/blue", "red blue"),  # punctuation inside a word splits it ...
        ("red / blue", "red blue"),  # ... next to a space it is deleted
        ("(a) dog", "dog"),
        ("whats that?", "what's that"),
        ("the dog's toy", "dog 's toy"),
        ("  Ten\tcats\n", "10 cats"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


HUMANS = ["cat"] * 3 + ["dog"] * 2 + ["bird"] * 4 + ["fish"]


@pytest.mark.parametrize(
    "prediction, expected",
    [
        # 3 of 10 say cat: leaving out a cat (3 subsets) leaves 2 -> 2/3; the other 7 subsets keep 3 -> 1.
        ("cat", (3 * 2 / 3 + 7 * 1) / 10),
        # 2 say dog: 2 subsets keep 1 -> 1/3, 8 keep 2 -> 2/3.
        ("dog", (2 * 1 / 3 + 8 * 2 / 3) / 10),
        # 4 say bird: every subset keeps at least 3.
        ("bird", 1.0),
        # 1 says fish: the subset without it has 0, the 9 others have 1 -> 1/3.
        ("fish", 9 * (1 / 3) / 10),
        ("cow", 0.0),
    ],
)
def test_leave_one_out_accuracy_by_hand(prediction, expected):
    assert leave_one_out_accuracy(prediction, HUMANS) == pytest.approx(expected)


def test_textvqa_accuracy_normalises_both_sides():
    humans = ["Cat"] * 3 + ["the dog"] * 7
    assert textvqa_accuracy("The cat.", humans) == pytest.approx(0.9)
    assert textvqa_accuracy("Dog!", humans) == pytest.approx(1.0)


def test_vqav2_accuracy_skips_normalisation_when_humans_agree():
    # The official script only processes punctuation/numbers when the 10 answers differ.
    assert vqav2_accuracy("2", ["Two"] * 10) == 0.0
    assert vqav2_accuracy("2", ["Two"] * 9 + ["three"]) == pytest.approx(1.0)
    assert vqav2_accuracy(" yes\n", ["yes"] * 10) == 1.0


def test_human_answers_must_be_ten_strings():
    assert human_answers(["a"] * 10, "q1") == ["a"] * 10
    with pytest.raises(EvalInputError, match="q1: expected 10 human answers, found 9 answers"):
        human_answers(["a"] * 9, "q1")
    with pytest.raises(EvalInputError, match="q2: expected 10 human answers, found NoneType"):
        human_answers(None, "q2")
    with pytest.raises(EvalInputError, match="q3: human answers must be strings"):
        human_answers(["a"] * 9 + [float("nan")], "q3")
    with pytest.raises(ValueError):
        leave_one_out_accuracy("a", [])


def test_at_most_32_periods_are_stripped_as_in_the_official_code():
    # vqaEval.py passes re.UNICODE (32) as re.sub's count: a 41st-character tail of 8 periods survives.
    assert normalize_answer("yes" + "." * 32) == "yes"
    assert normalize_answer("yes" + "." * 40) == "yes" + "." * 8
    assert textvqa_accuracy("yes" + "." * 40, ["yes"] * 10) == 0.0
    assert textvqa_accuracy("yes" + "." * 32, ["yes"] * 10) == 1.0
    assert vqav2_accuracy("yes" + "." * 40, ["yes"] * 9 + ["no"]) == 0.0
    assert vqav2_accuracy("yes" + "." * 32, ["yes"] * 9 + ["no"]) == 1.0
