"""The README's main job: answer the bundled demo questions with a LLaVA checkpoint and print token counts.

    python -m llava.demo                       # builds the tiny random checkpoint on first use
    python -m llava.demo --model-path liuhaotian/llava-v1.5-7b --visual-pruning longtail

With no --model-path it writes a tiny random LLaVA-1.5 checkpoint (original release format) to
checkpoints/llava-v1.5-tiny and uses it, so the answers are noise: the point is the pipeline and the counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava.inference import build_prompt, generate_answers
from llava.mm_utils import load_image
from llava.utils import add_model_args, load_from_args, quiet_transformers
from pruning import add_pruning_args, pruning_overrides

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "playground" / "demo"
TINY = REPO / "checkpoints" / "llava-v1.5-tiny"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.set_defaults(model_path=None)
    for action in parser._actions:
        if action.dest == "model_path":
            action.required = False
    parser.add_argument("--question-file", default=str(DEMO / "questions.jsonl"))
    parser.add_argument("--image-folder", default=str(DEMO / "images"))
    parser.add_argument("--conv-mode", default="vicuna_v1")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    add_pruning_args(parser)
    return parser.parse_args(argv)


def ensure_tiny_checkpoint() -> Path:
    if not (TINY / "config.json").is_file():
        from llava.model.tiny import write_tiny_llava

        print(f"building the tiny random checkpoint in {TINY} ...")
        write_tiny_llava(TINY, seed=0)
    return TINY


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    quiet_transformers()
    if args.model_path is None:
        args.model_path = str(ensure_tiny_checkpoint())
    tokenizer, model, processor, _ = load_from_args(args, pruning_overrides(args))
    questions = [json.loads(line) for line in Path(args.question_file).read_text().splitlines() if line.strip()]
    print(f"model: {args.model_path}\npruning: {model.pruning_config.describe()}\n")
    rows = []
    for start in range(0, len(questions), args.batch_size):
        batch = questions[start : start + args.batch_size]
        images = [load_image(Path(args.image_folder) / q["image"]) for q in batch]
        prompts = [build_prompt(q["text"], args.conv_mode, model_config=model.config) for q in batch]
        answers = generate_answers(model, tokenizer, processor, prompts, images, max_new_tokens=args.max_new_tokens)
        for question, answer in zip(batch, answers):
            stats = answer.token_stats
            print(f"[{question['image']}] {question['text']}\n  -> {answer.text!r}")
            print(
                f"     visual tokens {stats['visual_after']}/{stats['visual_before']} (i*={stats['inflection']}), "
                f"prompt {stats['prompt']}, generated {stats['generated']}, total (KV) {stats['kv_final']}"
            )
            rows.append({"question_id": question["question_id"], "text": answer.text, "tokens": stats})
    return rows


if __name__ == "__main__":
    main()
