"""eval.prepare on tiny datasets with the Hugging Face copies' real column names, saved to disk and reloaded."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pytest
from PIL import Image

from eval.prepare import main

SUFFIX = "\nAnswer the question using a single word or phrase."


def image_bytes(color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format=fmt)
    return buf.getvalue()


RED, GREEN, BLUE = image_bytes((255, 0, 0)), image_bytes((0, 255, 0)), image_bytes((0, 0, 255), "JPEG")


def img(data: bytes) -> dict[str, Any]:
    return {"bytes": data, "path": None}


def save(tmp_path: Path, splits: dict[str, dict[str, list[Any]]], features: dict[str, Any] | None = None) -> str:
    """A DatasetDict saved with save_to_disk; ``image`` columns get the datasets.Image feature."""
    dd = {}
    for split, columns in splits.items():
        feats = dict(features or {})
        if "image" in columns:
            feats["image"] = datasets.Image()
        ds = datasets.Dataset.from_dict(columns)
        if feats:
            ds = ds.cast(datasets.Features({**ds.features, **feats}))
        dd[split] = ds
    path = tmp_path / "saved"
    datasets.DatasetDict(dd).save_to_disk(str(path))
    return str(path)


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(*argv: str) -> int:
    return main(list(argv))


# ----------------------------------------------------------------------------------------------------------------


def pope_columns() -> dict[str, list[Any]]:
    return {
        "id": ["0", "1", "2", "3"],
        "question_id": ["1", "2", "3", "4"],
        "question": [
            "Is there a snowboard in the image?",
            "Is there a dog in the image?",
            "Is there a car in the image?",
            "Is there a cat in the image?",
        ],
        "answer": ["yes", "no", "no", "yes"],
        "image_source": ["COCO_val2014_000000310196", "COCO_val2014_000000310196", "COCO_val2014_1", "COCO_val2014_1"],
        "category": ["adversarial", "adversarial", "random", "popular"],
        "image": [img(RED), img(RED), img(BLUE), img(BLUE)],
    }


def test_pope_layout_ids_and_byte_exact_images(tmp_path: Path) -> None:
    saved = save(tmp_path, {"test": pope_columns()})
    out = tmp_path / "pope"
    assert run("pope", "--out", str(out), "--from-disk", saved) == 0
    questions = jsonl(out / "llava_pope_test.jsonl")
    assert questions[0] == {
        "question_id": 1,
        "image": "COCO_val2014_000000310196.jpg",
        "text": "Is there a snowboard in the image?" + SUFFIX,
        "category": "adversarial",
    }
    adversarial = jsonl(out / "coco" / "coco_pope_adversarial.json")
    assert [(a["question_id"], a["label"]) for a in adversarial] == [(1, "yes"), (2, "no")]
    assert adversarial[1]["text"] == "Is there a dog in the image?"
    assert [a["question_id"] for a in jsonl(out / "coco" / "coco_pope_random.json")] == [3]
    assert sorted(p.name for p in (out / "val2014").iterdir()) == [
        "COCO_val2014_000000310196.jpg",
        "COCO_val2014_1.jpg",
    ]
    assert (out / "val2014" / "COCO_val2014_1.jpg").read_bytes() == BLUE
    assert (out / "val2014" / "COCO_val2014_000000310196.jpg").read_bytes() == RED
    assert run("pope", "--check", "--out", str(out)) == 0


def test_pope_ids_restarting_per_category_are_renumbered(tmp_path: Path) -> None:
    columns = pope_columns()
    columns["question_id"] = ["1", "2", "1", "1"]
    out = tmp_path / "pope"
    assert run("pope", "--out", str(out), "--from-disk", save(tmp_path, {"test": columns})) == 0
    assert [q["question_id"] for q in jsonl(out / "llava_pope_test.jsonl")] == [1, 2, 3, 4]
    assert [a["question_id"] for a in jsonl(out / "coco" / "coco_pope_popular.json")] == [4]


def test_check_names_missing_files_and_first_missing_image(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pope"
    assert run("pope", "--out", str(out), "--from-disk", save(tmp_path, {"test": pope_columns()})) == 0
    (out / "coco" / "coco_pope_popular.json").unlink()
    (out / "val2014" / "COCO_val2014_1.jpg").unlink()
    capsys.readouterr()
    assert run("pope", "--check", "--out", str(out)) == 1
    report = capsys.readouterr().out
    assert f"missing file: {out / 'coco' / 'coco_pope_popular.json'}" in report
    assert "1 of 2 referenced by llava_pope_test.jsonl" in report
    assert str(out / "val2014" / "COCO_val2014_1.jpg") in report
    assert "coco_pope_random.json" not in report


def test_rerun_keeps_existing_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    saved = save(tmp_path, {"test": pope_columns()})
    out = tmp_path / "pope"
    assert run("pope", "--out", str(out), "--from-disk", saved) == 0
    assert "2 images written, 0 already there" in capsys.readouterr().out
    assert run("pope", "--out", str(out), "--from-disk", saved) == 0
    assert "0 images written, 2 already there" in capsys.readouterr().out


def test_textvqa(tmp_path: Path) -> None:
    answers = [["nike"] * 9 + ["nikes"], ["red"] * 10, ["3"] * 10]
    columns = {
        "image_id": ["003a8ae2ef43b901", "003a8ae2ef43b901", "0054c91397f2fe05"],
        "question_id": [34602, 34603, 34604],
        "question": ["what brand is the shoe?", "what color is the logo?", "how many cups?"],
        "question_tokens": [["what"], ["what"], ["how"]],
        "image": [img(BLUE), img(BLUE), img(RED)],
        "image_width": [4, 4, 4],
        "image_height": [3, 3, 3],
        "flickr_original_url": ["u"] * 3,
        "flickr_300k_url": ["u"] * 3,
        "answers": answers,
        "image_classes": [["shoe"], ["shoe"], ["cup"]],
        "set_name": ["val"] * 3,
        "ocr_tokens": [["NIKE", "just"], ["NIKE"], []],
    }
    out = tmp_path / "textvqa"
    assert run("textvqa", "--out", str(out), "--from-disk", save(tmp_path, {"validation": columns})) == 0
    questions = jsonl(out / "llava_textvqa_val_v051_ocr.jsonl")
    assert questions[0] == {
        "question_id": 34602,
        "image": "003a8ae2ef43b901.jpg",
        "text": "what brand is the shoe?\nReference OCR token: NIKE, just" + SUFFIX,
        "category": "default",
    }
    assert questions[2]["text"] == "how many cups?\nReference OCR token: " + SUFFIX
    ann = json.loads((out / "TextVQA_0.5.1_val.json").read_text())
    assert ann["dataset_version"] == "0.5.1"
    assert [(a["question_id"], a["image_id"], a["answers"]) for a in ann["data"]] == [
        (34602, "003a8ae2ef43b901", answers[0]),
        (34603, "003a8ae2ef43b901", answers[1]),
        (34604, "0054c91397f2fe05", answers[2]),
    ]
    assert sorted(p.name for p in (out / "train_images").iterdir()) == ["003a8ae2ef43b901.jpg", "0054c91397f2fe05.jpg"]
    assert (out / "train_images" / "003a8ae2ef43b901.jpg").read_bytes() == BLUE


def test_mme_flat_and_nested_categories(tmp_path: Path) -> None:
    columns = {
        "question_id": ["existence/000000006040.jpg"] * 2 + ["artwork/10002.jpg"] * 2,
        "image": [img(RED), img(RED), img(GREEN), img(GREEN)],
        "question": [
            "Is there a train in this image? Please answer yes or no.",
            "Is there a bed in this image? Please answer yes or no.",
            "Is this artwork created by Donatello?  Please answer yes or no.",
            "Is this artwork created by Monet? Please answer yes or no.",
        ],
        "answer": ["Yes", "No", "Yes", "No"],
        "category": ["existence", "existence", "artwork", "artwork"],
    }
    out = tmp_path / "MME"
    assert run("mme", "--out", str(out), "--from-disk", save(tmp_path, {"test": columns})) == 0
    questions = jsonl(out / "llava_mme.jsonl")
    assert questions[0] == {
        "question_id": "existence/000000006040.jpg",
        "image": "existence/000000006040.jpg",
        "text": "Is there a train in this image?" + SUFFIX,
        "category": "existence",
    }
    assert questions[2]["image"] == "artwork/images/10002.jpg"
    assert questions[2]["text"] == "Is this artwork created by Donatello?" + SUFFIX
    root = out / "MME_Benchmark_release_version"
    assert (root / "existence" / "000000006040.txt").read_text() == (
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n"
    )
    nested = (root / "artwork" / "questions_answers_YN" / "10002.txt").read_text().splitlines()
    assert nested[0] == "Is this artwork created by Donatello?  Please answer yes or no.\tYes"
    assert (root / "artwork" / "images" / "10002.jpg").read_bytes() == GREEN
    assert run("mme", "--check", "--out", str(out)) == 0
    (root / "artwork" / "questions_answers_YN" / "10002.txt").unlink()
    assert run("mme", "--check", "--out", str(out)) == 1


def vqav2_columns(ids: list[int], answers: list[list[dict[str, Any]]] | None) -> dict[str, list[Any]]:
    n = len(ids)
    return {
        "question_type": ["what"] * n,
        "multiple_choice_answer": ["yes"] * n,
        "answers": answers or [[] for _ in ids],
        "image_id": [9, 9, 262148][:n],
        "answer_type": ["yes/no"] * n,
        "question_id": ids,
        "question": [f"question {i}?" for i in ids],
        "image": [img(RED), img(RED), img(GREEN)][:n],
    }


def test_vqav2_testdev_test_and_val(tmp_path: Path) -> None:
    answer = [{"answer": "yes", "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)]
    features = {
        "answers": [{"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
                     "answer_id": datasets.Value("int64")}],
    }  # fmt: skip
    saved = save(
        tmp_path,
        {
            "testdev": vqav2_columns([90, 91], None),
            "test": vqav2_columns([90, 91, 92], None),
            "validation": vqav2_columns([5, 6], [answer, answer]),
        },
        features,
    )
    out = tmp_path / "vqav2"
    assert run("vqav2", "--out", str(out), "--from-disk", saved, "--parts", "testdev,test,val") == 0
    testdev = jsonl(out / "llava_vqav2_mscoco_test-dev2015.jsonl")
    assert testdev[0] == {
        "question_id": 90,
        "image": "COCO_test2015_000000000009.jpg",
        "text": "question 90?" + SUFFIX,
        "category": "default",
    }
    assert [q["question_id"] for q in jsonl(out / "llava_vqav2_mscoco_test2015.jsonl")] == [90, 91, 92]
    # Only test-dev's images are written: the full test list just pads the submission.
    assert [p.name for p in (out / "test2015").iterdir()] == ["COCO_test2015_000000000009.jpg"]
    assert jsonl(out / "llava_vqav2_mscoco_val2014.jsonl")[0]["image"] == "COCO_val2014_000000000009.jpg"
    ann = json.loads((out / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    assert ann[0]["question_id"] == 5 and ann[0]["answers"] == answer and ann[0]["answer_type"] == "yes/no"
    questions = json.loads((out / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    assert questions[1] == {"question_id": 6, "image_id": 9, "question": "question 6?"}
    assert run("vqav2", "--check", "--out", str(out), "--parts", "testdev,test,val") == 0


def test_scienceqa(tmp_path: Path) -> None:
    columns = {
        "image": [img(RED), None],
        "question": ["Which animal is a mammal?", "Which word is a noun?"],
        "choices": [["frog", "whale", "eagle"], ["run", "table"]],
        "answer": [1, 1],
        "hint": ["Look at the picture.", ""],
        "task": ["closed choice"] * 2,
        "grade": ["grade4", "grade8"],
        "subject": ["natural science", "language science"],
        "topic": ["biology", "grammar"],
        "category": ["Classification", "Parts of speech"],
        "skill": ["s1", "s2"],
        "lecture": ["l", "l"],
        "solution": ["s", "s"],
    }
    out = tmp_path / "scienceqa"
    assert run("sqa", "--out", str(out), "--from-disk", save(tmp_path, {"test": columns})) == 0
    convs = json.loads((out / "llava_test_CQM-A.json").read_text())
    assert convs[0]["id"] == "test_00000" and convs[0]["image"] == "test_00000/image.png"
    assert convs[0]["conversations"][0]["value"] == (
        "<image>\nContext: Look at the picture.\nWhich animal is a mammal?\nA. frog\nB. whale\nC. eagle"
    )
    assert convs[0]["conversations"][1] == {"from": "gpt", "value": "B"}
    assert "image" not in convs[1]
    assert convs[1]["conversations"][0]["value"] == "Context: N/A\nWhich word is a noun?\nA. run\nB. table"
    problems = json.loads((out / "problems.json").read_text())
    assert problems["test_00000"]["image"] == "image.png" and problems["test_00001"]["image"] is None
    assert problems["test_00001"]["subject"] == "language science" and problems["test_00001"]["answer"] == 1
    assert json.loads((out / "pid_splits.json").read_text()) == {"test": ["test_00000", "test_00001"]}
    assert (out / "images" / "test" / "test_00000" / "image.png").read_bytes() == RED
    assert not (out / "images" / "test" / "test_00001").exists()
    assert run("scienceqa", "--check", "--out", str(out)) == 0


def test_mmbench_tsv(tmp_path: Path) -> None:
    columns = {
        "index": [241, 1000241],
        "question": ["What is shown?", "What is shown?"],
        "hint": [None, "A hint"],
        "A": ["cat", "dog"],
        "B": ["dog", "cat"],
        "C": ["bird", "bird"],
        "D": [None, None],
        "answer": ["A", "B"],
        "category": ["image_scene"] * 2,
        "image": [img(BLUE), img(BLUE)],
        "source": ["src"] * 2,
        "L2-category": ["coarse_perception"] * 2,
        "comment": [None, None],
        "split": ["dev", "dev"],
    }
    features = {k: datasets.Value("string") for k in ("hint", "D", "comment")}
    out = tmp_path / "mmbench"
    assert run("mmbench", "--out", str(out), "--from-disk", save(tmp_path, {"dev": columns}, features)) == 0
    table = pd.read_csv(out / "mmbench_dev_20230712.tsv", sep="\t")
    assert list(table.columns) == [
        "index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
        "comment", "split",
    ]  # fmt: skip
    assert table["index"].tolist() == [241, 1000241]
    assert pd.isna(table.loc[0, "hint"]) and table.loc[1, "hint"] == "A hint"
    assert pd.isna(table.loc[0, "D"])
    assert base64.b64decode(table.loc[0, "image"]) == BLUE
    assert run("mmbench", "--check", "--out", str(out)) == 0


def test_mmvet(tmp_path: Path) -> None:
    columns = {
        "question_id": ["v1_0", "v1_1"],
        "image": [img(RED), img(BLUE)],
        "question": ["What is x?", "What is written?"],
        "answer": ["-1 <AND> -5", "hello <OR> hi"],
        "image_source": ["v1_0.png", ""],
        "capability": ["math,ocr", "ocr"],
    }
    out = tmp_path / "mm-vet"
    assert run("mmvet", "--out", str(out), "--from-disk", save(tmp_path, {"test": columns})) == 0
    assert jsonl(out / "llava-mm-vet.jsonl") == [
        {"question_id": 0, "image": "v1_0.png", "text": "What is x?", "category": "conv"},
        {"question_id": 1, "image": "v1_1.jpg", "text": "What is written?", "category": "conv"},
    ]
    truth = json.loads((out / "mm-vet.json").read_text())
    assert truth["v1_0"] == {
        "imagename": "v1_0.png",
        "capability": ["math", "ocr"],
        "question": "What is x?",
        "answer": "-1 <AND> -5",
    }
    assert (out / "images" / "v1_1.jpg").read_bytes() == BLUE
    assert run("mm-vet", "--check", "--out", str(out)) == 0


def test_llavabench(tmp_path: Path) -> None:
    columns = {
        "question_id": ["0", "1"],
        "question": ["What is the name of this dish?", "Describe the photo in detail."],
        "image": [img(BLUE), img(BLUE)],
        "caption": ["A bowl of ramen.", "A bowl of ramen."],
        "gpt_answer": ["Ramen.", "A bowl of ramen with egg."],
        "category": ["conv", "detail"],
        "image_id": ["001", "001"],
    }
    out = tmp_path / "llava-bench-in-the-wild"
    assert run("llavabench", "--out", str(out), "--from-disk", save(tmp_path, {"train": columns})) == 0
    assert jsonl(out / "questions.jsonl")[1] == {
        "question_id": 1,
        "image": "001.jpg",
        "text": "Describe the photo in detail.",
        "category": "detail",
    }
    assert jsonl(out / "context.jsonl") == [{"id": "001", "image": "001.jpg", "caption": "A bowl of ramen."}]
    reference = jsonl(out / "answers_gpt4.jsonl")
    assert [(r["question_id"], r["text"]) for r in reference] == [(0, "Ramen."), (1, "A bowl of ramen with egg.")]
    assert [p.name for p in (out / "images").iterdir()] == ["001.jpg"]
    assert run("llava-bench-in-the-wild", "--check", "--out", str(out)) == 0


# ----------------------------------------------------------------------------------------------------------------


def test_plain_dataset_on_disk_and_limit(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict(pope_columns()).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "plain"))
    out = tmp_path / "pope"
    assert run("pope", "--out", str(out), "--from-disk", str(tmp_path / "plain"), "--limit", "2") == 0
    assert len(jsonl(out / "llava_pope_test.jsonl")) == 2


def test_input_errors_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run("nosuchbench", "--out", str(tmp_path)) == 2
    assert "unknown benchmark 'nosuchbench'" in capsys.readouterr().err
    saved = save(tmp_path, {"test": pope_columns()})
    assert run("vqav2", "--out", str(tmp_path / "v"), "--from-disk", saved, "--parts", "testdev") == 2
    assert "no split 'testdev' (has ['test'])" in capsys.readouterr().err
    assert run("vqav2", "--out", str(tmp_path / "v"), "--parts", "bogus") == 2
    assert "has parts" in capsys.readouterr().err
    columns = pope_columns()
    columns["category"][0] = "weird"
    bad = tmp_path / "bad"
    bad.mkdir()
    assert run("pope", "--out", str(tmp_path / "p"), "--from-disk", save(bad, {"test": columns})) == 2
    assert "POPE row 0 (question_id 1): unknown category 'weird'" in capsys.readouterr().err


def test_parquet_files_as_the_hub_stores_them_load_with_from_disk(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict(pope_columns()).cast_column("image", datasets.Image())
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    ds.to_parquet(str(hub / "test-00000-of-00001.parquet"))
    out = tmp_path / "pope"
    assert run("pope", "--out", str(out), "--from-disk", str(tmp_path / "hub")) == 0
    assert len(jsonl(out / "llava_pope_test.jsonl")) == 4
    assert (out / "val2014" / "COCO_val2014_1.jpg").read_bytes() == BLUE
    # one parquet file is one split
    assert run("pope", "--out", str(tmp_path / "p2"), "--from-disk", str(hub / "test-00000-of-00001.parquet")) == 0


def test_from_disk_that_is_no_dataset_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    assert run("pope", "--out", str(tmp_path / "p"), "--from-disk", str(tmp_path / "notes")) == 2
    assert "neither a folder written by save_to_disk" in capsys.readouterr().err
    assert run("pope", "--out", str(tmp_path / "p"), "--from-disk", str(tmp_path / "nowhere")) == 2
    assert "nowhere: not found" in capsys.readouterr().err


def test_an_unreachable_hub_fails_fast_with_the_from_disk_recipe(tmp_path: Path, monkeypatch, capsys) -> None:
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    assert run("pope", "--out", str(tmp_path / "p"), "--hf-org", "nobody-here") == 2
    err = capsys.readouterr().err
    assert "is not reachable" in err and "--from-disk DIR" in err and "save_to_disk" in err
    # datasets reads only its cache instead of retrying the hub (~47 s per repository before)
    assert datasets.config.HF_HUB_OFFLINE is True and "OfflineModeIsEnabled" in err
