"""A benchmark from outside the eval package, as docs/architecture.md ("Add a benchmark") describes: one spec plus
its scorer, registered when this module is imported (``BENCHMARK_MODULES=tests.toy_benchmark``).

Yes/no questions in the short-answer format (``llava.eval.model_vqa_loader`` reads them, so no new reader), labels
in ``labels.json``; the headline is the accuracy in %. ``write_question_folder`` makes a data folder for the tests.

    python -m tests.toy_benchmark --question-file Q --labels L --result-file A [--result-json R]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from eval.benchmarks import Benchmark, register_benchmark
from eval.common import (
    answer_text,
    answers_by_str_id,
    check_known_ids,
    jsonl_line,
    ratio,
    read_json,
    read_jsonl,
    run_cli,
    token_means,
    write_result,
)

TOY = register_benchmark(
    Benchmark(
        name="toy",
        title="Toy yes/no",
        headline="accuracy (%) of the yes/no answers",
        folder="toy",
        runner="llava.eval.model_vqa_loader",
        question_file="questions.jsonl",
        image_folder="images",
        files={"labels": "labels.json"},
        scorer="tests.toy_benchmark",
        score_args=lambda run: [
            *("--question-file", run.question_file, "--labels", run.file("labels")),
            *("--result-file", run.answers, "--result-json", run.result_json),
        ],
    )
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m tests.toy_benchmark")
    parser.add_argument("--question-file", required=True, type=Path)
    parser.add_argument("--labels", required=True, type=Path, help='{"<question_id>": "yes" | "no"}')
    parser.add_argument("--result-file", required=True, type=Path)
    parser.add_argument("--result-json", type=Path)
    args = parser.parse_args(argv)
    labels = read_json(args.labels)
    questions = {str(row["question_id"]) for row in read_jsonl(args.question_file)}
    rows = read_jsonl(args.result_file)
    answers = answers_by_str_id(rows, str(args.result_file))
    check_known_ids(answers, questions, str(args.result_file))
    right = 0
    for key in sorted(questions):
        text = answer_text(answers[key], str(args.result_file)) if key in answers else None
        right += text is not None and text.strip().lower().startswith(labels[key])
    accuracy = 100.0 * ratio(right, len(questions))
    print(f"toy: {right} of {len(questions)} right, accuracy {accuracy:.2f}")
    metrics = {"accuracy": accuracy, "right": right}
    return write_result(
        args.result_json, TOY.name, metrics, accuracy, len(questions), token_means(rows), result_file=args.result_file
    )


def write_question_folder(folder: Path, images: list[Any]) -> None:
    """Two questions per image, labelled yes and no."""
    (folder / "images").mkdir(parents=True)
    questions, labels = [], {}
    for n, image in enumerate(images):
        image.save(folder / "images" / f"{n}.png")
        for m, (thing, label) in enumerate((("square", "yes"), ("cat", "no"))):
            qid = 2 * n + m
            text = f"Is there a {thing} in the image?\nAnswer the question using a single word or phrase."
            questions.append({"question_id": qid, "image": f"{n}.png", "text": text})
            labels[str(qid)] = label
    (folder / "questions.jsonl").write_text("".join(jsonl_line(q) for q in questions), encoding="utf-8")
    (folder / "labels.json").write_text(json.dumps(labels), encoding="utf-8")


if __name__ == "__main__":
    run_cli(main)
