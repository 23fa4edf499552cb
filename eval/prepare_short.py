"""Short-answer benchmarks run by ``model_vqa_loader``: TextVQA, MME, VQAv2, POPE.

Each question line is upstream's ``{"question_id", "image", "text", "category"}`` with the question followed by
"\\nAnswer the question using a single word or phrase." (the suffix lives in the question file, as in eval.zip).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from eval.common import EvalInputError
from eval.prepare_io import (
    SHORT_ANSWER,
    Bench,
    ImageRefs,
    ImageWriter,
    Part,
    Requirement,
    int_if_numeric,
    jsonl_field,
    rows,
    write_json,
    write_jsonl,
    write_text,
)

# ---------------------------------------------------------------------------------------------------------------
# TextVQA

TEXTVQA_QUESTIONS = "llava_textvqa_val_v051_ocr.jsonl"
TEXTVQA_ANNOTATIONS = "TextVQA_0.5.1_val.json"
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


def build_textvqa(data: dict[str, Any], out: Path) -> list[str]:
    """Question ids are TextVQA's own numeric ids (unique), not upstream's image ids (shared by several
    questions); the annotation file carries both, so the scorer matches by id."""
    images = ImageWriter(out / "train_images")
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
        write_jsonl(out / TEXTVQA_QUESTIONS, questions),
        write_json(out / TEXTVQA_ANNOTATIONS, ann),
        images.summary(),
    ]


TEXTVQA = Bench(
    name="textvqa",
    parts={"val": Part("textvqa", None, "validation")},
    default_parts=("val",),
    build=build_textvqa,
    required=lambda parts: [
        Requirement(TEXTVQA_QUESTIONS),
        Requirement(TEXTVQA_ANNOTATIONS),
        Requirement("train_images/"),
    ],
    images=lambda parts: [ImageRefs(TEXTVQA_QUESTIONS, "train_images", jsonl_field("image"))],
)

# ---------------------------------------------------------------------------------------------------------------
# MME

MME_QUESTIONS = "llava_mme.jsonl"
MME_ROOT = "MME_Benchmark_release_version"
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


def build_mme(data: dict[str, Any], out: Path) -> list[str]:
    """``question_id`` stays upstream's ``<category>/<file>``, shared by the two questions of an image."""
    root = out / MME_ROOT
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
    return [write_jsonl(out / MME_QUESTIONS, questions), f"{root}: {len(truth)} answer files", images.summary()]


def mme_truth_files(path: Path) -> list[str]:
    """Ground-truth .txt of every image in llava_mme.jsonl (for --check)."""
    out = []
    for image in jsonl_field("image")(path):
        folder, _, file = image.partition("/")
        stem = Path(file).stem
        nested = file.startswith("images/")
        out.append(f"{folder}/questions_answers_YN/{stem}.txt" if nested else f"{folder}/{stem}.txt")
    return out


MME = Bench(
    name="MME",
    aliases=("mme",),
    parts={"test": Part("MME", None, "test")},
    default_parts=("test",),
    build=build_mme,
    required=lambda parts: [Requirement(MME_QUESTIONS), Requirement(f"{MME_ROOT}/")],
    images=lambda parts: [
        ImageRefs(MME_QUESTIONS, MME_ROOT, jsonl_field("image")),
        ImageRefs(MME_QUESTIONS, MME_ROOT, mme_truth_files),
    ],
)

# ---------------------------------------------------------------------------------------------------------------
# VQAv2

VQAV2_FILES = {
    "testdev": ("llava_vqav2_mscoco_test-dev2015.jsonl", "test2015", "COCO_test2015_{:012d}.jpg"),
    "test": ("llava_vqav2_mscoco_test2015.jsonl", "test2015", "COCO_test2015_{:012d}.jpg"),
    "val": ("llava_vqav2_mscoco_val2014.jsonl", "val2014", "COCO_val2014_{:012d}.jpg"),
}
VQAV2_VAL_QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
VQAV2_VAL_ANNOTATIONS = "v2_mscoco_val2014_annotations.json"


def build_vqav2(data: dict[str, Any], out: Path) -> list[str]:
    """test-dev is what runs; the full test list only pads the EvalAI submission, so its images are not written
    (they are a superset of test-dev's, about 81k files). ``val`` adds official-format annotations for local
    accuracy."""
    written = []
    for part, ds in data.items():
        qfile, folder, pattern = VQAV2_FILES[part]
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
            written.append(write_json(out / VQAV2_VAL_QUESTIONS, {"questions": val_questions}))
            written.append(write_json(out / VQAV2_VAL_ANNOTATIONS, {"annotations": val_annotations}))
    return written


def vqav2_required(parts: tuple[str, ...]) -> list[Requirement]:
    reqs = []
    for part in parts:
        qfile, folder, _ = VQAV2_FILES[part]
        reqs.append(Requirement(qfile, "the full test list pads the EvalAI submission" if part == "test" else ""))
        if part != "test":
            reqs.append(Requirement(f"{folder}/"))
        if part == "val":
            reqs += [Requirement(VQAV2_VAL_QUESTIONS), Requirement(VQAV2_VAL_ANNOTATIONS)]
    return reqs


VQAV2 = Bench(
    name="vqav2",
    parts={
        "testdev": Part("VQAv2", None, "testdev"),
        "test": Part("VQAv2", None, "test"),
        "val": Part("VQAv2", None, "validation"),
    },
    default_parts=("testdev", "test"),
    build=build_vqav2,
    required=vqav2_required,
    images=lambda parts: [
        ImageRefs(VQAV2_FILES[p][0], VQAV2_FILES[p][1], jsonl_field("image")) for p in parts if p != "test"
    ],
)

# ---------------------------------------------------------------------------------------------------------------
# POPE

POPE_QUESTIONS = "llava_pope_test.jsonl"
POPE_CATEGORIES = ("adversarial", "popular", "random")


def pope_ids(raw: list[Any]) -> list[Any]:
    """The dataset's ids when they are unique integers, else 1..N in file order (the annotation files get the
    same ids, so pairing stays by id)."""
    ids = [int_if_numeric(v) for v in raw]
    if all(isinstance(v, int) for v in ids) and len(set(ids)) == len(ids):
        return ids
    print("note: POPE question ids are not unique integers across categories; numbering 1..N in file order")
    return list(range(1, len(ids) + 1))


def build_pope(data: dict[str, Any], out: Path) -> list[str]:
    ds = data["test"]
    ids = pope_ids(list(ds["question_id"]))
    images = ImageWriter(out / "val2014")
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
    written = [write_jsonl(out / POPE_QUESTIONS, questions)]
    written += [write_jsonl(out / "coco" / f"coco_pope_{c}.json", lines) for c, lines in labels.items() if lines]
    return [*written, images.summary()]


POPE = Bench(
    name="pope",
    parts={"test": Part("POPE", None, "test")},
    default_parts=("test",),
    build=build_pope,
    required=lambda parts: [
        Requirement(POPE_QUESTIONS),
        *(Requirement(f"coco/coco_pope_{c}.json") for c in POPE_CATEGORIES),
        Requirement("val2014/", "COCO val2014 images"),
    ],
    images=lambda parts: [ImageRefs(POPE_QUESTIONS, "val2014", jsonl_field("image"))],
)

BENCHES = [TEXTVQA, MME, VQAV2, POPE]
