"""MM-Vet: the file for the official grader, and a GPT grader that follows MM-Vet's protocol.

Two jobs, as in upstream LLaVA (``scripts/convert_mmvet_for_eval.py`` then MM-Vet's own grader):

* ``--out-json`` writes ``{"v1_<question_id>": answer}`` for every question, ready for MM-Vet's notebook or its
  online evaluator. A question without an answer, or whose answer line carries ``error``, gets ``""``.
* ``--grade`` asks a judge model for a 0.0-1.0 correctness score per answer with MM-Vet's few-shot table prompt
  (``eval/rules/mmvet.json``: ground truth with ``<AND>``/``<OR>``), retrying at a higher temperature when the reply
  is not a score. Reports the total and the six capabilities (rec, ocr, know, gen, spat, math) x100, plus every
  capability combination, and writes the result JSON. Missing and failed answers score 0 without asking the judge.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from eval.common import (
    EvalInputError,
    answers_by_id,
    format_table,
    read_json,
    read_jsonl,
    token_means,
    write_result,
)
from eval.judge import Judge, JudgeError, add_judge_args, default_cache_path, judge_from_args

CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
PROMPT_FILE = Path(__file__).resolve().parent / "rules" / "mmvet.json"
_SCORE = re.compile(
    r"^(?:correctness(?:\s+score)?\s*[:=]?\s*)?(\d+(?:\.\d+)?|\.\d+)(?=$|\s|[,;]|\.(?!\d))", re.IGNORECASE
)


def mmvet_key(question_id: Any) -> str:
    """MM-Vet's sample id: LLaVA numbers questions 0..217, MM-Vet calls them v1_0..v1_217."""
    text = str(question_id)
    return text if text.startswith("v1_") else f"v1_{text}"


def load_prompt(path: str | Path = PROMPT_FILE) -> dict[str, Any]:
    rules = read_json(path)
    for name in ("instruction", "header", "examples"):
        if name not in rules:
            raise EvalInputError(f"{path}: MM-Vet prompt file lacks {name!r}")
    return rules


def build_prompt(rules: dict[str, Any], question: str, ground_truth: str, prediction: str) -> str:
    """The few-shot table with the graded sample as its last row and the score cell left empty."""
    header = rules["header"]
    rows = [" | ".join(header), " | ".join("---" for _ in header)]
    for ex in rules["examples"]:
        rows.append(" | ".join([ex["question"], spaced(ex["ground_truth"]), ex["prediction"], ex["score"]]))
    rows.append(" | ".join([question, spaced(ground_truth), prediction, ""]))
    return rules["instruction"] + "\n\n" + "\n".join(rows)


def spaced(ground_truth: str) -> str:
    """Put spaces around <AND>/<OR> so the judge reads them as separators, not as part of a word."""
    text = ground_truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return re.sub(r"\s+", " ", text).strip()


def parse_score(reply: str) -> float | None:
    """A correctness score in [0, 1] at the start of the reply, or None (the caller asks again)."""
    match = _SCORE.match(reply.strip())
    if match is None:
        return None
    value = float(match.group(1))
    return value if 0.0 <= value <= 1.0 else None


def capabilities_of(sample: dict[str, Any], key: str) -> list[str]:
    caps = sample.get("capability")
    if isinstance(caps, str):
        caps = [c.strip() for c in caps.split(",") if c.strip()]
    if not isinstance(caps, list) or not caps:
        raise EvalInputError(f"mm-vet.json: {key} has no capability list")
    return caps


def official_results(questions: list[dict[str, Any]], answers: dict[Any, dict[str, Any]]) -> dict[str, str]:
    out = {}
    for q in questions:
        ans = answers.get(q["question_id"])
        out[mmvet_key(q["question_id"])] = "" if ans is None or ans.get("error") else str(ans.get("text", ""))
    return out


def grade_one(
    judge: Judge,
    rules: dict[str, Any],
    sample: dict[str, Any],
    prediction: str,
    attempts: int,
    temperature_step: float,
    max_tokens: int,
) -> tuple[float | None, list[str]]:
    """Score one prediction; each unparsable reply is retried at a higher temperature, up to ``attempts``."""
    prompt = build_prompt(rules, sample["question"], sample["answer"], prediction)
    replies = []
    for attempt in range(attempts):
        temperature = min(2.0, attempt * temperature_step)
        reply = judge.complete([{"role": "user", "content": prompt}], temperature=temperature, max_tokens=max_tokens)
        replies.append(reply)
        score = parse_score(reply)
        if score is not None:
            return score, replies
    return None, replies


def grade(
    questions: list[dict[str, Any]],
    answers: dict[Any, dict[str, Any]],
    ground_truth: dict[str, dict[str, Any]],
    judge: Judge,
    *,
    rules: dict[str, Any],
    attempts: int = 5,
    temperature_step: float = 0.5,
    max_tokens: int = 16,
) -> dict[str, dict[str, Any]]:
    """Per-question records {score, status, capability, replies}; status is ok/missing/error/parse_failure."""
    records: dict[str, dict[str, Any]] = {}
    for q in questions:
        key = mmvet_key(q["question_id"])
        sample = ground_truth[key]
        record: dict[str, Any] = {"capability": capabilities_of(sample, key), "score": 0.0}
        ans = answers.get(q["question_id"])
        if ans is None:
            record["status"] = "missing"
        elif ans.get("error"):
            record.update(status="error", error=str(ans["error"]))
        else:
            score, replies = grade_one(
                judge, rules, sample, str(ans.get("text", "")), attempts, temperature_step, max_tokens
            )
            record["replies"] = replies
            if score is None:
                record["status"] = "parse_failure"
                print(f"warning: {key}: no score in {attempts} judge replies; scored 0", file=sys.stderr)
            else:
                record.update(status="ok", score=score)
        records[key] = record
    return records


