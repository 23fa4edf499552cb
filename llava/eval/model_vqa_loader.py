"""Short-answer benchmarks (TextVQA, MME, POPE, VQAv2, GQA-style files): one JSON line per question.

    python -m llava.eval.model_vqa_loader --model-path liuhaotian/llava-v1.5-7b \\
        --question-file playground/data/eval/pope/llava_pope_test.jsonl \\
        --image-folder playground/data/eval/pope/val2014 --answers-file answers/llava-v1.5-7b.jsonl \\
        --temperature 0 --conv-mode vicuna_v1 [--batch-size 8] [--visual-pruning longtail --kv-pruning h2o]

Question lines are ``{"question_id", "image", "text", ...}``; the instruction suffix ("Answer the question using a
single word or phrase.") is already in ``text``, as in LLaVA's eval.zip. The answer's ``prompt`` is that text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.common import iter_jsonl
from llava.eval import runner
from llava.eval.runner import QuestionFormat, RunnerInputError, Sample


def read_question_lines(path: str | Path, image_folder: str | Path) -> list[Sample]:
    """JSON-lines questions; a line without ``text`` or with a bad ``image`` is a per-question error (skippable)."""
    path, folder = Path(path), Path(image_folder)
    samples = []
    for number, row in iter_jsonl(path, error=RunnerInputError):
        if not isinstance(row, dict) or "question_id" not in row:
            raise RunnerInputError(f"{path}:{number}: expected a JSON object with a question_id")
        sample = Sample(row["question_id"], "", f"{path} line {number}")
        text, image = row.get("text"), row.get("image")
        if not isinstance(text, str):
            sample.error = f"no question 'text' (found {text!r})"
        elif image is not None and not isinstance(image, str):
            sample.error = f"'image' must be a file name, found {image!r}"
        else:
            sample.text = text
            sample.fields = {"prompt": text}
            sample.image = folder / image if image else None
        samples.append(sample)
    return samples


def read(args: argparse.Namespace) -> list[Sample]:
    return read_question_lines(args.question_file, args.image_folder)


FORMAT = QuestionFormat("model_vqa_loader", read, temperature=0.2, max_new_tokens=128, plain_mmtag=True)


def main(argv: list[str] | None = None) -> int:
    return runner.main(FORMAT, argv, __doc__)


if __name__ == "__main__":
    main()
