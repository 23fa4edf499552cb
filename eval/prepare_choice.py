"""Data preparation of the multiple-choice benchmarks: ScienceQA (``model_vqa_science``) and MMBench
(``model_vqa_mmbench``).

The single-prediction instruction ("Answer with the option's letter ...") is not written into these files: the
runners add it with ``--single-pred-prompt``, as upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.common import EvalInputError
from eval.prepare_io import (
    ImageRefs,
    ImageWriter,
    Requirement,
    b64,
    image_bytes,
    read_json_images,
    rows,
    write_json,
)

if TYPE_CHECKING:
    from eval.benchmarks import Benchmark

# ---------------------------------------------------------------------------------------------------------------
# ScienceQA

SQA_SPLIT_NAMES = {"test": "test", "val": "val"}  # part -> ScienceQA's own split name (pid_splits.json key)
# Per split (the runner reads the test split's: the spec's question file and image folder).
SQA_QUESTIONS, SQA_IMAGES = "llava_{split}_CQM-A.json", "images/{split}"
_SQA_FIELDS = ("task", "grade", "subject", "topic", "category", "skill", "lecture", "solution")


def sqa_prompt(question: str, hint: str, choices: list[str], has_image: bool) -> str:
    """LLaVA's CQM format: context (N/A when empty, as ScienceQA's own prompt builder), question, lettered options."""
    options = "\n".join(f"{chr(ord('A') + j)}. {choice}" for j, choice in enumerate(choices))
    text = f"Context: {hint.strip() or 'N/A'}\n{question}\n{options}".replace("  ", " ").strip()
    return f"<image>\n{text}" if has_image else text


def build_scienceqa(bench: Benchmark, data: dict[str, Any], out: Path) -> list[str]:
    """The Hugging Face copy has no problem ids, so they are made up (``<split>_<row:05d>``) and written
    consistently into problems.json, pid_splits.json, the question file and the image folders."""
    problems: dict[str, dict[str, Any]] = {}
    splits: dict[str, list[str]] = {}
    written = []
    for part, ds in data.items():
        split = SQA_SPLIT_NAMES[part]
        images = ImageWriter(out / SQA_IMAGES.format(split=split))
        convs = []
        for i, row in enumerate(rows(ds)):
            pid = f"{split}_{i:05d}"
            where = f"ScienceQA {split} row {i} (pid {pid})"
            choices = list(row["choices"])
            answer = int(row["answer"])
            if not 2 <= len(choices) <= 26 or not 0 <= answer < len(choices):
                raise EvalInputError(f"{where}: answer {answer} is not an index into {len(choices)} choices")
            has_image = row.get("image") is not None
            if has_image:
                images.write(f"{pid}/image.png", row["image"], where)
            problems[pid] = {
                "question": row["question"],
                "choices": choices,
                "answer": answer,
                "hint": row.get("hint") or "",
                "image": "image.png" if has_image else None,
                **{k: row[k] for k in _SQA_FIELDS if k in row},
                "split": split,
            }
            splits.setdefault(split, []).append(pid)
            conv: dict[str, Any] = {"id": pid}
            if has_image:
                conv["image"] = f"{pid}/image.png"
            conv["conversations"] = [
                {"from": "human", "value": sqa_prompt(row["question"], row.get("hint") or "", choices, has_image)},
                {"from": "gpt", "value": chr(ord("A") + answer)},
            ]
            convs.append(conv)
        written += [write_json(out / SQA_QUESTIONS.format(split=split), convs, indent=2), images.summary()]
    written += [write_json(out / "problems.json", problems), write_json(out / "pid_splits.json", splits)]
    return written


def check_scienceqa(bench: Benchmark, parts: tuple[str, ...]) -> tuple[list[Requirement], list[ImageRefs]]:
    splits = [SQA_SPLIT_NAMES[p] for p in parts]
    required = [
        *(Requirement(SQA_QUESTIONS.format(split=split)) for split in splits),
        Requirement("problems.json"),
        Requirement("pid_splits.json"),
        *(Requirement(SQA_IMAGES.format(split=split) + "/") for split in splits),
    ]
    refs = [ImageRefs(SQA_QUESTIONS.format(split=s), SQA_IMAGES.format(split=s), read_json_images) for s in splits]
    return required, refs


# ---------------------------------------------------------------------------------------------------------------
# MMBench

MMBENCH_COLUMNS = (
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "E",
    "answer",
    "category",
    "image",
    "source",
    "l2-category",
    "comment",
    "split",
)


def mmbench_builder(lang: str):  # noqa: ANN201 (a builder closure)
    def build(bench: Benchmark, data: dict[str, Any], out: Path) -> list[str]:
        """One TSV per split in the official layout: base64 image bytes, lower-case ``l2-category``
        (upstream's submission converter drops that exact column name), missing options left empty."""
        import pandas as pd

        written = []
        for part, ds in data.items():
            records = []
            for i, row in enumerate(rows(ds)):
                row = {("l2-category" if k == "L2-category" else k): v for k, v in row.items()}
                where = f"MMBench {lang} {part} row {i} (index {row.get('index')})"
                row["image"] = b64(image_bytes(row["image"], where))
                records.append({c: row[c] for c in MMBENCH_COLUMNS if c in row})
            if not records:
                raise EvalInputError(f"MMBench {lang} {part}: the split is empty")
            path = out / bench.files[part]
            path.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame.from_records(records).to_csv(path, sep="\t", index=False)
            written.append(f"{path} ({len(records)} rows)")
        return written

    return build


def check_mmbench(bench: Benchmark, parts: tuple[str, ...]) -> tuple[list[Requirement], list[ImageRefs]]:
    return [Requirement(bench.files[p], "images are base64 inside") for p in parts], []
