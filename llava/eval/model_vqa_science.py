"""ScienceQA (LLaVA's llava_test_CQM-A.json): multiple choice, with or without an image.

    python -m llava.eval.model_vqa_science --model-path liuhaotian/llava-v1.5-7b \\
        --question-file playground/data/eval/scienceqa/llava_test_CQM-A.json \\
        --image-folder playground/data/eval/scienceqa/images/test \\
        --answers-file playground/data/eval/scienceqa/answers/llava-v1.5-7b.jsonl \\
        --single-pred-prompt --temperature 0 --conv-mode vicuna_v1

The question file is a JSON list of ``{"id", "image"?, "conversations": [{"from": "human", "value": ...}, ...]}``.
As upstream: ``<image>`` is moved to the front when the problem has an image and dropped otherwise (text-only
problems run without one), ``--single-pred-prompt`` appends the answer-with-a-letter instruction, and the answer's
``prompt`` shows ``<image>`` for problems with an image (the scorer's IMG subset).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.eval import runner
from llava.eval.runner import QuestionFormat, RunnerInputError, Sample

SINGLE_PRED = "Answer with the option's letter from the given choices directly."


def read(args: argparse.Namespace) -> list[Sample]:
    path, folder = Path(args.question_file), Path(args.image_folder)
    try:
        problems = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunnerInputError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(problems, list):
        raise RunnerInputError(f"{path}: expected a JSON list of problems, found {type(problems).__name__}")
    samples = []
    for number, problem in enumerate(problems):
        if not isinstance(problem, dict) or "id" not in problem:
            raise RunnerInputError(f"{path}: entry [{number}] is not a problem with an 'id'")
        sample = Sample(problem["id"], "", f"{path} entry [{number}]")
        turns = problem.get("conversations")
        first = turns[0] if isinstance(turns, list) and turns else None
        value = first.get("value") if isinstance(first, dict) else None
        image = problem.get("image")
        if not isinstance(value, str):
            sample.error = "no question: 'conversations' must start with a human turn that has a 'value'"
        elif image is not None and not isinstance(image, str):
            sample.error = f"'image' must be a file name, found {image!r}"
        else:
            question = value.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            prompt = f"{DEFAULT_IMAGE_TOKEN}\n{question}" if image else question
            if args.single_pred_prompt:
                question, prompt = f"{question}\n{SINGLE_PRED}", f"{prompt}\n{SINGLE_PRED}"
            sample.text, sample.fields = question, {"prompt": prompt}
            sample.image = folder / image if image else None
        samples.append(sample)
    return samples


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--single-pred-prompt", action="store_true", help="append the answer-with-a-letter line")


FORMAT = QuestionFormat("model_vqa_science", read, temperature=0.2, max_new_tokens=1024, add_args=add_args)


def main(argv: list[str] | None = None) -> int:
    return runner.main(FORMAT, argv, __doc__)


if __name__ == "__main__":
    main()
