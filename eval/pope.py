"""POPE scorer: per-category confusion counts, accuracy, precision, recall, F1 and yes-ratio; headline mean F1.

Upstream's eval_pope.py zips answers with label lines by position, so a chunked or reordered run is silently
mis-scored. Here every question of the question file gets its label first, then its answer by question id:

- labels: each ``coco_pope_<category>.json`` (JSON lines: question_id, image, text, label) is paired with the
  question-file lines of that category by id when the two id sets agree, otherwise in file order (POPE's own ids
  restart in every file, LLaVA's do not); either way the image names and the questions (the first line of the
  question file's text) must agree line by line, so a wrong pairing, even of two lines about the same image, is an
  error instead of a wrong score;
- answers are paired by question id, and an answer that records its ``prompt`` (the runners do) must ask the
  question file's question: answers from another POPE set whose ids overlap are an error;
- parsing is upstream's (first sentence; the words "No", "no" or "not" mean no, anything else yes);
  a question without an answer, or whose run failed, is scored as the wrong answer (a miss or a false alarm) and
  counted under ``unanswered``; ``yes_ratio`` is over the answered questions.

All rates are percentages; "yes" is the positive class.

    python -m eval.pope --annotation-dir pope/coco --question-file pope/llava_pope_test.jsonl
        --result-file answers/ckpt.jsonl [--result-json results/ckpt.json]
"""

from __future__ import annotations

import argparse
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
    read_jsonl,
    run_cli,
    token_means,
    write_result,
)

NO_WORDS = frozenset({"No", "no", "not"})


def parse_yes_no(text: str) -> str:
    """Upstream's rule, kept for comparable numbers: only the whole words "No", "no" and "not" in the first sentence
    mean no, so "Not sure." (capital "Not") and "I see a dog" are yes.

    >>> [parse_yes_no(text) for text in ("Not sure.", "I see a dog", "No, it is not.", "Yes. It is not a cat")]
    ['yes', 'yes', 'no', 'yes']
    """
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if NO_WORDS.intersection(words) else "yes"


def question_line(text: Any) -> str | None:
    """The question itself: the first line of a text or prompt (LLaVA's question file appends the instruction)."""
    return text.split("\n", 1)[0].strip() if isinstance(text, str) else None


def load_questions(path: Path) -> dict[str, dict[str, Any]]:
    questions: dict[str, dict[str, Any]] = {}
    for number, row in enumerate(read_jsonl(path), 1):
        if "question_id" not in row or not isinstance(row.get("category"), str):
            raise EvalInputError(f"{path}: line {number}: needs 'question_id' and a 'category'")
        key = str(row["question_id"])
        if key in questions:
            raise EvalInputError(f"{path}: question_id {row['question_id']!r} appears twice")
        questions[key] = row
    return questions


