"""MME scorer: acc and acc+ per subtask straight from the official MME_Benchmark_release_version folder.

Upstream needs two steps (eval.zip's convert_answer_to_mme.py, then MME's eval_tool/calculation.py); this does both
and can still write the eval_tool answer files (``--write-mme-txt``). Ground truth comes from every category folder
(``images/`` + ``questions_answers_YN/*.txt``, or flat ``<image>.txt`` files; each line ``question<TAB>Yes|No``).
An answer is matched to its ground truth by (category, image, question): category and image from its
``question_id`` ("<category>/[images/]<file>"), the question from its prompt with LLaVA's single-word instruction
swapped back for " Please answer yes or no." (as upstream's converter does).

Scoring follows calculation.py: a prediction is "yes"/"no" when it is exactly that (lower-cased), else when "yes"
(then "no") occurs in its first 4 characters, else "other" (wrong). acc = right questions / questions; acc+ = images
whose questions are all right / images, grouped by image (calculation.py pairs consecutive lines, so its acc+ depends
on line order; here it does not). Subtask score = 100 acc + 100 acc+. Perception (headline) sums the 10 perception
subtasks, cognition the 4 cognition subtasks. An unanswered or failed question counts wrong and is reported.

    python -m eval.mme --mme-dir MME_Benchmark_release_version --result-file answers/ckpt.jsonl
        [--write-mme-txt eval_tool/answers/ckpt] [--result-json results/ckpt.json]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

from eval.common import (
    EvalInputError,
    answer_text,
    format_table,
    id_list,
    ratio,
    read_jsonl,
    run_cli,
    token_means,
    write_result,
)

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
INSTRUCTION = "Answer the question using a single word or phrase."
YES_NO = "Please answer yes or no."


def parse_yes_no(text: str | None) -> str:
    if text is None:
        return "other"
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def load_ground_truth(mme_dir: Path) -> list[dict[str, str]]:
    """Every question of every known category present, in folder order (image file, then line)."""
    if not mme_dir.is_dir():
        raise EvalInputError(f"--mme-dir {mme_dir}: not a folder")
    questions = []
    for category in (*PERCEPTION, *COGNITION):
        folder = mme_dir / category
        if not folder.is_dir():
            continue
        qa_dir = folder / "questions_answers_YN" if (folder / "images").is_dir() else folder
        files = sorted(qa_dir.glob("*.txt"))
        if not files:
            raise EvalInputError(f"{qa_dir}: no question files (<image>.txt with 'question<TAB>answer' lines)")
        for path in files:
            for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.strip().split("\t")
                if len(fields) != 2 or fields[1].lower() not in ("yes", "no"):
                    raise EvalInputError(f"{path}:{number}: expected 'question<TAB>Yes|No', found {line!r}")
                questions.append({"category": category, "image": path.stem, "question": fields[0], "gt": fields[1]})
    if not questions:
        raise EvalInputError(f"--mme-dir {mme_dir}: none of the MME category folders ({', '.join(PERCEPTION)}, ...)")
    return questions


def answer_key(row: dict[str, Any], known: set[tuple[str, str, str]], source: str) -> tuple[str, str, str]:
    qid = row.get("question_id")
    prompt = row.get("prompt")
    if not isinstance(qid, str) or "/" not in qid or not isinstance(prompt, str):
        raise EvalInputError(f"{source}: answer {qid!r}: needs question_id '<category>/<image file>' and a prompt")
    category, image = qid.split("/")[0], Path(qid.split("/")[-1]).stem
    question = prompt.replace(INSTRUCTION, "").strip()
    if YES_NO not in question:
        question = f"{question} {YES_NO}"
        if (category, image, question) not in known:  # a few official files use two spaces
            question = question.replace(f" {YES_NO}", f"  {YES_NO}")
    key = (category, image, question)
    if key not in known:
        raise EvalInputError(f"{source}: answer {qid!r} with question {question!r} matches no MME ground truth")
    return key


def match_answers(
    questions: list[dict[str, str]], rows: list[dict[str, Any]], source: str
) -> list[dict[str, Any] | None]:
    keys = [(q["category"], q["image"], q["question"]) for q in questions]
    if len(set(keys)) != len(keys):
        raise EvalInputError(f"--mme-dir: a question appears twice for the same image: {id_list(keys)}")
    known = set(keys)
    answers: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        key = answer_key(row, known, source)
        if key in answers:
            raise EvalInputError(f"{source}: answer {row['question_id']!r} question {key[2]!r} answered twice")
        answers[key] = row
    return [answers.get(key) for key in keys]


def subtask_metrics(items: list[dict[str, Any]]) -> dict[str, Any]:
    by_image: dict[str, list[bool]] = defaultdict(list)
    for item in items:
        by_image[item["image"]].append(item["correct"])
    acc = ratio(sum(item["correct"] for item in items), len(items))
    acc_plus = ratio(sum(all(marks) for marks in by_image.values()), len(by_image))
    return {
        "acc": 100.0 * acc,
        "acc_plus": 100.0 * acc_plus,
        "score": 100.0 * (acc + acc_plus),
        "questions": len(items),
        "images": len(by_image),
        "other": sum(item["parsed"] == "other" and not item["missing"] for item in items),
        "missing": sum(item["missing"] for item in items),
    }


def write_mme_txt(folder: Path, items: list[dict[str, Any]]) -> None:
    """eval_tool/answers/<ckpt>/<category>.txt: ``file.txt<TAB>question<TAB>gt<TAB>prediction``, image pairs adjacent."""
    folder.mkdir(parents=True, exist_ok=True)
    by_category: dict[str, list[str]] = defaultdict(list)
    for item in items:
        prediction = " ".join((item["text"] or "").split("\n")).replace("\t", " ")
        by_category[item["category"]].append(f"{item['image']}.txt\t{item['question']}\t{item['gt']}\t{prediction}\n")
    for category, lines in by_category.items():
        (folder / f"{category}.txt").write_text("".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m eval.mme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mme-dir", required=True, type=Path, help="MME_Benchmark_release_version")
    parser.add_argument("--result-file", required=True, type=Path, help="answers JSON lines")
    parser.add_argument("--write-mme-txt", type=Path, help="also write eval_tool answer files into this folder")
    parser.add_argument("--result-json", type=Path, help="this project's result JSON (for eval.tables)")
    args = parser.parse_args(argv)

    source = str(args.result_file)
    questions = load_ground_truth(args.mme_dir)
    rows = read_jsonl(args.result_file)
    items = []
    for question, answer in zip(questions, match_answers(questions, rows, source), strict=True):
        text = None if answer is None else answer_text(answer, source)
        parsed = parse_yes_no(text)
        correct = parsed == question["gt"].lower()
        items.append({**question, "text": text, "parsed": parsed, "correct": correct, "missing": answer is None})

    subtasks = {}
    for category in (*PERCEPTION, *COGNITION):
        selected = [item for item in items if item["category"] == category]
        if selected:
            subtasks[category] = subtask_metrics(selected)
    totals = {
        name: sum(subtasks[c]["score"] for c in group if c in subtasks)
        for name, group in (("perception", PERCEPTION), ("cognition", COGNITION))
    }
    header = ["subtask", "questions", "images", "acc %", "acc+ %", "score", "other", "missing"]
    keys = ["questions", "images", "acc", "acc_plus", "score", "other", "missing"]
    table = [[category, *(found[k] for k in keys)] for category, found in subtasks.items()]
    print(format_table(header, [*table, ["perception", "", "", "", "", totals["perception"], "", ""]]))
    print(f"cognition: {totals['cognition']:.2f}")
    absent = [c for c in (*PERCEPTION, *COGNITION) if c not in subtasks]
    if absent:
        print(f"subtasks absent from {args.mme_dir} (not in the totals): {', '.join(absent)}")
    missing = [f"{item['category']}/{item['image']}: {item['question']}" for item in items if item["missing"]]
    if missing:
        print(f"{len(missing)} questions have no answer (counted wrong): {id_list(missing, 5)}")
    if args.write_mme_txt:
        write_mme_txt(args.write_mme_txt, items)
    metrics = {**subtasks, **totals, "absent_subtasks": absent, "missing": len(missing)}
    metrics["errors"] = sum(item["text"] is None and not item["missing"] for item in items)
    return write_result(
        args.result_json,
        "mme",
        metrics,
        headline=totals["perception"],
        count=len(items),
        tokens=token_means(rows),
        result_file=source,
    )


if __name__ == "__main__":
    run_cli(main)
