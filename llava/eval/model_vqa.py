"""Open-ended benchmarks (MM-Vet, LLaVA-Bench-in-the-Wild): long answers, no instruction suffix.

    python -m llava.eval.model_vqa --model-path liuhaotian/llava-v1.5-7b \\
        --question-file playground/data/eval/mm-vet/llava-mm-vet.jsonl \\
        --image-folder playground/data/eval/mm-vet/images --answers-file answers/llava-v1.5-7b.jsonl \\
        --temperature 0 --conv-mode vicuna_v1

Same question-line format as model_vqa_loader (``{"question_id", "image", "text", ...}``); upstream's defaults
differ: up to 1024 new tokens, and no 'plain' template switch.
"""

from __future__ import annotations

import argparse

from llava.eval import runner
from llava.eval.model_vqa_loader import read_question_lines
from llava.eval.runner import QuestionFormat, Sample


def read(args: argparse.Namespace) -> list[Sample]:
    return read_question_lines(args.question_file, args.image_folder)


FORMAT = QuestionFormat("model_vqa", read, temperature=0.2, max_new_tokens=1024)


def main(argv: list[str] | None = None) -> int:
    return runner.main(FORMAT, argv, __doc__)


if __name__ == "__main__":
    main()
