"""MME scorer on a hand-made MME_Benchmark_release_version folder (both layouts); acc+ independent of line order."""

import json
import random

import pytest

from eval import mme
from eval.common import EvalInputError

YN = " Please answer yes or no."
SUFFIX = "\nAnswer the question using a single word or phrase."
# category -> image file -> [(question, gt)]; artwork uses images/ + questions_answers_YN/, the others are flat.
GROUND_TRUTH = {
    "existence": {
        "0001.jpg": [("Is there a dog in this image?", "Yes"), ("Is there a cat in this image?", "No")],
        "0002.jpg": [("Is there a car in this image?", "Yes"), ("Is there a bus in this image?", "No")],
    },
    "artwork": {
        "10.jpg": [("Is this painted by Monet?", "Yes"), ("Is this painted by Dali?", "No")],
        "11.jpg": [("Is this a portrait? ", "No"), ("Is this a landscape?", "Yes")],  # first has a double space
    },
    "code_reasoning": {"0020.png": [("Does this code print 3?", "Yes"), ("Does this code print 4?", "No")]},
}
# (question_id, question, prediction); None = runner error. artwork/11 second question is unanswered.
ANSWERS = [
    ("existence/0001.jpg", "Is there a dog in this image?", "Yes"),
    ("existence/0001.jpg", "Is there a cat in this image?", "No, there is not."),
    ("existence/0002.jpg", "Is there a car in this image?", "yes"),
    ("existence/0002.jpg", "Is there a bus in this image?", "Yes"),
    ("artwork/images/10.jpg", "Is this painted by Monet?", "I think yes"),  # "other"
    ("artwork/images/10.jpg", "Is this painted by Dali?", "No"),
    ("artwork/images/11.jpg", "Is this a portrait?", "no"),
    ("code_reasoning/0020.png", "Does this code print 3?", "Yes."),
    ("code_reasoning/0020.png", "Does this code print 4?", None),
]


@pytest.fixture
def mme_dir(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    for category, images in GROUND_TRUTH.items():
        folder = root / category
        qa_dir = folder / "questions_answers_YN" if category == "artwork" else folder
        image_dir = folder / "images" if category == "artwork" else folder
        qa_dir.mkdir(parents=True)
        image_dir.mkdir(parents=True, exist_ok=True)
        for image, pairs in images.items():
            (image_dir / image).write_bytes(b"not an image")
            lines = [f"{q}{YN}\t{gt}\n" for q, gt in pairs]
            (qa_dir / image.replace(".jpg", ".txt").replace(".png", ".txt")).write_text("".join(lines))
    (root / "eval_tool_readme.txt").write_text("not a category")
    return root


def write_answers(path, seed=None, extra=()):
    rows = []
    for qid, question, text in ANSWERS:
        row = {"question_id": qid, "prompt": question.strip() + SUFFIX, "tokens": {"visual_after": 100}}
        rows.append({**row, "error": "timeout"} if text is None else {**row, "text": text})
    if seed is not None:
        random.Random(seed).shuffle(rows)
    path.write_text("".join(json.dumps(row) + "\n" for row in [*rows, *extra]))
    return path


def run(mme_dir, result_file, *extra):
    return mme.main(["--mme-dir", str(mme_dir), "--result-file", str(result_file), *extra])


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_scores_by_hand_in_any_order(mme_dir, tmp_path, seed):
    result = run(mme_dir, write_answers(tmp_path / "answers.jsonl", seed))
    metrics = result["metrics"]
    # existence: 3 of 4 right; image 0001 fully right, 0002 not -> 75 + 50.
    assert metrics["existence"] == {
        "acc": 75.0,
        "acc_plus": 50.0,
        "score": 125.0,
        "questions": 4,
        "images": 2,
        "other": 0,
        "missing": 0,
    }
    # artwork: "I think yes" is other, the portrait question matches the double-space line, one unanswered.
    assert metrics["artwork"] == {**metrics["artwork"], "acc": 50.0, "acc_plus": 0.0, "other": 1, "missing": 1}
    assert (metrics["code_reasoning"]["acc"], metrics["code_reasoning"]["acc_plus"]) == (50.0, 0.0)
    assert result["headline"] == metrics["perception"] == pytest.approx(175.0)
    assert metrics["cognition"] == pytest.approx(50.0)
    assert (metrics["missing"], metrics["errors"], result["count"]) == (1, 1, 10)
    assert "posters" in metrics["absent_subtasks"]
    assert result["tokens"] == {"visual_after": 100.0}


@pytest.mark.parametrize("text, expected", [("Yes", "yes"), ("no.", "no"), ("Yes, it is", "yes"), ("Nope", "no")])
def test_parse_like_calculation_py(text, expected):
    assert mme.parse_yes_no(text) == expected
    assert mme.parse_yes_no("Maybe yes") == mme.parse_yes_no(None) == "other"


def test_eval_tool_files_keep_image_pairs_adjacent(mme_dir, tmp_path):
    out = tmp_path / "eval_tool" / "answers" / "ckpt"
    run(mme_dir, write_answers(tmp_path / "answers.jsonl", seed=3), "--write-mme-txt", str(out))
    lines = (out / "existence.txt").read_text().splitlines()
    assert lines[0] == f"0001.txt\tIs there a dog in this image?{YN}\tYes\tYes"
    assert [line.split("\t")[0] for line in lines] == ["0001.txt", "0001.txt", "0002.txt", "0002.txt"]
    artwork = (out / "artwork.txt").read_text().splitlines()
    assert artwork[2].split("\t")[1] == f"Is this a portrait? {YN}" and artwork[3].endswith("\tYes\t")
    # calculation.py pairs consecutive lines: on these files that gives our acc+.
    pairs = [lines[i : i + 2] for i in range(0, len(lines), 2)]
    right = [all(mme.parse_yes_no(x.split("\t")[3]) == x.split("\t")[2].lower() for x in pair) for pair in pairs]
    assert right == [True, False]


def test_bad_inputs_are_named(mme_dir, tmp_path):
    stray = {"question_id": "existence/0003.jpg", "prompt": "Is there a cow?" + SUFFIX, "text": "Yes"}
    with pytest.raises(EvalInputError, match="'existence/0003.jpg' with question 'Is there a cow\\?"):
        run(mme_dir, write_answers(tmp_path / "a.jsonl", extra=[stray]))
    twice = {"question_id": "existence/0001.jpg", "prompt": "Is there a dog in this image?" + SUFFIX, "text": "No"}
    with pytest.raises(EvalInputError, match="answered twice"):
        run(mme_dir, write_answers(tmp_path / "b.jsonl", extra=[twice]))
    with pytest.raises(EvalInputError, match="needs question_id '<category>/<image file>'"):
        run(mme_dir, write_answers(tmp_path / "c.jsonl", extra=[{"question_id": 7, "prompt": "p", "text": "x"}]))
    (mme_dir / "existence" / "0002.txt").write_text("Is there a car in this image?\tMaybe\n")
    with pytest.raises(EvalInputError, match="0002.txt:1: expected 'question<TAB>Yes\\|No'"):
        run(mme_dir, write_answers(tmp_path / "d.jsonl"))
    with pytest.raises(EvalInputError, match="not a folder"):
        run(tmp_path / "nowhere", write_answers(tmp_path / "e.jsonl"))
