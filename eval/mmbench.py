"""MMBench (en/cn): the OpenCompass submission .xlsx, plus local single-pass and circular accuracy on dev.

Submission (upstream scripts/convert_mmbench_for_submission.py): the TSV without the hint, category, source, image,
comment and l2-category columns, with a ``prediction`` column (the raw round-0 answer) inserted after the options;
the test split is scored by the OpenCompass server, so without an ``answer`` column the headline is null.

Local accuracy (TSV with an ``answer`` column, e.g. dev): answers are matched by (question_id = TSV ``index``,
``round_id``). Single-pass accuracy scores round 0 of every TSV row. Circular accuracy (MMBench's CircularEval,
the headline) counts a question right only when every copy of it is right: the option-rotated TSV rows (index + k *
1_000_000) and, for answers from ``--all-rounds`` runs, every rotation round of each row. A letter predicted in
round r is mapped back to the original option through the answer's ``option_char`` (or the rotation itself).
Unanswered rows or rounds, runner errors and unreadable answers count wrong and are reported.

Letter extraction is VLMEvalKit's exact-matching policy, the step its MMBench evaluation takes before (and, without
a judge model, instead of) asking a GPT to map the answer: ``can_infer`` = ``can_infer_option``, then
``can_infer_text``, in vlmeval/utils/matching_util.py of open-compass/VLMEvalKit at commit
e8e78f05f3080fe28154f2130321f17951c3be94 (the file as of 2cf2a36c). The valid letters are those of the shown options.
  1. Refusals ("Cannot determine the answer", ...) pick nothing.
  2. The marks ``.()[],:;!*#{}`` become spaces and the answer is split into words. If exactly one valid letter is a
     word and its first occurrence is among the last four words, it is the answer: "B", "(B) cat", "A is correct.",
     "A is the answer", "I pick B here". A lone "Z" with no letter picks nothing.
  3. "answer is B" / "correct answer is **B**" (any case) picks B when B is valid. Like VLMEvalKit this reads the
     first letter after "answer is", so "The answer is a dog" picks A and "answer is definitely" picks D.
  4. Otherwise, unless the answer is longer than twice the options' total length, the one option whose text it
     contains (case-insensitive) is the answer; none or several pick nothing ("1000" contains "1", "10", "100").
An answer that picks nothing counts wrong ("unparsed"): "答案是B", "A dog and a bird" (the letter comes too early).

    python -m eval.mmbench --annotation-file mmbench_dev_20230712.tsv --result-file answers/mmbench_dev/ckpt.jsonl
        --upload-dir answers_upload/mmbench_dev --experiment ckpt [--lang en|cn] [--result-json results/ckpt.json]
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd

from eval.common import (
    EvalInputError,
    answer_text,
    check_known_ids,
    format_table,
    id_list,
    ratio,
    read_jsonl,
    run_cli,
    token_means,
    write_result,
)

OPTION_COLUMNS = ("A", "B", "C", "D")
DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
CIRCULAR_STRIDE = 1_000_000
SERVER_NOTE = "no answer column: MMBench test is scored by the OpenCompass server: submit the --upload-dir .xlsx"

# VLMEvalKit's constants (see the module docstring): answers that refuse, the marks that separate words, how close
# to the end a lone letter must stand, and its "answer is X" pattern (no word boundary after the letter).
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
API_FAILURE = "Failed to obtain answer via API"
_WORD_MARKS = re.compile(r"[.()\[\],:;!*#{}]")
LETTER_WITHIN_LAST = 4
_ANSWER_IS = re.compile(r"(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", re.IGNORECASE)
NO_CHOICE = "Z"  # VLMEvalKit's "no option": ends the search, counts wrong


def letter_from_words(text: str, letters: str) -> str | None:
    """VLMEvalKit's can_infer_option: a valid letter, NO_CHOICE, or None to go on to the option texts."""
    if API_FAILURE in text:
        return None
    if any(refusal in text for refusal in REFUSALS):
        return NO_CHOICE
    words = _WORD_MARKS.sub(" ", text).split()
    named = [letter for letter in letters if letter in words]
    if len(named) == 1 and words.index(named[0]) >= len(words) - LETTER_WITHIN_LAST:
        return named[0]
    if not named and NO_CHOICE in words:
        return NO_CHOICE
    match = _ANSWER_IS.search(text)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    return None


def letter_from_option_text(text: str, options: list[str], letters: str) -> str | None:
    """VLMEvalKit's can_infer_text: the only option whose text a not-too-long answer contains."""
    lowered = text.lower()
    if len(lowered) > 2 * sum(len(option) for option in options):
        return None
    found = [letter for letter, option in zip(letters, options, strict=True) if option.lower() in lowered]
    return found[0] if len(found) == 1 else None