def load_labels(annotation_dir: Path, questions: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """{category: {question id: "yes"|"no"}} for every question of the question file."""
    files = sorted(annotation_dir.glob("coco_pope_*.json"))
    if not files:
        raise EvalInputError(f"--annotation-dir {annotation_dir}: no coco_pope_<category>.json files")
    labels = {}
    for path in files:
        category = path.name[len("coco_pope_") : -len(".json")]
        ids = [key for key, q in questions.items() if q["category"] == category]
        lines = read_jsonl(path)
        for number, line in enumerate(lines, 1):
            if line.get("label") not in ("yes", "no"):
                raise EvalInputError(f"{path}: line {number}: label must be 'yes' or 'no', found {line.get('label')!r}")
        by_id = {str(line.get("question_id")): line for line in lines}
        if all("question_id" in line for line in lines) and set(by_id) == set(ids) and len(by_id) == len(lines):
            paired = [(key, by_id[key]) for key in ids]
        elif len(lines) == len(ids):
            paired = list(zip(ids, lines, strict=True))
        else:
            raise EvalInputError(
                f"{path}: {len(lines)} labels but the question file has {len(ids)} {category!r} questions "
                "and the ids do not match either"
            )
        for key, line in paired:
            question = questions[key]
            images = (question.get("image"), line.get("image"))
            texts = (question_line(question.get("text")), question_line(line.get("text")))
            for asked, labelled in (images, texts):
                if asked is not None and labelled is not None and asked != labelled:
                    raise EvalInputError(
                        f"{path}: question_id {question['question_id']!r} is about {asked!r} but its label line is "
                        f"about {labelled!r}: the label file is not in the question file's order, or from another set"
                    )
        labels[category] = {key: line["label"] for key, line in paired}
    unlabelled = sorted({q["category"] for q in questions.values()} - set(labels))
    if unlabelled:
        raise EvalInputError(f"--annotation-dir {annotation_dir}: no coco_pope_<category>.json for {unlabelled}")
    return labels


def check_answered_questions(
    answers: dict[str, dict[str, Any]], questions: dict[str, dict[str, Any]], source: str
) -> None:
    """Ids alone cannot tell two POPE sets apart (both number from 1), so an answer's prompt must ask our question."""
    for key, answer in answers.items():
        asked, expected = question_line(answer.get("prompt")), question_line(questions[key].get("text"))
        if asked is not None and expected is not None and asked != expected:
            raise EvalInputError(
                f"{source}: question_id {questions[key]['question_id']!r} answers {asked!r} but the question file "
                f"asks {expected!r}: the answers come from another question file"
            )


def category_metrics(labels: dict[str, str], answers: dict[str, dict[str, Any]], source: str) -> dict[str, Any]:
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    unanswered, yes = [], 0
    for key, label in labels.items():
        answer = answers.get(key)
        text = None if answer is None else answer_text(answer, source)
        if text is None:
            unanswered.append(key)
            predicted = "no" if label == "yes" else "yes"
        else:
            predicted = parse_yes_no(text)
            yes += predicted == "yes"
        counts[("t" if predicted == label else "f") + ("p" if predicted == "yes" else "n")] += 1
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        **counts,
        "accuracy": 100.0 * ratio(tp + tn, len(labels)),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * ratio(2 * precision * recall, precision + recall),
        "yes_ratio": 100.0 * ratio(yes, len(labels) - len(unanswered)),
        "count": len(labels),
        "unanswered": len(unanswered),
        "unanswered_ids": unanswered,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m eval.pope", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotation-dir", required=True, type=Path, help="folder of coco_pope_<category>.json")
    parser.add_argument("--question-file", required=True, type=Path, help="llava_pope_test.jsonl")
    parser.add_argument("--result-file", required=True, type=Path, help="answers JSON lines")
    parser.add_argument("--result-json", type=Path, help="this project's result JSON (for eval.tables)")
    args = parser.parse_args(argv)

    source = str(args.result_file)
    questions = load_questions(args.question_file)
    labels = load_labels(args.annotation_dir, questions)
    rows = read_jsonl(args.result_file)
    answers = answers_by_str_id(rows, source)
    check_known_ids(answers, questions, f"{source} (against {args.question_file})")
    check_answered_questions(answers, questions, f"{source} (against {args.question_file})")

    per_category = {category: category_metrics(labels[category], answers, source) for category in labels}
    header = ["category", "count", "TP", "FP", "TN", "FN", "acc %", "precision %", "recall %", "F1 %", "yes %"]
    keys = ["count", "tp", "fp", "tn", "fn", "accuracy", "precision", "recall", "f1", "yes_ratio"]
    print(format_table(header, [[category, *(found[k] for k in keys)] for category, found in per_category.items()]))
    unanswered = [questions[key]["question_id"] for found in per_category.values() for key in found["unanswered_ids"]]
    if unanswered:
        print(f"{len(unanswered)} questions have no usable answer (scored wrong): {id_list(unanswered)}")
    mean_f1 = ratio(sum(found["f1"] for found in per_category.values()), len(per_category))
    print(f"mean F1 over {len(per_category)} categories: {mean_f1:.2f}")
    metrics = {
        category: {k: v for k, v in found.items() if k != "unanswered_ids"} for category, found in per_category.items()
    }
    metrics["mean_f1"] = mean_f1
    metrics["mean_accuracy"] = ratio(sum(found["accuracy"] for found in per_category.values()), len(per_category))
    return write_result(
        args.result_json,
        "pope",
        metrics,
        headline=mean_f1,
        count=len(questions),
        tokens=token_means(rows),
        result_file=source,
    )


if __name__ == "__main__":
    run_cli(main)
