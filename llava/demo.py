"""The README's main command: evaluate a LLaVA checkpoint on the bundled mini POPE set, end to end, both stages on.

    python -m llava.demo                       # builds the tiny random checkpoint on first use
    python -m llava.demo --model-path liuhaotian/llava-v1.5-7b --device cuda
    python -m llava.demo --visual-pruning none --kv-pruning none      # the unpruned baseline

It runs exactly what a benchmark script runs, on 12 questions about 4 generated images
(``playground/data/eval/pope-mini``, POPE's official layout): the runner core writes an answers file with token
statistics per sample, then the POPE scorer (``python -m eval.pope``) turns it into a result JSON. Printed: every
answer with its token counts, POPE's metric table, and the mean token counts (visual tokens kept of those before
stage 1, the inflection point i*, prompt length, generated tokens, KV entries per layer after stage 2).

With no --model-path it writes a tiny random LLaVA-1.5 checkpoint (original release format) to
checkpoints/llava-v1.5-tiny and uses it, so the answers are noise: the point is the pipeline and the counts.
Unless pruning flags are given, both stages run with the paper's settings (long-tail visual pruning, alpha 0.24;
H2O KV eviction, 0.5 / 0.5). A question file without POPE categories (e.g. playground/demo/questions.jsonl) is
answered and listed, not scored.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from llava.eval.model_vqa_loader import read_question_lines
from llava.eval.runner import RunnerInputError, check_images_exist, model_generate_fn, run
from llava.utils import add_model_args, load_from_args, quiet_transformers
from pruning import add_pruning_args, pruning_overrides

REPO = Path(__file__).resolve().parents[1]
MINI_POPE = REPO / "playground" / "data" / "eval" / "pope-mini"
TINY = REPO / "checkpoints" / "llava-v1.5-tiny"
OUTPUT = REPO / "output" / "demo"
BOTH_STAGES = {"visual_pruning": "longtail", "kv_pruning": "h2o"}
TOKEN_COLUMNS = [
    ("visual_before", "visual before"),
    ("visual_after", "visual kept"),
    ("inflection", "i*"),
    ("prompt", "prompt"),
    ("generated", "generated"),
    ("kv_final", "KV final"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    for action in parser._actions:
        if action.dest == "model_path":
            action.required = False
            action.default = None
            action.help = "LLaVA checkpoint (default: the tiny random one, built on first use)"
    parser.add_argument("--question-file", default=str(MINI_POPE / "llava_pope_test.jsonl"))
    parser.add_argument("--image-folder", default=str(MINI_POPE / "val2014"))
    parser.add_argument("--annotation-dir", default=str(MINI_POPE / "coco"), help="POPE label files to score with")
    parser.add_argument("--output-dir", default=str(OUTPUT), help="answers file and result JSON go here")
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


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def answers_table(rows: list[dict[str, Any]], categories: dict[str, str]) -> str:
    header = ["id", "category", "question", "answer", *(title for _, title in TOKEN_COLUMNS)]
    table = []
    for row in rows:
        question = row["prompt"].split("\n")[0]
        answer = "".join(c if c.isprintable() else "?" for c in row["text"])[:20]  # the tiny model's noise
        tokens = row.get("tokens") or {}
        table.append(
            [row["question_id"], categories.get(str(row["question_id"]), "-"), question, answer]
            + [tokens.get(key) for key, _ in TOKEN_COLUMNS]
        )
    return format_table(header, table)


def score_pope(args: argparse.Namespace, answers: Path, result_json: Path) -> dict[str, Any]:
    """The scorer runs as its own command, as in the benchmark scripts (eval/ only reads files)."""
    command = [sys.executable, "-m", "eval.pope", "--annotation-dir", args.annotation_dir]
    command += ["--question-file", args.question_file, "--result-file", str(answers), "--result-json", str(result_json)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: the POPE scorer failed:\n{done.stderr.strip()}")
    print(done.stdout.strip())
    return json.loads(result_json.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_transformers()
    if args.model_path is None:
        args.model_path = str(ensure_tiny_checkpoint())
    overrides = pruning_overrides(args) or dict(BOTH_STAGES)
    try:
        samples = read_question_lines(args.question_file, args.image_folder)
        check_images_exist(samples)
    except (RunnerInputError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    questions = [json.loads(line) for line in Path(args.question_file).read_text(encoding="utf-8").splitlines() if line]
    categories = {str(q["question_id"]): q["category"] for q in questions if isinstance(q.get("category"), str)}

    tokenizer, model, processor, _ = load_from_args(args, overrides)
    print(f"model: {args.model_path}\npruning: {model.pruning_config.describe()}")
    print(f"questions: {args.question_file} ({len(samples)})\n")
    output = Path(args.output_dir)
    answers = output / "answers.jsonl"
    generate = model_generate_fn(
        args.conv_mode, tokenizer, model, processor, temperature=0.0, max_new_tokens=args.max_new_tokens
    )
    try:
        run(samples, answers, generate, Path(args.model_path).name, args.batch_size, overwrite=True, progress=False)
    except RunnerInputError as err:
        raise SystemExit(f"error: {err}") from None
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    print(answers_table(rows, categories) + "\n")

    scorable = len(categories) == len(questions) and any(Path(args.annotation_dir).glob("coco_pope_*.json"))
    if not scorable:
        print(f"answers: {answers} (not scored: the questions have no POPE categories or labels)")
        return {"answers": rows}
    result = score_pope(args, answers, output / "result.json")
    means = result["tokens"]
    print("\nmean token counts per question (the numbers the paper prints in parentheses):")
    print(format_table([title for _, title in TOKEN_COLUMNS], [[means.get(key) for key, _ in TOKEN_COLUMNS]]))
    print(f"\nPOPE mean F1 {result['headline']:.2f}; answers: {answers}; result: {output / 'result.json'}")
    return result


if __name__ == "__main__":
    main()
