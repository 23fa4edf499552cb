"""The benchmark runners (llava.eval.*): chunking, resuming, batching, answer lines and bad input, on the tiny model."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest

from eval.common import INPUT_ERROR_STATUS
from llava.eval import model_vqa, model_vqa_loader, model_vqa_mmbench, model_vqa_science, runner
from llava.eval.runner import RunnerInputError, Sample, get_chunk, pending_samples, read_answered
from tests.helpers import random_image, read_jsonl, write_jsonl

BOTH_STAGES = ["--visual-pruning", "longtail", "--kv-pruning", "h2o"]
TOKEN_KEYS = {"visual_before", "visual_after", "inflection", "prompt", "generated", "kv_final"}
SUFFIX = "\nAnswer the question using a single word or phrase."


def comparable(rows: list[dict]) -> list[tuple]:
    """Everything but the random answer_id."""
    return [tuple(sorted((k, json.dumps(v)) for k, v in row.items() if k != "answer_id")) for row in rows]


@pytest.fixture
def short_qa(tmp_path: Path) -> tuple[Path, Path]:
    """Seven POPE/TextVQA-style questions over images of different sizes; prompts of different lengths."""
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(120, 90), (64, 160), (112, 112), (200, 50)]
    for i, size in enumerate(sizes):
        random_image(i, size).save(folder / f"img_{i}.png")
    questions = ["Is there a dog?", "What colour is the square in the middle of the picture?", "Count.", "Why?"]
    rows = [
        {"question_id": 100 + i, "image": f"img_{i % 4}.png", "text": questions[(i * 3) % 4] + SUFFIX} for i in range(7)
    ]
    return write_jsonl(tmp_path / "questions.jsonl", rows), folder


def loader_args(tiny_ckpt: Path, questions: Path, folder: Path, answers: Path, *extra: str) -> list[str]:
    return [
        "--model-path",
        str(tiny_ckpt),
        "--question-file",
        str(questions),
        "--image-folder",
        str(folder),
        "--answers-file",
        str(answers),
        "--temperature",
        "0",
        "--conv-mode",
        "vicuna_v1",
        "--max_new_tokens",
        "6",
        "--no-progress",
        *BOTH_STAGES,
        *extra,
    ]


# ---- the core, without a model ----------------------------------------------------------------------------------


def test_chunks_are_contiguous_ceil_slices_that_concatenate_to_the_whole() -> None:
    items = list(range(10))
    chunks = [get_chunk(items, 4, i) for i in range(4)]
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert sum(chunks, []) == items
    assert [get_chunk([1, 2], 4, i) for i in range(4)] == [[1], [2], [], []]
    assert get_chunk([], 3, 2) == []


def test_unfinished_last_line_is_cut_and_a_bad_middle_line_is_an_error(tmp_path: Path) -> None:
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 2, "te', encoding="utf-8")
    assert read_answered(answers) == Counter({("1", "", ""): 1})
    assert answers.read_text() == '{"question_id": 1, "text": "yes"}\n'

    answers.write_text('{"question_id": 1}\nnot json\n{"question_id": 3}\n', encoding="utf-8")
    with pytest.raises(RunnerInputError, match=r"a\.jsonl:2: not valid JSON"):
        read_answered(answers)


def test_a_line_separator_inside_an_answer_is_text_not_a_line_break(tmp_path: Path) -> None:
    """Answers are written with ensure_ascii=False, so U+2028 / U+2029 stay raw inside a JSON string; every reader
    (resume, retry of failed answers, question files, scorers) splits lines at "\\n" only."""
    from eval.common import read_jsonl

    rows = [
        {"question_id": 1, "text": "first\u2028second"},
        {"question_id": 2, "text": "", "error": "image missing"},
        {"question_id": 3, "text": "a\u2029b\x85c"},
    ]
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_answered(answers) == Counter({("1", "", ""): 1, ("3", "", ""): 1})
    assert read_jsonl(answers) == rows
    assert runner.drop_failed_answers(answers) == 1
    assert read_jsonl(answers) == [rows[0], rows[2]]
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 7, "image": "x.png", "text": "Is it\u2028red?"}])
    questions.write_text(questions.read_text().replace("\\u2028", "\u2028"), encoding="utf-8")
    assert [s.text for s in model_vqa_loader.read_question_lines(questions, tmp_path)] == ["Is it\u2028red?"]


def test_repeated_ids_resume_in_order_and_foreign_answers_are_refused(tmp_path: Path) -> None:
    # MME asks two questions per image under one question_id; MMBench rounds share an id.
    samples = [
        Sample("count/1.png", "q1", "f"),
        Sample("count/1.png", "q2", "f"),
        Sample(7, "r0", "f", fields={"round_id": 0}),
        Sample(7, "r1", "f", fields={"round_id": 1}),
    ]
    done = Counter({("count/1.png", "", ""): 1, ("7", "1", ""): 1})
    assert [s.text for s in pending_samples(samples, done, tmp_path / "a")] == ["q2", "r0"]
    with pytest.raises(RunnerInputError, match=r"not in this chunk.*'8'"):
        pending_samples(samples, Counter({("8", "", ""): 1}), tmp_path / "a")


def test_plain_checkpoints_switch_to_the_mmtag_template_in_loader_and_mmbench_only() -> None:
    args = argparse.Namespace(conv_mode="v1")
    assert runner.resolve_conv_mode(args, model_vqa_loader.FORMAT, "llava-v1.5-7b-plain", None) == "v1_mmtag"
    assert runner.resolve_conv_mode(args, model_vqa_mmbench.FORMAT, "llava-plain", None) == "v1_mmtag"
    assert runner.resolve_conv_mode(args, model_vqa.FORMAT, "llava-plain", None) == "v1"
    assert runner.resolve_conv_mode(args, model_vqa_loader.FORMAT, "llava-plain-finetune", None) == "v1"


# ---- answer files from the tiny model ---------------------------------------------------------------------------


def test_answer_lines_carry_upstream_fields_and_token_stats(tiny_ckpt: Path, short_qa, tmp_path: Path) -> None:
    questions, folder = short_qa
    answers = tmp_path / "answers.jsonl"
    assert model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, answers, "--batch-size", "3")) == 7
    rows = read_jsonl(answers)
    asked = read_jsonl(questions)
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in asked]
    for row, question in zip(rows, asked):
        assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata", "tokens"} <= set(row)
        assert row["prompt"] == question["text"]
        assert row["model_id"] == "llava-v1.5-tiny" and row["metadata"] == {}
        assert isinstance(row["answer_id"], str) and len(row["answer_id"]) == 22
        assert set(row["tokens"]) >= TOKEN_KEYS
        assert 1 <= row["tokens"]["generated"] <= 6
        assert row["tokens"]["visual_after"] <= row["tokens"]["visual_before"] == 64
    assert len({r["answer_id"] for r in rows}) == 7


def test_batch_size_4_gives_the_answers_of_batch_size_1(tiny_ckpt: Path, short_qa, tmp_path: Path) -> None:
    questions, folder = short_qa
    one, four = tmp_path / "bs1.jsonl", tmp_path / "bs4.jsonl"
    model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, one, "--batch-size", "1"))
    model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, four, "--batch-size", "4"))
    assert comparable(read_jsonl(one)) == comparable(read_jsonl(four))


def test_two_chunks_merged_equal_one_run(tiny_ckpt: Path, short_qa, tmp_path: Path) -> None:
    questions, folder = short_qa
    whole = tmp_path / "whole.jsonl"
    model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, whole, "--batch-size", "2"))
    merged = []
    for idx in range(2):
        part = tmp_path / f"2_{idx}.jsonl"
        chunk = ["--num-chunks", "2", "--chunk-idx", str(idx), "--batch-size", "2"]
        model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, part, *chunk))
        merged += read_jsonl(part)
    assert [len(read_jsonl(tmp_path / f"2_{i}.jsonl")) for i in range(2)] == [4, 3]
    assert comparable(merged) == comparable(read_jsonl(whole))


def test_killed_run_restarts_and_answers_every_question_once(
    tiny_ckpt: Path, short_qa, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    questions, folder = short_qa
    reference = tmp_path / "reference.jsonl"
    model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, reference, "--batch-size", "2"))

    answers = tmp_path / "answers.jsonl"
    real = runner.model_generate_fn
    calls = {"n": 0}

    def dies_on_third_batch(*args, **kwargs):
        generate = real(*args, **kwargs)

        def wrapped(batch, images):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # the process is killed while the third batch generates
            return generate(batch, images)

        return wrapped

    monkeypatch.setattr(runner, "model_generate_fn", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, answers, "--batch-size", "2"))
    assert len(read_jsonl(answers)) == 4  # two batches were flushed before the kill
    with answers.open("a", encoding="utf-8") as handle:  # ... and a kill in the middle of a write leaves half a line
        handle.write('{"question_id": 104, "prompt": "Is th')
    monkeypatch.setattr(runner, "model_generate_fn", real)

    assert model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, answers, "--batch-size", "2")) == 3
    rows = read_jsonl(answers)
    assert [r["question_id"] for r in rows] == list(range(100, 107))
    assert comparable(rows) == comparable(read_jsonl(reference))
    # a third start has nothing left to do and does not touch the file
    assert model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, answers)) == 0
    assert len(read_jsonl(answers)) == 7


def test_overwrite_starts_afresh(tiny_ckpt: Path, short_qa, tmp_path: Path) -> None:
    questions, folder = short_qa
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 100, "text": "stale"}])
    model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, answers, "--overwrite", "--batch-size", "7"))
    rows = read_jsonl(answers)
    assert len(rows) == 7 and all("tokens" in row for row in rows)  # the stale line (no tokens) is gone


def test_missing_image_stops_naming_id_and_path_before_loading(tiny_ckpt, short_qa, tmp_path, monkeypatch) -> None:
    questions, folder = short_qa
    (folder / "img_2.png").unlink()
    monkeypatch.setattr(runner, "model_generate_fn", lambda *a, **k: pytest.fail("must stop before generating"))
    with pytest.raises(SystemExit) as stop:
        model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, tmp_path / "a.jsonl"))
    message = str(stop.value)
    assert stop.value.code == INPUT_ERROR_STATUS
    assert "question_id 102" in message and str(folder / "img_2.png") in message and "--skip-errors" in message
    # one missing file asked about twice is listed once, and counted as one file
    assert message.count("img_2.png") == 1 and "1 image file(s) not found, asked about by 2 question(s)" in message


def test_skip_errors_records_the_failure_and_the_scorer_counts_it_wrong(tiny_ckpt, short_qa, tmp_path) -> None:
    from eval import pope

    questions, folder = short_qa
    (folder / "img_1.png").write_bytes(b"not a png")  # corrupt, found only when read
    answers = tmp_path / "answers.jsonl"
    with pytest.raises(SystemExit, match=r"question_id 101 .*img_1\.png"):
        model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, answers, "--batch-size", "4"))
    model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, answers, "--batch-size", "4", "--skip-errors"))
    rows = read_jsonl(answers)
    failed = [r for r in rows if "error" in r]
    assert [r["question_id"] for r in failed] == [101, 105]
    assert all(r["text"] == "" and "img_1.png" in r["error"] and r["tokens"] == {} for r in failed)
    assert all("error" not in r and r["tokens"] for r in rows if r["question_id"] not in (101, 105))

    # POPE-score it: the failed questions are wrong whatever their label
    lines = read_jsonl(questions)
    pope_questions = write_jsonl(tmp_path / "pope.jsonl", [{**q, "category": "random"} for q in lines])
    labels = [{"question_id": q["question_id"], "image": q["image"], "label": "yes"} for q in lines]
    write_jsonl(tmp_path / "coco" / "coco_pope_random.json", labels)
    result = pope.main(
        ["--annotation-dir", str(tmp_path / "coco"), "--question-file", str(pope_questions)]
        + ["--result-file", str(answers)]
    )
    assert result["metrics"]["random"]["unanswered"] == 2
    assert result["metrics"]["random"]["fn"] >= 2


def test_bad_flags_are_named(tiny_ckpt: Path, short_qa, tmp_path: Path) -> None:
    questions, folder = short_qa
    answers = tmp_path / "a.jsonl"
    with pytest.raises(SystemExit, match="--chunk-idx must be in"):
        model_vqa_loader.main(
            loader_args(tiny_ckpt, questions, folder, answers, "--num-chunks", "2", "--chunk-idx", "2")
        )
    with pytest.raises(SystemExit, match="--batch-size must be >= 1"):
        model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, answers, "--batch-size", "0"))
    with pytest.raises(SystemExit, match="--question-file not found"):
        model_vqa_loader.main(loader_args(tiny_ckpt, tmp_path / "nope.jsonl", folder, answers))


# ---- format specifics -------------------------------------------------------------------------------------------


def science_problems(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "images" / "test"
    for pid in ("10", "12"):
        (folder / pid).mkdir(parents=True)
        random_image(int(pid)).save(folder / pid / "image.png")
    value = "<image>\nContext: A picture.\nWhich shape is red?\nA. circle\nB. square"
    problems = [
        {"id": "10", "image": "10/image.png", "conversations": [{"from": "human", "value": value}]},
        {"id": "11", "conversations": [{"from": "human", "value": "Context: N/A\nWhich is a verb?\nA. run\nB. cat"}]},
        {"id": "12", "image": "12/image.png", "conversations": [{"from": "human", "value": value}]},
    ]
    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps(problems), encoding="utf-8")
    return path, folder


def test_science_moves_image_to_front_and_runs_text_only_problems_without_one(tiny_ckpt, tmp_path) -> None:
    questions, folder = science_problems(tmp_path)
    answers = tmp_path / "answers.jsonl"
    argv = loader_args(tiny_ckpt, questions, folder, answers, "--single-pred-prompt", "--batch-size", "3")
    model_vqa_science.main(argv)
    rows = {r["question_id"]: r for r in read_jsonl(answers)}
    instruction = "\nAnswer with the option's letter from the given choices directly."
    assert (
        rows["10"]["prompt"] == "<image>\nContext: A picture.\nWhich shape is red?\nA. circle\nB. square" + instruction
    )
    assert rows["11"]["prompt"] == "Context: N/A\nWhich is a verb?\nA. run\nB. cat" + instruction
    assert rows["11"]["tokens"]["visual_before"] == 0 and rows["10"]["tokens"]["visual_before"] == 64
    args = argparse.Namespace(question_file=questions, image_folder=folder, single_pred_prompt=True)
    samples = model_vqa_science.read(args)
    assert [s.image is None for s in samples] == [False, True, False]
    assert samples[0].text == "Context: A picture.\nWhich shape is red?\nA. circle\nB. square" + instruction


def png_base64(seed: int) -> str:
    buffer = io.BytesIO()
    random_image(seed, (80, 60)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, rows: list[dict]) -> Path:
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category"]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(column, "") for column in header])
    return path


def test_mmbench_rounds_rotate_options_and_a_corrupt_row_names_id_and_file(tiny_ckpt, tmp_path) -> None:
    tsv = write_tsv(
        tmp_path / "mmbench_dev.tsv",
        [
            {
                "index": 5,
                "question": "What is it?",
                "hint": "A photo.",
                "A": "cat",
                "B": "dog",
                "C": "cow",
                "D": "nan",
                "answer": "B",
                "image": png_base64(1),
            },
            {
                "index": 6,
                "question": "Colour?",
                "hint": "nan",
                "A": "red",
                "B": "blue",
                "answer": "A",
                "image": "5",
            },  # compact TSVs point to the image of another row
            {"index": 7, "question": "Broken?", "hint": "", "A": "yes", "B": "no", "answer": "A", "image": "!!!"},
        ],
    )
    answers = tmp_path / "answers.jsonl"
    argv = ["--model-path", str(tiny_ckpt), "--question-file", str(tsv), "--answers-file", str(answers)]
    argv += ["--single-pred-prompt", "--all-rounds", "--temperature", "0", "--max_new_tokens", "4", "--no-progress"]
    argv += ["--conv-mode", "vicuna_v1", "--batch-size", "4", *BOTH_STAGES]
    with pytest.raises(SystemExit) as stop:
        model_vqa_mmbench.main(argv)
    assert "question_id 7" in str(stop.value) and str(tsv) in str(stop.value)
    assert len(read_jsonl(answers)) == 4  # the first batch was written before the bad row came up

    model_vqa_mmbench.main([*argv, "--skip-errors"])
    rows = read_jsonl(answers)
    assert [(r["question_id"], r["round_id"]) for r in rows] == [(5, 0), (5, 1), (5, 2), (6, 0), (6, 1), (7, 0), (7, 1)]
    assert rows[0]["prompt"] == "A photo.\nWhat is it?\nA. cat\nB. dog\nC. cow"
    assert rows[1]["prompt"] == "A photo.\nWhat is it?\nA. dog\nB. cow\nC. cat"
    assert rows[1]["options"] == ["dog", "cow", "cat"] and rows[1]["option_char"] == ["B", "C", "A"]
    assert rows[4]["prompt"] == "Colour?\nA. blue\nB. red" and rows[3]["tokens"]["visual_before"] == 64
    assert rows[5]["text"] == "" and "base64" in rows[5]["error"] and "question_id 7" in rows[5]["error"]


def test_mmbench_chinese_instruction(tmp_path: Path) -> None:
    tsv = write_tsv(
        tmp_path / "cn.tsv", [{"index": 1, "question": "这是什么?", "A": "猫", "B": "狗", "image": png_base64(2)}]
    )
    args = argparse.Namespace(question_file=tsv, lang="cn", single_pred_prompt=True, all_rounds=False)
    (sample,) = model_vqa_mmbench.read(args)
    assert sample.text == "这是什么?\nA. 猫\nB. 狗\n请直接回答选项字母。"
    assert sample.fields == {
        "round_id": 0,
        "prompt": "这是什么?\nA. 猫\nB. 狗",
        "options": ["猫", "狗"],
        "option_char": ["A", "B"],
    }