def extract_letter(text: str, options: list[str]) -> str | None:
    """The option letter an answer picks, by the rules in the module docstring (None when it picks none)."""
    letters = "".join(OPTION_COLUMNS[: len(options)])
    letter = letter_from_words(text, letters)
    if letter == NO_CHOICE:
        return None
    return letter or letter_from_option_text(text, options, letters)


def is_none(value: Any) -> bool:
    """Upstream's test for an absent option or hint: None, NaN, or the strings "nan"/"none"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.strip().lower() in ("nan", "none")


def load_tsv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise EvalInputError(f"file not found: {path}")
    # Text columns stay text ("3" must not become 3.0); absent cells stay NaN, as upstream reads them.
    frame = pd.read_csv(path, sep="\t", dtype=str)
    missing = [c for c in ("index", "question", "A", "B") if c not in frame.columns]
    if missing:
        raise EvalInputError(f"{path}: missing MMBench columns {missing} (has {list(frame.columns)})")
    bad = [value for value in frame["index"] if not isinstance(value, str) or not value.strip().isdigit()]
    if bad:
        raise EvalInputError(f"{path}: index values that are not integers: {id_list(bad)}")
    frame["index"] = [int(value) for value in frame["index"]]
    return frame


def questions_from(frame: pd.DataFrame, path: Path) -> list[dict[str, Any]]:
    has_answers = "answer" in frame.columns and not frame["answer"].map(is_none).all()
    l2_column = next((c for c in frame.columns if c.lower() == "l2-category"), None)
    questions = []
    for row in frame.to_dict("records"):
        index = int(row["index"])
        options = []
        for column in OPTION_COLUMNS:
            if column not in row or is_none(row[column]):
                break
            options.append(str(row[column]))
        question = {
            "index": index,
            "options": options,
            "category": str(row.get("category", "")),
            "l2": str(row[l2_column]) if l2_column else None,
            "answer": None,
        }
        if has_answers:
            answer = row["answer"]
            if is_none(answer) or str(answer).strip() not in OPTION_COLUMNS[: len(options)]:
                raise EvalInputError(f"{path}: index {index}: answer {answer!r} is not one of its option letters")
            question["answer"] = str(answer).strip()
        questions.append(question)
    indices = [q["index"] for q in questions]
    if len(set(indices)) != len(indices):
        raise EvalInputError(
            f"{path}: repeated index values, e.g. {id_list(i for i in indices if indices.count(i) > 1)}"
        )
    return questions


def answers_by_round(rows: list[dict[str, Any]], source: str) -> dict[tuple[str, int], dict[str, Any]]:
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        if "question_id" not in row:
            raise EvalInputError(f"{source}: answer line without question_id: {str(row)[:120]}")
        round_id = row.get("round_id", 0)
        if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 0:
            raise EvalInputError(f"{source}: question_id {row['question_id']!r}: round_id {round_id!r} is not >= 0")
        key = (str(row["question_id"]), round_id)
        if key in out:
            raise EvalInputError(f"{source}: question_id {row['question_id']!r} round {round_id} answered twice")
        out[key] = row
    return out


def judge(question: dict[str, Any], answer: dict[str, Any] | None, round_id: int, source: str) -> str:
    """'right', 'wrong', 'unparsed', 'error' or 'missing' for one round of one TSV row."""
    if answer is None:
        return "missing"
    text = answer_text(answer, source)
    if text is None:
        return "error"
    n = len(question["options"])
    shown = answer.get("options") or question["options"][round_id:] + question["options"][:round_id]
    letter = extract_letter(text, [str(option) for option in shown])
    if letter is None:
        return "unparsed"
    chars = answer.get("option_char") or list(OPTION_COLUMNS[:n][round_id:] + OPTION_COLUMNS[:n][:round_id])
    position = OPTION_COLUMNS.index(letter) if letter in OPTION_COLUMNS else len(chars)
    original = chars[position] if position < len(chars) else None
    return "right" if original == question["answer"] else "wrong"


def accuracy_by(groups: dict[str, list[bool]]) -> dict[str, float]:
    return {name: 100.0 * ratio(sum(marks), len(marks)) for name, marks in sorted(groups.items())}


def group_names(question: dict[str, Any]) -> list[str]:
    names = ["overall", f"category/{question['category']}"]
    return names + ([f"l2/{question['l2']}"] if question["l2"] is not None else [])


def local_accuracy(
    questions: list[dict[str, Any]], answers: dict[tuple[str, int], dict[str, Any]], source: str
) -> dict[str, Any]:
    all_rounds = any(round_id > 0 for _, round_id in answers)
    outcomes: dict[str, int] = defaultdict(int)
    single: dict[str, list[bool]] = defaultdict(list)
    circular_rows: dict[int, list[bool]] = defaultdict(list)
    first_row: dict[int, dict[str, Any]] = {}
    missing = []
    for question in questions:
        rounds = range(len(question["options"])) if all_rounds else range(1)
        verdicts = [judge(question, answers.get((str(question["index"]), r)), r, source) for r in rounds]
        for round_id, verdict in zip(rounds, verdicts, strict=True):
            outcomes[verdict] += 1
            if verdict == "missing":
                missing.append((question["index"], round_id))
        for name in group_names(question):
            single[name].append(verdicts[0] == "right")
        group = question["index"] % CIRCULAR_STRIDE
        circular_rows[group].append(all(v == "right" for v in verdicts))
        first_row.setdefault(group, question)
    circular: dict[str, list[bool]] = defaultdict(list)
    for group, marks in circular_rows.items():
        for name in group_names(first_row[group]):
            circular[name].append(all(marks))
    return {
        "single_pass": accuracy_by(single),
        "circular": accuracy_by(circular),
        "rows": len(questions),
        "questions": len(circular_rows),
        "all_rounds": all_rounds,
        "outcomes": dict(sorted(outcomes.items())),
        "missing_ids": missing,
    }


def _xlsx_safe(text: str | None) -> str | None:
    """Excel cells cannot hold most ASCII control characters; a model can emit them, so drop them."""
    if text is None:
        return None
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    return ILLEGAL_CHARACTERS_RE.sub("", text)


def write_submission(frame: pd.DataFrame, answers: dict[tuple[str, int], dict[str, Any]], path: Path) -> None:
    dropped = [c for c in frame.columns if c.lower() in DROPPED_COLUMNS]
    table = frame.drop(columns=dropped)
    predictions = []
    for index in frame["index"]:
        answer = answers.get((str(index), 0))
        text = None if answer is None or answer.get("error") is not None else answer.get("text")
        predictions.append(_xlsx_safe(text))
    table.insert(min(6, len(table.columns)), "prediction", predictions)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_excel(path, index=False, engine="openpyxl")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m eval.mmbench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotation-file", required=True, type=Path, help="MMBench TSV (e.g. mmbench_dev_20230712)")
    source_group = parser.add_mutually_exclusive_group(required=True)
    source_group.add_argument("--result-file", type=Path, help="answers JSON lines")
    source_group.add_argument("--result-dir", type=Path, help="upstream style: answers in <dir>/<experiment>.jsonl")
    parser.add_argument("--upload-dir", type=Path, help="write <upload-dir>/<experiment>.xlsx for OpenCompass")
    parser.add_argument("--experiment", help="checkpoint name (default: the answers file name)")
    parser.add_argument("--lang", choices=("en", "cn"), default="en")
    parser.add_argument("--result-json", type=Path, help="this project's result JSON (for eval.tables)")
    args = parser.parse_args(argv)
    if args.result_dir and not args.experiment:
        parser.error("--result-dir needs --experiment")
    result_file = args.result_file or args.result_dir / f"{args.experiment}.jsonl"
    experiment = args.experiment or result_file.stem
    source = str(result_file)

    frame = load_tsv(args.annotation_file)
    questions = questions_from(frame, args.annotation_file)
    rows = read_jsonl(result_file)
    answers = answers_by_round(rows, source)
    known = {(str(q["index"]), r) for q in questions for r in range(max(1, len(q["options"])))}
    check_known_ids(answers, known, f"{source} (against {args.annotation_file})")
    if args.upload_dir:
        write_submission(frame, answers, args.upload_dir / f"{experiment}.xlsx")
        print(f"wrote {args.upload_dir / f'{experiment}.xlsx'}")

    benchmark = "mmbench" if args.lang == "en" else "mmbench_cn"
    if questions and questions[0]["answer"] is None:
        print(SERVER_NOTE)
        metrics = {"rows": len(questions), "answered": len(answers)}
        return write_result(
            args.result_json,
            benchmark,
            metrics,
            None,
            len(questions),
            token_means(rows),
            result_file=source,
            headline_note=SERVER_NOTE,
        )
    found = local_accuracy(questions, answers, source)
    names = sorted(set(found["single_pass"]) | set(found["circular"]), key=lambda n: (n != "overall", n))
    table = [[name, found["single_pass"].get(name, ""), found["circular"].get(name, "")] for name in names]
    print(format_table(["split", "single-pass %", "circular %"], table))
    print(
        f"{found['rows']} rows, {found['questions']} questions, all rounds: {found['all_rounds']}; {found['outcomes']}"
    )
    if found["missing_ids"]:
        print(
            f"{len(found['missing_ids'])} (index, round) without answer (counted wrong): {id_list(found['missing_ids'])}"
        )
    metrics = {k: v for k, v in found.items() if k != "missing_ids"}
    return write_result(
        args.result_json,
        benchmark,
        metrics,
        headline=found["circular"]["overall"],
        count=found["questions"],
        tokens=token_means(rows),
        result_file=source,
    )


if __name__ == "__main__":
    run_cli(main)
