"""MMBench / MMBench-CN: multiple choice from the official TSV, images inline as base64.

    python -m llava.eval.model_vqa_mmbench --model-path liuhaotian/llava-v1.5-7b \\
        --question-file playground/data/eval/mmbench/mmbench_dev_20230712.tsv \\
        --answers-file playground/data/eval/mmbench/answers/mmbench_dev_20230712/llava-v1.5-7b.jsonl \\
        --single-pred-prompt --lang en --temperature 0 --conv-mode vicuna_v1 [--all-rounds]

Prompt as upstream: ``[hint\\n]question\\nA. ...\\nB. ...`` (options from columns A-D up to the first empty, "nan"
or "none" cell), then the single-prediction instruction in English or Chinese. ``--all-rounds`` asks every
question once per rotation of its options (circular evaluation); answer lines carry ``round_id``, the rotated
``options`` and ``option_char`` (which original letter each shown letter stands for). A row whose ``image`` cell
is a short number reuses the image of the row with that index (the compact TSVs of newer MMBench releases).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from llava.eval import runner
from llava.eval.runner import QuestionFormat, RunnerInputError, Sample
from llava.mm_utils import load_image_from_base64

OPTION_CHARS = ("A", "B", "C", "D")
INSTRUCTIONS = {
    "en": "Answer with the option's letter from the given choices directly.",
    "cn": "请直接回答选项字母。",
}
REQUIRED_COLUMNS = ("index", "question", "image")


def is_none(value: str | None) -> bool:
    return value is None or value.strip().lower() in ("", "nan", "none")


def read_tsv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, cells) rows; csv (not pandas) so a row with a wrong cell count stays one row."""
    csv.field_size_limit(2**31 - 1)  # base64 images are far longer than csv's default field limit
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise RunnerInputError(f"{path}: empty file, expected an MMBench TSV with a header row")
        rows = [(reader.line_num, cells) for cells in reader if any(cell.strip() for cell in cells)]
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise RunnerInputError(f"{path}: missing column(s) {missing}; found {header[:12]}")
    return header, rows


def question_id(raw: str) -> int | str:
    return int(raw) if raw.strip().lstrip("-").isdigit() else raw


def image_loader(data: str):
    return lambda: load_image_from_base64(data)


def read(args: argparse.Namespace) -> list[Sample]:
    path = Path(args.question_file)
    header, rows = read_tsv(path)
    column = {name: header.index(name) for name in header}
    images = {cells[column["index"]]: cells[column["image"]] for _, cells in rows if len(cells) == len(header)}
    instruction = INSTRUCTIONS[args.lang]
    samples = []
    for line, cells in rows:
        qid = question_id(cells[column["index"]]) if len(cells) > column["index"] else f"<line {line}>"
        where = f"{path} row at line {line}"
        if len(cells) != len(header):
            error = f"corrupt row: {len(cells)} cells, the header has {len(header)}"
            samples.append(Sample(qid, "", where, fields={"round_id": 0}, error=error))
            continue
        row = dict(zip(header, cells))
        options = []
        for char in OPTION_CHARS:
            if is_none(row.get(char)):
                break
            options.append(row[char])
        image = row["image"]
        if len(image) <= 64 and image.strip().isdigit() and image.strip() in images:
            image = images[image.strip()]
        if is_none(row["question"]) or not options or is_none(image):
            what = "question" if is_none(row["question"]) else "options in columns A-D" if not options else "image"
            samples.append(Sample(qid, "", where, fields={"round_id": 0}, error=f"corrupt row: no {what}"))
            continue
        body = row["question"] if is_none(row.get("hint")) else f"{row['hint']}\n{row['question']}"
        rounds = len(options) if args.all_rounds else 1
        for round_id in range(rounds):
            shown = options[round_id:] + options[:round_id]
            chars = list(OPTION_CHARS[: len(options)])
            prompt = body + "".join(f"\n{char}. {option}" for char, option in zip(chars, shown))
            text = f"{prompt}\n{instruction}" if args.single_pred_prompt else prompt
            fields = {
                "round_id": round_id,
                "prompt": prompt,
                "options": shown,
                "option_char": chars[round_id:] + chars[:round_id],
            }
            samples.append(Sample(qid, text, where, image=image_loader(image), fields=fields))
    return samples


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--single-pred-prompt", action="store_true", help="append the answer-with-a-letter line")
    parser.add_argument("--all-rounds", action="store_true", help="ask once per rotation of the options")
    parser.add_argument("--lang", choices=sorted(INSTRUCTIONS), default="en", help="language of the instruction")


FORMAT = QuestionFormat(
    "model_vqa_mmbench", read, temperature=0.2, max_new_tokens=128, add_args=add_args, plain_mmtag=True
)


def main(argv: list[str] | None = None) -> int:
    return runner.main(FORMAT, argv, __doc__)


if __name__ == "__main__":
    main()