def summarize(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """MM-Vet's numbers: mean score x100 overall, per capability and per capability combination."""
    if not records:
        raise EvalInputError("no MM-Vet questions to summarize")
    per_cap: dict[str, list[float]] = defaultdict(list)
    per_set: dict[str, list[float]] = defaultdict(list)
    for rec in records.values():
        for cap in rec["capability"]:
            per_cap[cap].append(rec["score"])
        per_set[",".join(sorted(rec["capability"]))].append(rec["score"])
    scores = [rec["score"] for rec in records.values()]
    metrics: dict[str, Any] = {"total": 100.0 * sum(scores) / len(scores)}
    for cap in (*CAPABILITIES, *sorted(set(per_cap) - set(CAPABILITIES))):
        if per_cap.get(cap):
            metrics[cap] = 100.0 * sum(per_cap[cap]) / len(per_cap[cap])
    metrics["by_capability_set"] = {k: 100.0 * sum(v) / len(v) for k, v in sorted(per_set.items())}
    for status in ("ok", "missing", "error", "parse_failure"):
        metrics[status] = sum(1 for rec in records.values() if rec["status"] == status)
    return metrics


def load_inputs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[Any, dict[str, Any]], list[dict]]:
    questions = read_jsonl(args.question_file)
    for number, q in enumerate(questions, 1):
        if "question_id" not in q:
            raise EvalInputError(f"{args.question_file}:{number}: question without question_id")
    known = {mmvet_key(q["question_id"]): q["question_id"] for q in questions}
    rows = read_jsonl(args.result_file)
    answers = {}
    for key, row in answers_by_id(rows, str(args.result_file)).items():
        if mmvet_key(key) not in known:
            raise EvalInputError(f"{args.result_file}: answer for unknown question_id {key!r}")
        answers[known[mmvet_key(key)]] = row
    return questions, answers, rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.mmvet",
        description="MM-Vet: write the official grader's JSON and/or grade with a GPT judge (MM-Vet protocol).",
    )
    parser.add_argument("--question-file", required=True, help="llava-mm-vet.jsonl")
    parser.add_argument("--result-file", "--src", required=True, help="answers JSON lines from the runner")
    parser.add_argument("--out-json", "--dst", default=None, help='official grader input {"v1_<id>": answer}')
    parser.add_argument("--grade", action="store_true", help="grade with the GPT judge (needs --mmvet-json)")
    parser.add_argument("--mmvet-json", default=None, help="MM-Vet's mm-vet.json (question, answer, capability)")
    parser.add_argument("--result-json", default=None, help="result JSON of the graded run (required with --grade)")
    parser.add_argument("--prompt-file", default=str(PROMPT_FILE), help="grader prompt data (default: ours)")
    parser.add_argument("--grade-attempts", type=int, default=5, help="judge tries per answer when no score parses")
    parser.add_argument("--temperature-step", type=float, default=0.5, help="temperature added on each retry")
    parser.add_argument("--max-tokens", type=int, default=16, help="max tokens of a judge reply")
    add_judge_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out_json is None and not args.grade:
        raise SystemExit("nothing to do: pass --out-json and/or --grade")
    if args.grade and (args.mmvet_json is None or args.result_json is None):
        raise SystemExit("--grade needs --mmvet-json (ground truth) and --result-json (where the scores go)")
    if args.grade_attempts < 1:
        raise SystemExit(f"--grade-attempts must be >= 1, got {args.grade_attempts}")
    try:
        questions, answers, rows = load_inputs(args)
        missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
        if missing:
            print(f"warning: {len(missing)} questions have no answer (scored 0), e.g. {missing[:5]}", file=sys.stderr)
        if args.out_json is not None:
            out = Path(args.out_json)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(official_results(questions, answers), indent=2, ensure_ascii=False) + "\n")
            print(f"wrote {out} ({len(questions)} answers for MM-Vet's grader)")
        if not args.grade:
            return 0
        ground_truth = read_json(args.mmvet_json)
        absent = [mmvet_key(q["question_id"]) for q in questions if mmvet_key(q["question_id"]) not in ground_truth]
        if absent:
            raise EvalInputError(f"{args.mmvet_json}: no ground truth for {len(absent)} questions, e.g. {absent[:5]}")
        judge = judge_from_args(args, default_cache_path(args.result_json))
        records = grade(
            questions,
            answers,
            ground_truth,
            judge,
            rules=load_prompt(args.prompt_file),
            attempts=args.grade_attempts,
            temperature_step=args.temperature_step,
            max_tokens=args.max_tokens,
        )
    except (EvalInputError, JudgeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = summarize(records)
    print(format_table(["capability", "score"], [[k, metrics[k]] for k in ("total", *CAPABILITIES) if k in metrics]))
    print(
        f"graded {metrics['ok']}, missing {metrics['missing']}, failed answers {metrics['error']}, "
        f"unparsed judge replies {metrics['parse_failure']}; judge requests {judge.requests}, "
        f"cache hits {judge.cache_hits}"
    )
    write_result(
        args.result_json,
        "mmvet",
        metrics,
        metrics["total"],
        len(records),
        token_means(rows),
        result_file=args.result_file,
        judge=judge.describe(),
        per_question=records,
    )
    print(f"wrote {args.result_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
