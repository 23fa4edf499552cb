"""ScienceQA scorer: LLaVA's answer parsing and IMG accuracy, plus the official ScienceQA breakdown.

LLaVA-1.5 reports IMG accuracy (problems shown with an image), so that is the headline; total accuracy and the
official breakdown (subject, context modality, grade) come with it. Differences from upstream's
eval_science_qa.py, on purpose: answers are matched by problem id and an answer to a problem outside the split is
an error; a problem of the split with no answer counts wrong *and stays in the IMG denominator* (upstream takes
IMG-ness from the answer's prompt, so an unanswered image problem silently left the IMG count); runner failures
(``error`` lines) count wrong.

    python -m eval.sqa --base-dir scienceqa --result-file answers/ckpt.jsonl [--split test]
        [--output-file answers/ckpt_output.jsonl] [--output-result answers/ckpt_result.json]
        [--result-json results/ckpt.json]
"""

from __future__ import annotations

import argparse
import json
import re
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

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
# Upstream's pattern, unescaped dot included: "The answer is B." and "The answer is B," both parse.
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")

SUBJECTS = {"NAT": "natural science", "SOC": "social science", "LAN": "language science"}
GRADES = {"G1-6": {f"grade{g}" for g in range(1, 7)}, "G7-12": {f"grade{g}" for g in range(7, 13)}}


def parse_answer(text: str | None) -> str:
    """Upstream's rule: the bare letter, a "X. ..." prefix, or exactly one "The answer is X."; else FAILED."""
    if text is None:
        return FAILED
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def predicted_index(letter: str, n_choices: int) -> int:
    """-1 for FAILED or a letter beyond the problem's choices: never equal to the answer index."""
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


def context_groups(problem: dict[str, Any]) -> list[str]:
    """The official context-modality groups: TXT (has a hint), IMG (has an image), NO (neither)."""
    groups = []
    if problem.get("hint"):
        groups.append("TXT")
    if problem.get("image"):
        groups.append("IMG")
    return groups or ["NO"]


def load_split(base_dir: Path, split: str) -> dict[str, dict[str, Any]]:
    problems = read_json(base_dir / "problems.json")
    splits = read_json(base_dir / "pid_splits.json")
    if split not in splits:
        raise EvalInputError(f"{base_dir / 'pid_splits.json'}: no split {split!r} (has {sorted(splits)})")
    out = {}
    for pid in splits[split]:
        pid = str(pid)
        problem = problems.get(pid)
        if problem is None:
            raise EvalInputError(f"{base_dir / 'problems.json'}: problem {pid!r} of split {split!r} is missing")
        choices, answer = problem.get("choices"), problem.get("answer")
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(OPTIONS):
            raise EvalInputError(f"{base_dir / 'problems.json'}: problem {pid!r}: 'choices' must list 2-5 options")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise EvalInputError(
                f"{base_dir / 'problems.json'}: problem {pid!r}: 'answer' {answer!r} is not a choice index"
            )
        out[pid] = problem
    return out


def score(problems: dict[str, dict[str, Any]], answers: dict[str, dict[str, Any]], source: str) -> dict[str, Any]:
    """Per-problem outcomes plus the accuracy table; see the module docstring for the counting rules."""
    check_known_ids(answers, problems, source)
    records = []
    for pid, problem in problems.items():
        answer = answers.get(pid)
        text = None if answer is None else answer_text(answer, source)
        letter = parse_answer(text)
        index = predicted_index(letter, len(problem["choices"]))
        prompt = None if answer is None else answer.get("prompt")
        # Upstream's IMG rule reads the prompt; a problem without an answer falls back to problems.json.
        multimodal = "<image>" in prompt if isinstance(prompt, str) else bool(problem.get("image"))
        records.append(
            {
                "question_id": pid,
                "parsed_ans": letter,
                "pred_idx": index,
                "ground_truth": OPTIONS[problem["answer"]],
                "question": prompt if isinstance(prompt, str) else "Unknown",
                "pred": text if text is not None else FAILED,
                "is_multimodal": multimodal,
                "correct": index == problem["answer"],
                "missing": answer is None,
                "error": answer is not None and text is None,
            }
        )
    return {"records": records, "metrics": metrics(records, problems)}


