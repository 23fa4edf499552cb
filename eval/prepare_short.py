"""Data preparation of the short-answer benchmarks run by ``model_vqa_loader``: TextVQA, MME, VQAv2, POPE.

Each question line is upstream's ``{"question_id", "image", "text", "category"}`` with the question followed by
"\\nAnswer the question using a single word or phrase." (the suffix lives in the question file, as in eval.zip).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval.common import EvalInputError
from eval.prepare_io import (
    SHORT_ANSWER,
    ImageRefs,
    ImageWriter,
    Requirement,
    int_if_numeric,
    jsonl_field,
    rows,
    write_json,
    write_jsonl,
    write_text,
)

if TYPE_CHECKING:
    from eval.benchmarks import Benchmark

# ---------------------------------------------------------------------------------------------------------------
# TextVQA

_TEXTVQA_FIELDS = (
    "question_id",
    "image_id",
    "question",
    "question_tokens",
    "answers",
    "image_classes",
    "image_width",
    "image_height",
    "flickr_original_url",
    "flickr_300k_url",
    "set_name",
    "ocr_tokens",
)


def textvqa_prompt(question: str, ocr_tokens: list[str]) -> str:
    return f"{question}\nReference OCR token: {', '.join(ocr_tokens)}{SHORT_ANSWER}"


def build_textvqa(bench: Benchmark, data: dict[str, Any], out: Path) -> list[str]:
    """Question ids are TextVQA's own numeric ids (unique), not upstream's image ids (shared by several
    questions); the annotation file carries both, so the scorer matches by id."""
    images = ImageWriter(out / bench.image_folder)
    questions, annotations = [], []
    for i, row in enumerate(rows(data["val"])):
        where = f"textvqa row {i} (question_id {row.get('question_id')})"
        name = f"{row['image_id']}.jpg"
        images.write(name, row["image"], where)
        questions.append(
            {
                "question_id": row["question_id"],
                "image": name,
                "text": textvqa_prompt(row["question"], list(row.get("ocr_tokens") or [])),
                "category": "default",
            }
        )
        answers = list(row.get("answers") or [])
        if len(answers) != 10:
            raise EvalInputError(f"{where}: expected 10 human answers, found {len(answers)}")
        annotations.append({k: row[k] for k in _TEXTVQA_FIELDS if k in row})
    ann = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": annotations}
    return [
        write_jsonl(out / bench.question_file, questions),
        write_json(out / bench.files["annotations"], ann),
        images.summary(),
    ]


def check_textvqa(bench: Benchmark, parts: tuple[str, ...]) -> tuple[list[Requirement], list[ImageRefs]]:
    required = [Requirement(bench.question_file), Requirement(bench.files["annotations"])]
    required.append(Requirement(f"{bench.image_folder}/"))
    return required, [ImageRefs(bench.question_file, bench.image_folder, jsonl_field("image"))]


# ---------------------------------------------------------------------------------------------------------------
# MME

# In the official release these categories keep images in images/ and answers in questions_answers_YN/;
# the others hold <image> and <image stem>.txt side by side.
MME_NESTED = frozenset({"artwork", "celebrity", "landmark", "posters", "scene"})
_YES_NO = re.compile(r"\s*Please answer yes or no\.\s*$")


def mme_paths(question_id: str, category: str) -> tuple[str, str]:
    """(image path, ground-truth .txt path) relative to MME_Benchmark_release_version."""
    folder, _, file = question_id.rpartition("/")
    folder = folder.split("/")[0] if folder else category
    stem = Path(file).stem
    if folder in MME_NESTED:
        return f"{folder}/images/{file}", f"{folder}/questions_answers_YN/{stem}.txt"
    return f"{folder}/{file}", f"{folder}/{stem}.txt"


def build_mme(bench: Benchmark, data: dict[str, Any], out: Path) -> list[str]:
    """``question_id`` stays upstream's ``<category>/<file>``, shared by the two questions of an image. The image
    folder (MME_Benchmark_release_version) holds the ground truth too."""
    root = out / bench.image_folder
    images = ImageWriter(root)
    truth: dict[str, list[str]] = defaultdict(list)
    questions = []
    for i, row in enumerate(rows(data["test"])):
        where = f"MME row {i} (question_id {row.get('question_id')})"
        image, txt = mme_paths(row["question_id"], row["category"])
        images.write(image, row["image"], where)
        if "\t" in row["question"] or "\n" in row["question"]:
            raise EvalInputError(f"{where}: question contains a tab or newline, which MME's .txt format cannot hold")
        truth[txt].append(f"{row['question']}\t{row['answer']}")
        text = _YES_NO.sub("", row["question"]) + SHORT_ANSWER
        questions.append({"question_id": row["question_id"], "image": image, "text": text, "category": row["category"]})
    for txt, lines in truth.items():
        write_text(root / txt, "\n".join(lines) + "\n")
    return [write_jsonl(out / bench.question_file, questions), f"{root}: {len(truth)} answer files", images.summary()]


def mme_truth_files(path: Path) -> list[str]:
    """Ground-truth .txt of every image in llava_mme.jsonl (for --check)."""
    out = []
    for image in jsonl_field("image")(path):
        folder, _, file = image.partition("/")
        stem = Path(file).stem
        nested = file.startswith("images/")
        out.append(f"{folder}/questions_answers_YN/{stem}.txt" if nested else f"{folder}/{stem}.txt")
    return out


def check_mme(bench: Benchmark, parts: tuple[str, ...]) -> tuple[list[Requirement], list[ImageRefs]]:
    questions, root = bench.question_file, bench.image_folder
    refs = [ImageRefs(questions, root, jsonl_field("image")), ImageRefs(questions, root, mme_truth_files)]
    return [Requirement(questions), Requirement(f"{root}/")], refs


# ---------------------------------------------------------------------------------------------------------------
# VQAv2

VQAV2_IMAGES = {  # part -> (image folder, file name pattern); the question files are the spec's files[part]
    "testdev": ("test2015", "COCO_test2015_{:012d}.jpg"),
    "test": ("test2015", "COCO_test2015_{:012d}.jpg"),
    "val": ("val2014", "COCO_val2014_{:012d}.jpg"),
}


def build_vqav2(bench: Benchmark, data: dict[str, Any], out: Path) -> list[str]:
    """test-dev is what runs; the full test list only pads the EvalAI submission, so its images are not written
    (they are a superset of test-dev's, about 81k files). ``val`` adds official-format annotations for local
    accuracy."""
    written = []
    for part, ds in data.items():
        qfile, (folder, pattern) = bench.files[part], VQAV2_IMAGES[part]
        images = None if part == "test" else ImageWriter(out / folder)
        questions, val_questions, val_annotations = [], [], []
        for i, row in enumerate(rows(ds, drop_images=images is None)):
            name = pattern.format(int(row["image_id"]))
            if images is not None:
                images.write(name, row["image"], f"VQAv2 {part} row {i} (question_id {row.get('question_id')})")
            qid = int(row["question_id"])
            questions.append(
                {"question_id": qid, "image": name, "text": row["question"] + SHORT_ANSWER, "category": "default"}
            )
            if part == "val":
                val_questions.append(
                    {"question_id": qid, "image_id": int(row["image_id"]), "question": row["question"]}
                )
                val_annotations.append(
                    {
                        "question_id": qid,
                        "image_id": int(row["image_id"]),
                        "question_type": row.get("question_type"),
                        "answer_type": row.get("answer_type"),
                        "multiple_choice_answer": row.get("multiple_choice_answer"),
                        "answers": list(row.get("answers") or []),
                    }
                )
        written.append(write_jsonl(out / qfile, questions))
        if images is not None:
            written.append(images.summary())
        if part == "val":
            written.append(write_json(out / bench.files["val_questions"], {"questions": val_questions}))
            written.append(write_json(out / bench.files["val_annotations"], {"annotations": val_annotations}))
    return written


def check_vqav2(bench: Benchmark, parts: tuple[str, ...]) -> tuple[list[Requirement], list[ImageRefs]]:
    reqs = []
    for part in parts:
        qfile, folder = bench.files[part], VQAV2_IMAGES[part][0]
        reqs.append(Requirement(qfile, "the full test list pads the EvalAI submission" if part == "test" else ""))
        if part != "test":
            reqs.append(Requirement(f"{folder}/"))
        if part == "val":
            reqs += [Requirement(bench.files["val_questions"]), Requirement(bench.files["val_annotations"])]
    refs = [ImageRefs(bench.files[p], VQAV2_IMAGES[p][0], jsonl_field("image")) for p in parts if p != "test"]
    return reqs, refs


# ---------------------------------------------------------------------------------------------------------------
# POPE

POPE_CATEGORIES = ("adversarial", "popular", "random")


def pope_ids(raw: list[Any]) -> list[Any]:
    """The dataset's ids when they are unique integers, else 1..N in file order (the annotation files get the
    same ids, so pairing stays by id)."""
    ids = [int_if_numeric(v) for v in raw]
    if all(isinstance(v, int) for v in ids) and len(set(ids)) == len(ids):
        return ids
    print("note: POPE question ids are not unique integers across categories; numbering 1..N in file order")
    return list(range(1, len(ids) + 1))


def build_pope(bench: Benchmark, data: dict[str, Any], out: Path) -> list[str]:
    ds = data["test"]
    ids = pope_ids(list(ds["question_id"]))
    images = ImageWriter(out / bench.image_folder)
    questions = []
    labels: dict[str, list[dict[str, Any]]] = {c: [] for c in POPE_CATEGORIES}
    for i, (qid, row) in enumerate(zip(ids, rows(ds))):
        where = f"POPE row {i} (question_id {row.get('question_id')})"
        category = row["category"]
        if category not in labels:
            raise EvalInputError(f"{where}: unknown category {category!r} (expected {POPE_CATEGORIES})")
        name = f"{row['image_source']}.jpg"
        images.write(name, row["image"], where)
        questions.append(
            {"question_id": qid, "image": name, "text": row["question"] + SHORT_ANSWER, "category": category}
        )
        labels[category].append(
            {"question_id": qid, "image": name, "text": row["question"], "label": row["answer"].strip().lower()}
        )
    written = [write_jsonl(out / bench.question_file, questions)]
    labels_dir = out / bench.files["labels"]
    written += [write_jsonl(labels_dir / f"coco_pope_{c}.json", lines) for c, lines in labels.items() if lines]
    return [*written, images.summary()]


def check_pope(bench: Benchmark, parts: tuple[str, ...]) -> tuple[list[Requirement], list[ImageRefs]]:
    required = [
        Requirement(bench.question_file),
        *(Requirement(f"{bench.files['labels']}/coco_pope_{c}.json") for c in POPE_CATEGORIES),
        Requirement(f"{bench.image_folder}/", "COCO val2014 images"),
    ]
    return required, [ImageRefs(bench.question_file, bench.image_folder, jsonl_field("image"))]
