"""VQAv2: the EvalAI test-dev submission file, and the official VQA accuracy locally when val annotations are given.

Submission (upstream scripts/convert_vqav2_for_submission.py): every question of the full test2015 list gets an
entry, with the EvalAI-normalised answer or "" when unanswered (EvalAI rejects files that miss questions). The
score comes from the EvalAI server (challenge 830, test-dev phase), so the result JSON's headline is null with a
note saying so. ``--question-file`` (the split actually run, e.g. test-dev) makes unanswered questions of that
split show up as ``missing``; the rest of test2015 is expected to be empty.

Local accuracy (``--annotation-file`` v2_mscoco_val2014_annotations.json, optionally ``--question-json``
v2_OpenEnded_mscoco_val2014_questions.json to fix the question set): each answer is normalised as for a submission
and scored by the official VQA evaluation (10-choose-9 soft accuracy), overall and per answer type (yes/no,
number, other), in percent. An unanswered or failed question scores 0 (the official script refuses such a file);
an answer that normalises to "" is compared with the human answers like any other, as the official code does.

    python -m eval.vqav2 --test-file llava_vqav2_mscoco_test2015.jsonl --result-file merge.jsonl
        --out answers_upload/llava_vqav2_mscoco_test-dev2015/ckpt.json [--question-file <test-dev jsonl>]
    python -m eval.vqav2 --annotation-file v2_mscoco_val2014_annotations.json
        [--question-json v2_OpenEnded_mscoco_val2014_questions.json] --result-file merge.jsonl [--out val.json]
"""

from __future__ import annotations

import argparse
import json
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
from eval.vqa_text import human_answers, normalize_answer, vqav2_accuracy

ANSWER_TYPES = ("yes/no", "number", "other")
EVALAI_NOTE = "VQAv2 test-dev is scored by the EvalAI server (challenge 830, test-dev phase): submit the --out file"