def metrics(records: list[dict[str, Any]], problems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def accuracy(selected: list[dict[str, Any]]) -> float:
        return 100.0 * ratio(sum(r["correct"] for r in selected), len(selected))

    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        problem = problems[record["question_id"]]
        names = [key for key, subject in SUBJECTS.items() if problem.get("subject") == subject]
        names += context_groups(problem)
        names += [key for key, grades in GRADES.items() if problem.get("grade") in grades]
        for name in names:
            groups.setdefault(name, []).append(record)
    img = [r for r in records if r["is_multimodal"]]
    return {
        "accuracy": accuracy(records),
        "img_accuracy": accuracy(img),
        "correct": sum(r["correct"] for r in records),
        "total": len(records),
        "img_total": len(img),
        "failed_parse": sum(r["parsed_ans"] == FAILED for r in records),
        "missing": sum(r["missing"] for r in records),
        "errors": sum(r["error"] for r in records),
        "breakdown": {
            name: accuracy(groups.get(name, [])) for name in [*SUBJECTS, "TXT", "IMG", "NO", *GRADES] if name in groups
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m eval.sqa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-dir", required=True, type=Path, help="folder with problems.json and pid_splits.json")
    parser.add_argument("--result-file", required=True, type=Path, help="answers JSON lines")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output-file", type=Path, help="upstream's per-problem analysis (correct/incorrect lists)")
    parser.add_argument("--output-result", type=Path, help="upstream's result JSON (acc, correct, count, results)")
    parser.add_argument("--result-json", type=Path, help="this project's result JSON (for eval.tables)")
    args = parser.parse_args(argv)

    rows = read_jsonl(args.result_file)
    problems = load_split(args.base_dir, args.split)
    scored = score(problems, answers_by_str_id(rows, str(args.result_file)), str(args.result_file))
    records, found = scored["records"], scored["metrics"]

    table = [["Total", found["total"], found["correct"], found["accuracy"]]]
    table.append(["IMG", found["img_total"], "", found["img_accuracy"]])
    table += [[name, "", "", value] for name, value in found["breakdown"].items()]
    print(format_table(["split " + args.split, "count", "correct", "accuracy %"], table))
    missing = [r["question_id"] for r in records if r["missing"]]
    if missing:
        print(f"{len(missing)} problems have no answer (counted wrong): {id_list(missing)}")
    print(f"unparseable answers (FAILED, counted wrong): {found['failed_parse']}; runner errors: {found['errors']}")

    if args.output_file:
        keep = ("question_id", "parsed_ans", "ground_truth", "question", "pred", "is_multimodal")
        analysis = {
            verdict: [{k: r[k] for k in keep} for r in records if r["correct"] == (verdict == "correct")]
            for verdict in ("correct", "incorrect")
        }
        args.output_file.parent.mkdir(parents=True, exist_ok=True)
        args.output_file.write_text(json.dumps(analysis, indent=2) + "\n", encoding="utf-8")
    if args.output_result:
        upstream = {
            "acc": found["accuracy"],
            "correct": found["correct"],
            "count": found["total"],
            "results": {r["question_id"]: r["pred_idx"] for r in records},
            "outputs": {r["question_id"]: r["pred"] for r in records},
        }
        args.output_result.parent.mkdir(parents=True, exist_ok=True)
        args.output_result.write_text(json.dumps(upstream, indent=2) + "\n", encoding="utf-8")
    return write_result(
        args.result_json,
        "sqa",
        found,
        headline=found["img_accuracy"],
        count=found["total"],
        tokens=token_means(rows),
        result_file=str(args.result_file),
    )


if __name__ == "__main__":
    run_cli(main)
