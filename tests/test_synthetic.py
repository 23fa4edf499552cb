"""The synthetic VQA generator: deterministic, masks agree with annotations, question files in official formats."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import pope
from eval.common import read_jsonl
from eval.synthetic import CATEGORIES, POPE_CATEGORIES, generate, pope_negatives


def digest(folder: Path) -> str:
    hashes = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            hashes.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return hashes.hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, num_images=8, seed=3, split="test")
    return out


def test_same_seed_same_bytes_other_seed_differs(data: Path, tmp_path: Path) -> None:
    generate(tmp_path / "again", num_images=8, seed=3, split="test")
    generate(tmp_path / "other", num_images=8, seed=4, split="test")
    assert digest(tmp_path / "again") == digest(data)
    assert digest(tmp_path / "other") != digest(data)


def test_masks_match_annotations_and_objects_are_small(data: Path) -> None:
    annotations = json.loads((data / "annotations.json").read_text())["images"]
    for name, objects in annotations.items():
        image = Image.open(data / "images" / name)
        assert image.size == (336, 336) and image.mode == "RGB"
        mask = np.asarray(Image.open(data / "masks" / name))
        assert 1 <= len(objects) <= 4
        assert len({o["category"] for o in objects}) == len(objects)
        for index, obj in enumerate(objects, 1):
            x0, y0, x1, y1 = obj["bbox"]
            assert (mask == index).sum() == obj["area"] > 0
            assert (mask[y0:y1, x0:x1] == index).sum() == obj["area"]  # the mask lies inside the box
            assert obj["category"] == f"{obj['colour']} {obj['shape']}"
        assert (mask > 0).mean() < 0.3


def test_pope_labels_follow_the_masks_and_the_scorer_reads_them(data: Path) -> None:
    annotations = json.loads((data / "annotations.json").read_text())["images"]
    questions = read_jsonl(data / "llava_pope_test.jsonl")
    assert {q["category"] for q in questions} == set(POPE_CATEGORIES)
    for rule in POPE_CATEGORIES:
        rows = read_jsonl(data / "coco" / f"coco_pope_{rule}.json")
        yes = sum(r["label"] == "yes" for r in rows)
        assert yes == len(rows) - yes  # balanced, as POPE
        for row in rows:
            present = {o["category"] for o in annotations[row["image"]]}
            asked = row["text"][len("Is there a ") : -len(" in the image?")]
            assert asked in CATEGORIES
            assert (asked in present) == (row["label"] == "yes")
    # every answer right -> F1 100 through the real scorer
    answers = data / "answers.jsonl"
    labels = {
        str(r["question_id"]): r["label"]
        for rule in POPE_CATEGORIES
        for r in read_jsonl(data / "coco" / f"coco_pope_{rule}.json")
    }
    answers.write_text(
        "".join(
            json.dumps({"question_id": q["question_id"], "text": labels[str(q["question_id"])].capitalize()}) + "\n"
            for q in questions
        )
    )
    result = pope.main(
        [
            "--annotation-dir",
            str(data / "coco"),
            "--question-file",
            str(data / "llava_pope_test.jsonl"),
            "--result-file",
            str(answers),
        ]
    )
    assert result["headline"] == pytest.approx(100.0)


def test_adversarial_negatives_share_a_colour_or_shape() -> None:
    rng = np.random.default_rng(0)
    present = ["red circle"]
    negatives = pope_negatives(rng, present, "adversarial", Counter(), 3)
    assert all("red" in c or "circle" in c for c in negatives)
    assert "red circle" not in negatives
    with pytest.raises(ValueError, match="unknown POPE sampling rule"):
        pope_negatives(rng, present, "nearby", Counter(), 1)


def test_mme_sqa_and_training_files(data: Path) -> None:
    mme = read_jsonl(data / "llava_mme.jsonl")
    assert {q["category"] for q in mme} <= {"color", "count", "position"}
    for row in mme:
        subtask, name = row["question_id"].split("/")
        truth = (data / "mme" / subtask / f"{Path(name).stem}.txt").read_text().splitlines()
        assert sorted(line.split("\t")[1] for line in truth) == ["No", "Yes"]  # MME asks in yes/no pairs
    problems = json.loads((data / "scienceqa" / "problems.json").read_text())
    annotations = json.loads((data / "annotations.json").read_text())["images"]
    for problem in problems.values():
        present = {o["category"] for o in annotations[problem["image"]]}
        assert [c in present for c in problem["choices"]].count(True) == 1
        assert problem["choices"][problem["answer"]] in present
    train = json.loads((data / "train.json").read_text())
    kinds = Counter(record["id"].rsplit("-", 1)[1] for record in train)  # "-mme-sqa" counts as "sqa"
    # POPE, MME + ScienceQA, caption for every image; short-answer VQA where an object is unique in shape or colour
    assert kinds["pope"] == kinds["sqa"] == kinds["caption"] == 8 and 0 < kinds["vqa"] <= 8
    for record in train:
        kind = record["id"].rsplit("-", 1)[1]
        present = {o["category"] for o in annotations[record["image"]]}
        answers = [t["value"] for t in record["conversations"][1::2]]
        if kind == "pope":
            assert answers.count("Yes") == answers.count("No") == len(present)  # balanced, every object once
        elif kind == "caption":
            assert set(answers[0].rstrip(".").split(", ")) == present
        elif kind == "vqa":
            objects = annotations[record["image"]]
            for question, answer in zip(record["conversations"][0::2], answers):
                if question["value"].removeprefix("<image>\n").startswith("What colour is the "):
                    shape = question["value"].split("What colour is the ")[1].split("?")[0]
                    assert [o["colour"] for o in objects if o["shape"] == shape] == [answer]
                else:
                    colour = question["value"].split("What shape is the ")[1].split(" object?")[0]
                    assert [o["shape"] for o in objects if o["colour"] == colour] == [answer]
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in turns) == 1
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)


def test_bad_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--num-images"):
        generate(tmp_path, num_images=0, seed=0)