def submitted_answers(question_ids: list[Any], answers: dict[str, dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """EvalAI's format: one entry per question, normalised answer or "" (unanswered or failed)."""
    entries = []
    for qid in question_ids:
        answer = answers.get(str(qid))
        text = None if answer is None else answer_text(answer, source)
        entries.append({"question_id": qid, "answer": "" if text is None else normalize_answer(text)})
    return entries


def question_file_ids(path: Path) -> list[Any]:
    rows = read_jsonl(path)
    lacking = [number for number, row in enumerate(rows, 1) if "question_id" not in row]
    if lacking:
        raise EvalInputError(f"{path}: lines without question_id: {id_list(lacking)}")
    return [row["question_id"] for row in rows]


def load_val(annotation_file: Path, question_json: Path | None) -> list[dict[str, Any]]:
    data = read_json(annotation_file)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise EvalInputError(f"{annotation_file}: expected a JSON object with an 'annotations' list")
    by_id = {}
    for number, entry in enumerate(annotations):
        if not isinstance(entry, dict):
            raise EvalInputError(f"{annotation_file}: annotations[{number}] is not a JSON object")
        where = f"{annotation_file}: annotations[{number}] (question_id {entry.get('question_id')!r})"
        if "question_id" not in entry or entry.get("answer_type") not in ANSWER_TYPES:
            raise EvalInputError(f"{where}: needs question_id and an answer_type in {ANSWER_TYPES}")
        answers = entry.get("answers")
        if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
            raise EvalInputError(f"{where}: 'answers' must be a list of {{'answer': ...}} objects")
        human_answers([a.get("answer") for a in answers], where)
        by_id[str(entry["question_id"])] = entry
    if question_json is None:
        return list(by_id.values())
    data = read_json(question_json)
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list) or not all(isinstance(q, dict) and "question_id" in q for q in questions):
        raise EvalInputError(f"{question_json}: expected a JSON object with a 'questions' list of question_id objects")
    unknown = [q["question_id"] for q in questions if str(q["question_id"]) not in by_id]
    if unknown:
        raise EvalInputError(f"{question_json}: questions without annotation in {annotation_file}: {id_list(unknown)}")
    return [by_id[str(q["question_id"])] for q in questions]


def local_accuracy(
    entries: list[dict[str, Any]], annotations: list[dict[str, Any]], answered: set[str]
) -> dict[str, float]:
    """Official accuracy over ``annotations``; a question outside ``answered`` (no answer, or a failed run) scores 0.

    An answer that normalises to "" is still compared with the humans, as the official code does: it matches
    human answers that process to "" too (e.g. "a" / "the" among disagreeing humans).
    """
    scores: dict[str, list[float]] = defaultdict(list)
    for entry, annotation in zip(entries, annotations, strict=True):
        humans = [a["answer"] for a in annotation["answers"]]
        accuracy = vqav2_accuracy(entry["answer"], humans) if str(entry["question_id"]) in answered else 0.0
        scores[annotation["answer_type"]].append(accuracy)
        scores["overall"].append(accuracy)
    return {kind: 100.0 * ratio(sum(scores[kind]), len(scores[kind])) for kind in ("overall", *ANSWER_TYPES)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m eval.vqav2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--result-file", required=True, type=Path, help="answers JSON lines (merge.jsonl)")
    universe = parser.add_mutually_exclusive_group(required=True)
    universe.add_argument("--test-file", type=Path, help="llava_vqav2_mscoco_test2015.jsonl (submission mode)")
    universe.add_argument("--annotation-file", type=Path, help="v2_mscoco_val2014_annotations.json (local accuracy)")
    parser.add_argument("--question-json", type=Path, help="v2_OpenEnded_mscoco_val2014_questions.json")
    parser.add_argument("--question-file", type=Path, help="the split that was run, to report its unanswered ones")
    parser.add_argument("--out", type=Path, help="EvalAI answers JSON (answers_upload/<split>/<ckpt>.json)")
    parser.add_argument("--result-json", type=Path, help="this project's result JSON (for eval.tables)")
    args = parser.parse_args(argv)
    if args.test_file and args.out is None:
        parser.error("--test-file writes a submission: give its path with --out")

    source = str(args.result_file)
    rows = read_jsonl(args.result_file)
    answers = answers_by_str_id(rows, source)
    if args.test_file:
        question_ids = question_file_ids(args.test_file)
        annotations = []
    else:
        annotations = load_val(args.annotation_file, args.question_json)
        question_ids = [annotation["question_id"] for annotation in annotations]
    universe = {str(qid) for qid in question_ids}
    check_known_ids(answers, universe, f"{source} (against {args.test_file or args.annotation_file})")

    entries = submitted_answers(question_ids, answers, source)
    usable = {str(e["question_id"]) for e in entries if str(e["question_id"]) in answers and e["answer"] != ""}
    errors = sum(answer_text(row, source) is None for row in answers.values())
    run_ids = universe
    if args.question_file:
        run_ids = {str(qid) for qid in question_file_ids(args.question_file)}
        check_known_ids(run_ids, universe, f"{args.question_file} (against {args.test_file or args.annotation_file})")
    missing = [qid for qid in question_ids if str(qid) in run_ids and str(qid) not in answers]
    metrics: dict[str, Any] = {
        "questions": len(question_ids),
        "answered": len(answers) - errors,
        "unanswered": len(question_ids) - len(answers) + errors,
        "missing": len(missing),
        "errors": errors,
        "empty_after_normalisation": len(answers) - errors - len(usable),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(entries), encoding="utf-8")
        print(f"wrote {len(entries)} answers ({metrics['unanswered']} empty) to {args.out}")
    if missing:
        print(f"{len(missing)} questions of the run have no answer: {id_list(missing)}")

    if annotations:
        answered = {key for key, row in answers.items() if answer_text(row, source) is not None}
        metrics["accuracy"] = local_accuracy(entries, annotations, answered)
        print(format_table(["answer type", "accuracy %"], [[k, v] for k, v in metrics["accuracy"].items()]))
        headline, extra = metrics["accuracy"]["overall"], {}
    else:
        print(EVALAI_NOTE)
        headline, extra = None, {"headline_note": EVALAI_NOTE}
    return write_result(
        args.result_json,
        "vqav2",
        metrics,
        headline=headline,
        count=len(run_ids) if args.question_file or annotations else len(answers),
        tokens=token_means(rows),
        result_file=source,
        **extra,
    )


if __name__ == "__main__":
    run_cli(main)
