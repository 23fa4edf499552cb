"""LLaVA-Bench-in-the-Wild: GPT review of each answer against GPT-4's reference answer, then the summary.

The protocol of upstream's ``eval_gpt_review_bench.py`` + ``summarize_gpt_review.py``: for each question the judge
sees the image's context captions, the question, the reference answer as Assistant 1 and the model's answer as
Assistant 2, then the category's rule (``eval/rules/llavabench.json``, or upstream's ``rule.json`` via ``--rule``),
and must put two 1-10 scores on the first line of its reply. The headline is ``mean(model) / mean(reference) x100``
over all questions. Differences from upstream, all deliberate:

* questions, reference answers and model answers are matched by ``question_id``, never by line position;
* a reply whose first line is not two numbers is recorded as ``[-1, -1]`` with ``parse_error`` and left out of
  both means (upstream averages the -1s in), and it is reported;
* a missing answer, or an answer line with ``error``, is reviewed without asking the judge as ``[null, 0]``: the
  model scores 0 and the reference mean is taken over the questions the judge saw. If a later rerun finds a real
  answer for it, the question is reviewed then and the new line supersedes the old;
* the reviews file is appended to and flushed per question, so a rerun resumes where the last one stopped; a review
  of another answer than the one in the answers file now (``answer2_id`` differs: the answers were regenerated,
  e.g. with ``--overwrite`` and new settings) is stale: it is dropped from the file and the question reviewed again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from eval.common import (
    EvalInputError,
    append_jsonl,
    format_table,
    iter_jsonl,
    read_json,
    read_jsonl,
    token_means,
    write_result,
)
from eval.judge import Judge, JudgeError, add_judge_args, default_cache_path, judge_from_args

RULE_FILE = Path(__file__).resolve().parent / "rules" / "llavabench.json"
CATEGORIES = ("conv", "detail", "complex")
SYSTEM_PROMPT = "You are a careful and precise assistant who checks the quality of answers."
FAILED = [-1.0, -1.0]
_COLUMNS = ("relative", "gpt4", "model", "count", "parse_failures", "answer_failures")


def qid(value: Any) -> str:
    """Question ids compared as text, so 7 in one file matches "7" in another."""
    return str(value)


def index_by_id(rows: list[dict[str, Any]], source: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for number, row in enumerate(rows, 1):
        if "question_id" not in row:
            raise EvalInputError(f"{source}: line {number} has no question_id")
        key = qid(row["question_id"])
        if key in out:
            raise EvalInputError(f"{source}: question_id {row['question_id']!r} appears twice")
        out[key] = row
    return out


def load_contexts(path: str | Path) -> dict[str, str]:
    """Captions per image; a list of captions becomes one caption per line."""
    contexts: dict[str, str] = {}
    for number, row in enumerate(read_jsonl(path), 1):
        if "image" not in row or "caption" not in row:
            raise EvalInputError(f"{path}:{number}: context line needs 'image' and 'caption'")
        caption = row["caption"]
        contexts[row["image"]] = "\n".join(caption) if isinstance(caption, list) else str(caption)
    return contexts


def load_rules(path: str | Path = RULE_FILE) -> dict[str, dict[str, str]]:
    rules = read_json(path)
    for category in CATEGORIES:
        rule = rules.get(f"llava_bench_{category}")
        if not isinstance(rule, dict) or "role" not in rule or "prompt" not in rule:
            raise EvalInputError(f"{path}: needs llava_bench_{category} with 'role' and 'prompt'")
    return rules


def build_content(context: str, question: str, reference: str, answer: str, role: str, prompt: str) -> str:
    return (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n"
        f"[System]\n{prompt}\n\n"
    )


def parse_scores(reply: str) -> list[float] | None:
    """The two scores on the reply's first non-empty line ("8 7" or "8, 7"), or None."""
    first = reply.strip().split("\n", 1)[0] if reply.strip() else ""
    parts = first.replace(",", " ").split()
    if len(parts) != 2:
        return None
    try:
        return [float(parts[0]), float(parts[1])]
    except ValueError:
        return None


