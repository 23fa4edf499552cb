"""TextVQA scorer: EvalAI normalisation and the 10-choose-9 VQA accuracy (upstream eval_textvqa.py + m4c).

Matching answers to annotations. LLaVA's question file stores the TextVQA *image* id in ``question_id`` (several
questions share an image), so upstream keys annotations by (image_id, question.lower()) and recovers the question
from the answer's prompt. When the answers instead carry TextVQA's own numeric ``question_id`` (every answer id is
an annotation question id), matching by that id is exact and no prompt parsing is needed. ``--match auto`` (the
default) picks the id match when it applies, else the upstream key; both can be forced.

Every annotation in the file is a question of the benchmark: one without an answer counts 0 and is reported, an
answer matching no annotation is an error. Accuracy is the mean over annotations, in percent.

    python -m eval.textvqa --annotation-file TextVQA_0.5.1_val.json --result-file answers/ckpt.jsonl
        [--result-json results/ckpt.json]
    python -m eval.textvqa --annotation-file TextVQA_0.5.1_val.json --result-dir answers [--result-json results/]
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from eval.common import (
    EvalInputError,
    answer_text,
    answers_by_str_id,
    check_known_ids,
    format_table,
    id_list,
    ratio,
    read_json,
    read_jsonl,
    run_cli,
    token_means,
    write_result,
)
from eval.vqa_text import human_answers, textvqa_accuracy

_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def question_from_prompt(prompt: Any, where: str) -> str:
    """The question inside a prompt, lower-cased, for the three prompt layouts upstream's scorer knows.

    "OCR tokens: ... Question: <q> Short answer:"; "<q>\\nReference OCR token: ...\\n<instruction>" (the OCR line
    may come first); "<q>\\n<instruction>".
    """
    if not isinstance(prompt, str):
        raise EvalInputError(f"{where}: no 'prompt' to recover the question from")
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_QUESTION.search(prompt)
        if match is None:
            raise EvalInputError(f"{where}: prompt starts with 'OCR tokens: ' but has no 'Question: ... Short answer:'")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if lines[0].startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise EvalInputError(
            f"{where}: cannot find the question in prompt {prompt[:80]!r}: expected '<question>\\n[Reference OCR "
            "token: ...\\n]<instruction>' or 'OCR tokens: ... Question: ... Short answer:'"
        )
    return question.lower()


def load_annotations(path: Path) -> list[dict[str, Any]]:
    data = read_json(path)
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise EvalInputError(f"{path}: expected a JSON object with a 'data' list of questions")
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise EvalInputError(f"{path}: data[{number}] is not a JSON object")
        where = f"{path}: data[{number}] (question_id {entry.get('question_id')!r})"
        for field in ("image_id", "question"):
            if not isinstance(entry.get(field), str):
                raise EvalInputError(f"{where}: {field!r} missing or not a string")
        human_answers(entry.get("answers"), where)
    return entries


def choose_match(mode: str, rows: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> str:
    if mode != "auto":
        return mode
    ids = {str(entry["question_id"]) for entry in annotations if "question_id" in entry}
    has_ids = len(ids) == len(annotations)
    return "question_id" if has_ids and all(str(row.get("question_id")) in ids for row in rows) else "image_question"


def pair_by_question_id(
    rows: list[dict[str, Any]], annotations: list[dict[str, Any]], source: str
) -> list[dict[str, Any] | None]:
    by_id = {}
    for entry in annotations:
        if "question_id" not in entry:
            raise EvalInputError(f"{source}: --match question_id needs 'question_id' on every annotation")
        if str(entry["question_id"]) in by_id:
            raise EvalInputError(f"{source}: annotation question_id {entry['question_id']!r} appears twice")
        by_id[str(entry["question_id"])] = entry
    answers = answers_by_str_id(rows, source)
    check_known_ids(answers, by_id, source)
    return [answers.get(str(entry["question_id"])) for entry in annotations]


def pair_by_image_question(
    rows: list[dict[str, Any]], annotations: list[dict[str, Any]], source: str
) -> list[dict[str, Any] | None]:
    """Upstream's key. Identical (image, question) pairs, rare in TextVQA, take their answers in file order."""
    waiting: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if "question_id" not in row:
            raise EvalInputError(f"{source}: answer line without question_id: {str(row)[:120]}")
        where = f"{source}: question_id {row['question_id']!r}"
        waiting[(str(row["question_id"]), question_from_prompt(row.get("prompt"), where))].append(row)
    slots: dict[tuple[str, str], int] = defaultdict(int)
    for entry in annotations:
        slots[(entry["image_id"], entry["question"].lower())] += 1
    for key, answers in waiting.items():
        if key not in slots:
            raise EvalInputError(f"{source}: answer for image {key[0]!r} question {key[1]!r} matches no annotation")
        if len(answers) > slots[key]:
            raise EvalInputError(f"{source}: image {key[0]!r} question {key[1]!r} answered {len(answers)} times")
    return [
        queue.pop(0) if (queue := waiting.get((e["image_id"], e["question"].lower()))) else None for e in annotations
    ]


def score_file(annotations: list[dict[str, Any]], result_file: Path, match: str) -> dict[str, Any]:
    rows = read_jsonl(result_file)
    source = str(result_file)
    match = choose_match(match, rows, annotations)
    pairing = pair_by_question_id if match == "question_id" else pair_by_image_question
    paired = pairing(rows, annotations, source)
    total, missing, errors = 0.0, [], 0
    for answer, entry in zip(paired, annotations, strict=True):
        if answer is None:
            missing.append(entry.get("question_id", (entry["image_id"], entry["question"])))
            continue
        text = answer_text(answer, source)
        if text is None:
            errors += 1
            continue
        total += textvqa_accuracy(text, entry["answers"])
    accuracy = 100.0 * ratio(total, len(annotations))
    metrics = {"accuracy": accuracy, "answered": len(annotations) - len(missing), "missing": len(missing)}
    metrics["errors"] = errors
    print(f"{result_file.stem}: matched by {match}")
    print(
        format_table(
            ["samples", "missing", "errors", "accuracy %"], [[len(annotations), len(missing), errors, accuracy]]
        )
    )
    if missing:
        print(f"{len(missing)} questions have no answer (counted 0): {id_list(missing)}")
    return {"metrics": metrics, "headline": accuracy, "count": len(annotations), "tokens": token_means(rows)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m eval.textvqa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotation-file", required=True, type=Path, help="TextVQA_0.5.1_val.json")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--result-file", type=Path, help="answers JSON lines")
    source.add_argument("--result-dir", type=Path, help="score every *.jsonl in this folder")
    parser.add_argument("--match", choices=("auto", "question_id", "image_question"), default="auto")
    parser.add_argument(
        "--result-json", type=Path, help="result JSON path (a folder of <answers stem>.json with --result-dir)"
    )
    args = parser.parse_args(argv)

    annotations = load_annotations(args.annotation_file)
    files = [args.result_file] if args.result_file else sorted(args.result_dir.glob("*.jsonl"))
    if not files:
        raise EvalInputError(f"--result-dir {args.result_dir}: no *.jsonl answer files")
    results = []
    for result_file in files:
        scored = score_file(annotations, result_file, args.match)
        target = args.result_json
        if target is not None and args.result_dir:
            target = target / f"{result_file.stem}.json"
        results.append(write_result(target, "textvqa", **scored, result_file=str(result_file)))
    return results


if __name__ == "__main__":
    run_cli(main)
