"""Open-ended benchmarks run by ``model_vqa`` and graded by a GPT judge: MM-Vet and LLaVA-Bench-in-the-Wild.

Questions are sent bare (no suffix), as upstream.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from eval.common import EvalInputError
from eval.prepare_io import (
    Bench,
    ImageRefs,
    ImageWriter,
    Part,
    Requirement,
    has_image_suffix,
    image_bytes,
    image_suffix,
    int_if_numeric,
    jsonl_field,
    rows,
    write_json,
    write_jsonl,
)

# ---------------------------------------------------------------------------------------------------------------
# MM-Vet

MMVET_QUESTIONS = "llava-mm-vet.jsonl"
MMVET_TRUTH = "mm-vet.json"
_V1 = re.compile(r"^v1_(\d+)$")


def mmvet_number(value: Any, row_index: int) -> int:
    """LLaVA numbers MM-Vet questions 0..217 where MM-Vet says v1_0..v1_217."""
    text = str(value)
    match = _V1.match(text)
    if match:
        return int(match.group(1))
    if text.isdigit():
        return int(text)
    raise EvalInputError(f"MM-Vet row {row_index}: question_id {value!r} is neither 'v1_<n>' nor a number")


def capability_list(value: Any, where: str) -> list[str]:
    caps = [c.strip() for c in value.split(",")] if isinstance(value, str) else list(value or [])
    caps = [c for c in caps if c]
    if not caps:
        raise EvalInputError(f"{where}: empty capability")
    return caps


def build_mmvet(data: dict[str, Any], out: Path) -> list[str]:
    images = ImageWriter(out / "images")
    questions, truth = [], {}
    for i, row in enumerate(rows(data["test"])):
        number = mmvet_number(row["question_id"], i)
        where = f"MM-Vet row {i} (question_id {row['question_id']})"
        source = str(row.get("image_source") or "")
        name = (
            source
            if has_image_suffix(source)
            else f"v1_{number}{image_suffix(image_bytes(row['image'], where), where)}"
        )
        images.write(name, row["image"], where)
        questions.append({"question_id": number, "image": name, "text": row["question"], "category": "conv"})
        truth[f"v1_{number}"] = {
            "imagename": name,
            "capability": capability_list(row.get("capability"), where),
            "question": row["question"],
            "answer": row["answer"],
        }
    if len(truth) != len(questions):
        raise EvalInputError("MM-Vet: question ids are not unique")
    return [
        write_jsonl(out / MMVET_QUESTIONS, questions),
        write_json(out / MMVET_TRUTH, truth, indent=2),
        images.summary(),
    ]


MMVET = Bench(
    name="mm-vet",
    aliases=("mmvet",),
    parts={"test": Part("MMVet", None, "test")},
    default_parts=("test",),
    build=build_mmvet,
    required=lambda parts: [
        Requirement(MMVET_QUESTIONS),
        Requirement("images/"),
        Requirement(MMVET_TRUTH, "ground truth, needed only for `python -m eval.mmvet --grade`", optional=True),
    ],
    images=lambda parts: [ImageRefs(MMVET_QUESTIONS, "images", jsonl_field("image"))],
)

# ---------------------------------------------------------------------------------------------------------------
# LLaVA-Bench-in-the-Wild

LLAVABENCH_FILES = ("questions.jsonl", "context.jsonl", "answers_gpt4.jsonl")


def llavabench_image_name(image_id: Any, data: bytes, where: str) -> str:
    """Upstream's names are ``001.jpg`` ...; an id without a suffix gets the one its bytes call for."""
    name = str(image_id)
    return name if has_image_suffix(name) else name + image_suffix(data, where)


def build_llavabench(data: dict[str, Any], out: Path) -> list[str]:
    images = ImageWriter(out / "images")
    questions, answers, contexts = [], [], {}
    for i, row in enumerate(rows(data["train"])):
        where = f"LLaVA-Bench row {i} (question_id {row.get('question_id')})"
        name = llavabench_image_name(row["image_id"], image_bytes(row["image"], where), where)
        images.write(name, row["image"], where)
        qid = int_if_numeric(row["question_id"])
        questions.append({"question_id": qid, "image": name, "text": row["question"], "category": row["category"]})
        answers.append(
            {
                "question_id": qid,
                "prompt": row["question"],
                "text": row["gpt_answer"],
                "answer_id": f"gpt4-{qid}",
                "model_id": "gpt-4 (reference answers of the Hugging Face copy)",
                "metadata": {},
            }
        )
        caption = row["caption"]
        if name in contexts and contexts[name]["caption"] != caption:
            raise EvalInputError(f"{where}: image {name} has two different captions")
        contexts[name] = {"id": Path(name).stem, "image": name, "caption": caption}
    return [
        write_jsonl(out / "questions.jsonl", questions),
        write_jsonl(out / "context.jsonl", contexts.values()),
        write_jsonl(out / "answers_gpt4.jsonl", answers),
        images.summary(),
    ]


LLAVABENCH = Bench(
    name="llava-bench-in-the-wild",
    aliases=("llavabench", "llava-bench", "llava_bench"),
    parts={"train": Part("llava-bench-in-the-wild", None, "train")},
    default_parts=("train",),
    build=build_llavabench,
    required=lambda parts: [*(Requirement(f) for f in LLAVABENCH_FILES), Requirement("images/")],
    images=lambda parts: [ImageRefs("questions.jsonl", "images", jsonl_field("image"))],
)

BENCHES = [MMVET, LLAVABENCH]
