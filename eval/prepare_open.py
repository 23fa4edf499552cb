"""Data preparation of the open-ended benchmarks run by ``model_vqa`` and graded by a GPT judge: MM-Vet and
LLaVA-Bench-in-the-Wild.

Questions are sent bare (no suffix), as upstream.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.common import EvalInputError
from eval.prepare_io import (
    ImageRefs,
    ImageWriter,
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

if TYPE_CHECKING:
    from eval.benchmarks import Benchmark

# ---------------------------------------------------------------------------------------------------------------
# MM-Vet

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


def build_mmvet(bench: Benchmark, data: dict[str, Any], out: Path) -> list[str]:
    images = ImageWriter(out / bench.image_folder)
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
        write_jsonl(out / bench.question_file, questions),
        write_json(out / bench.files["truth"], truth, indent=2),
        images.summary(),
    ]


def check_mmvet(bench: Benchmark, parts: tuple[str, ...]) -> tuple[list[Requirement], list[ImageRefs]]:
    truth = "ground truth, needed only for `python -m eval.mmvet --grade`"
    required = [Requirement(bench.question_file), Requirement(f"{bench.image_folder}/")]
    required.append(Requirement(bench.files["truth"], truth, optional=True))
    return required, [ImageRefs(bench.question_file, bench.image_folder, jsonl_field("image"))]


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-Bench-in-the-Wild


def llavabench_image_name(image_id: Any, data: bytes, where: str) -> str:
    """Upstream's names are ``001.jpg`` ...; an id without a suffix gets the one its bytes call for."""
    name = str(image_id)
    return name if has_image_suffix(name) else name + image_suffix(data, where)


def build_llavabench(bench: Benchmark, data: dict[str, Any], out: Path) -> list[str]:
    images = ImageWriter(out / bench.image_folder)
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
        write_jsonl(out / bench.question_file, questions),
        write_jsonl(out / bench.files["context"], contexts.values()),
        write_jsonl(out / bench.files["references"], answers),
        images.summary(),
    ]


def check_llavabench(bench: Benchmark, parts: tuple[str, ...]) -> tuple[list[Requirement], list[ImageRefs]]:
    files = (bench.question_file, bench.files["context"], bench.files["references"])
    required = [*(Requirement(f) for f in files), Requirement(f"{bench.image_folder}/")]
    return required, [ImageRefs(bench.question_file, bench.image_folder, jsonl_field("image"))]