def load_reviews(path: str | Path, known: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Reviews by question id; a later line may replace an earlier placeholder for a missing/failed answer."""
    path = Path(path)
    if not path.exists():
        return {}
    reviews: dict[str, dict[str, Any]] = {}
    for number, row in enumerate(read_jsonl(path), 1):
        if "question_id" not in row or not isinstance(row.get("tuple"), list) or len(row["tuple"]) != 2:
            raise EvalInputError(f"{path}:{number}: review line needs question_id and a two-score 'tuple'")
        key = qid(row["question_id"])
        if known is not None and key not in known:
            raise EvalInputError(f"{path}:{number}: review for question_id {key!r}, which is not in the question file")
        if key in reviews and not reviews[key].get("error"):
            raise EvalInputError(f"{path}:{number}: question_id {key!r} reviewed twice")
        reviews[key] = row
    return reviews


def drop_stale_reviews(
    output: Path, done: dict[str, dict[str, Any]], answers: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The reviews that still review the current answers; the reviews file is rewritten whole without the others."""
    stale = {
        key
        for key, row in done.items()
        if row.get("answer2_id") is not None and (answers.get(key) or {}).get("answer_id") != row["answer2_id"]
    }
    if not stale:
        return done
    print(f"{output}: {len(stale)} review(s) of answers that were regenerated; reviewing them again", file=sys.stderr)
    text = output.read_text(encoding="utf-8")
    dropped = {number for number, row in iter_jsonl(output, text) if qid(row["question_id"]) in stale}
    kept = [line for number, line in enumerate(text.split("\n"), 1) if number not in dropped]
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("\n".join(kept), encoding="utf-8")
    tmp.replace(output)
    return {key: row for key, row in done.items() if key not in stale}


def review(
    questions: list[dict[str, Any]],
    contexts: dict[str, str],
    references: dict[str, dict[str, Any]],
    answers: dict[str, dict[str, Any]],
    rules: dict[str, dict[str, str]],
    judge: Judge,
    output: str | Path,
    *,
    temperature: float = 0.2,
    max_tokens: int = 1024,
) -> dict[str, dict[str, Any]]:
    """Review every question not yet in ``output`` (appending one line each) and return all reviews.

    Inputs are validated for every question before the first judge call, so a bad file costs nothing.
    """
    output = Path(output)
    done = drop_stale_reviews(output, load_reviews(output, {qid(q["question_id"]) for q in questions}), answers)
    for q in questions:
        key = qid(q["question_id"])
        if f"llava_bench_{q.get('category')}" not in rules:
            raise EvalInputError(f"question_id {key}: no rule for category {q.get('category')!r} (have {CATEGORIES})")
        if key not in references:
            raise EvalInputError(f"question_id {key}: no reference (GPT-4) answer")
        if q.get("image") not in contexts:
            raise EvalInputError(f"question_id {key}: no context caption for image {q.get('image')!r}")
    output.parent.mkdir(parents=True, exist_ok=True)
    for index, q in enumerate(questions):
        key = qid(q["question_id"])
        answer = answers.get(key)
        usable = answer is not None and not answer.get("error")
        if key in done and (not done[key].get("error") or not usable):
            continue
        category = q["category"]
        rule = rules[f"llava_bench_{category}"]
        reference = references[key]
        line: dict[str, Any] = {
            "id": index,
            "question_id": q["question_id"],
            "answer1_id": reference.get("answer_id"),
            "answer2_id": None if answer is None else answer.get("answer_id"),
            "category": category,
        }
        if not usable:
            line.update(tuple=[None, 0.0], error="no answer" if answer is None else f"answer failed: {answer['error']}")
        else:
            content = build_content(
                contexts[q["image"]], q["text"], reference["text"], answer["text"], rule["role"], rule["prompt"]
            )
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
            reply = judge.complete(messages, temperature=temperature, max_tokens=max_tokens)
            scores = parse_scores(reply)
            line.update(content=reply, tuple=scores or list(FAILED), judge_model=judge.model)
            if scores is None:
                line["parse_error"] = True
                print(f"warning: question_id {key}: judge reply has no two scores on its first line", file=sys.stderr)
        line["tokens"] = {} if answer is None else answer.get("tokens", {})
        with output.open("a", encoding="utf-8") as handle:
            append_jsonl(handle, line)
        done[key] = line
    return done


def summarize(reviews: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per category and 'all': relative score (model/reference x100), both means x10, counts."""
    groups: dict[str, list[dict[str, Any]]] = {"all": list(reviews)}
    for row in reviews:
        groups.setdefault(str(row.get("category")), []).append(row)
    metrics: dict[str, dict[str, float]] = {}
    for name in ("all", *CATEGORIES, *sorted(set(groups) - {"all", *CATEGORIES})):
        rows = groups.get(name, [])
        scored = [r for r in rows if not r.get("parse_error")]
        reference = [r["tuple"][0] for r in scored if r["tuple"][0] is not None]
        model = [r["tuple"][1] for r in scored]
        if not reference or sum(reference) == 0:
            if rows:
                print(f"warning: {name}: no judged reviews, no relative score", file=sys.stderr)
            continue
        ref_mean, model_mean = sum(reference) / len(reference), sum(model) / len(model)
        metrics[name] = {
            "relative": 100.0 * model_mean / ref_mean,
            "gpt4": 10.0 * ref_mean,
            "model": 10.0 * model_mean,
            "count": len(rows),
            "parse_failures": len(rows) - len(scored),
            "answer_failures": sum(1 for r in rows if r.get("error")),
        }
    if "all" not in metrics:
        raise EvalInputError("no usable reviews: every review failed to parse or had no answer")
    return metrics


def report(
    reviews: list[dict[str, Any]],
    result_json: str | None,
    judge_info: dict[str, Any],
    answers_file: str | None = None,
) -> dict[str, Any]:
    metrics = summarize(reviews)
    header = ["category", "relative", "gpt4 x10", "model x10", "n", "unparsed", "no answer"]
    print(format_table(header, [[name, *(values[c] for c in _COLUMNS)] for name, values in metrics.items()]))
    return write_result(
        result_json,
        "llavabench",
        metrics,
        metrics["all"]["relative"],
        len(reviews),
        token_means(reviews),
        result_file=answers_file,
        judge=judge_info,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.llavabench",
        description="LLaVA-Bench-in-the-Wild: GPT review (--question ... --output) and/or summary (-f REVIEWS).",
    )
    parser.add_argument("--question", help="questions.jsonl")
    parser.add_argument("--context", help="context.jsonl (captions per image)")
    parser.add_argument("--answer-list", nargs=2, metavar=("REFERENCE", "ANSWERS"), help="answers_gpt4.jsonl, yours")
    parser.add_argument("--rule", default=str(RULE_FILE), help="rule file in upstream's rule.json format")
    parser.add_argument("--output", help="reviews JSON lines (appended; a rerun resumes)")
    parser.add_argument("-f", "--review-file", help="summarize this reviews file only (no judge calls)")
    parser.add_argument("--result-json", help="write the result JSON here")
    parser.add_argument("--no-summary", action="store_true", help="review only")
    parser.add_argument("--temperature", type=float, default=0.2, help="judge temperature (upstream: 0.2)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="judge reply length (upstream: 1024)")
    add_judge_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    reviewing = args.output is not None
    if reviewing == (args.review_file is not None):
        parser.error("pass either --question/--context/--answer-list/--output (review) or -f REVIEWS (summary)")
    try:
        if not reviewing:
            known = None if args.question is None else {qid(q["question_id"]) for q in read_jsonl(args.question)}
            reviews = load_reviews(args.review_file, known)
            if known is not None and len(reviews) < len(known):
                print(f"warning: {len(known) - len(reviews)} questions have no review yet", file=sys.stderr)
            models = sorted({r["judge_model"] for r in reviews.values() if r.get("judge_model")})
            report(list(reviews.values()), args.result_json, {"model": ", ".join(models)})
            return 0
        if not (args.question and args.context and args.answer_list):
            parser.error("reviewing needs --question, --context and --answer-list REFERENCE ANSWERS")
        questions = read_jsonl(args.question)
        known = index_by_id(questions, args.question)
        references = index_by_id(read_jsonl(args.answer_list[0]), args.answer_list[0])
        answers = index_by_id(read_jsonl(args.answer_list[1]), args.answer_list[1])
        unknown = sorted(set(answers) - set(known))
        if unknown:
            raise EvalInputError(f"{args.answer_list[1]}: answers for unknown question_id(s) {unknown[:5]}")
        judge = judge_from_args(args, default_cache_path(args.output))
        reviews = review(
            questions,
            load_contexts(args.context),
            references,
            answers,
            load_rules(args.rule),
            judge,
            args.output,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
        )
        print(f"reviews in {args.output}; judge requests {judge.requests}, cache hits {judge.cache_hits}")
        if not args.no_summary:
            report(list(reviews.values()), args.result_json, judge.describe(), args.answer_list[1])
    except (EvalInputError, JudgeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
