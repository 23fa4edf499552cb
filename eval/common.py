"""File helpers shared by every scorer (and the runners' JSON-lines and run-record names): reading and appending
JSON lines, token means, result JSON.

Answer lines are written by ``llava.eval`` runners; each carries upstream's fields (``question_id``, ``prompt``,
``text``, ``answer_id``, ``model_id``, ``metadata``) plus ``tokens``: a mapping of per-sample token statistics
(``visual_before``, ``visual_after``, ``inflection``, ``prompt``, ``generated``, ``kv_final``; LLaVA-1.6 adds
per-crop lists). Next to ``answers/x.jsonl`` the runner writes its run record ``answers/x.run.json`` (the model,
pruning config, template, decoding settings; see ``llava/eval/run_record.py``), which ``write_result`` copies into
the result JSON. Scorers never import model code.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Container, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO


class EvalInputError(ValueError):
    """Bad benchmark input; the message names the file, line or question id."""


# The exit status of every runner, scorer and script that stops on bad input or settings: a rerun of the same
# command cannot fix it (the scripts tell it apart from a crash, which a rerun resumes).
INPUT_ERROR_STATUS = 2


def iter_jsonl(
    path: str | Path, text: str | None = None, *, error: type[Exception] = EvalInputError, hint: str = ""
) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line of a JSON-lines file (or of ``text``, its contents): the one
    JSON-lines reader of scorers, runners and judges. Lines end at "\\n" only, so a U+2028 inside an answer is text,
    not a line break. A line that is not JSON raises ``error`` naming the file and line, with ``hint`` appended."""
    if text is None:
        path = Path(path)
        if not path.is_file():
            raise error(f"file not found: {path}")
        text = path.read_text(encoding="utf-8")
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}){hint}") from None
        yield number, value


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON object in a JSON-lines file; a bad line is an error naming the file and line number."""
    path = Path(path)
    rows = []
    for number, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise EvalInputError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def split_unfinished(data: bytes) -> tuple[bytes, bytes]:
    """(the finished lines, an unfinished last line) of an append-only JSON-lines file: lines are written whole and
    newline-terminated, so a process killed while writing leaves at most its last line without the newline."""
    end = data.rfind(b"\n") + 1
    return data[:end], data[end:]


def jsonl_line(row: Any) -> str:
    """One JSON-lines line, as every writer of this project writes it (UTF-8 text kept as is)."""
    return json.dumps(row, ensure_ascii=False) + "\n"


def append_jsonl(handle: TextIO, row: Any) -> None:
    """Append one line and flush it, so an interruption loses at most the line being written."""
    handle.write(jsonl_line(row))
    handle.flush()


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalInputError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def answers_by_id(rows: Iterable[dict[str, Any]], source: str) -> dict[Any, dict[str, Any]]:
    """Index answers by ``question_id`` (plus ``round_id`` when present); duplicates are an error."""
    out: dict[Any, dict[str, Any]] = {}
    for row in rows:
        if "question_id" not in row:
            raise EvalInputError(f"{source}: answer line without question_id: {str(row)[:120]}")
        key = row["question_id"] if "round_id" not in row else (row["question_id"], row["round_id"])
        if key in out:
            raise EvalInputError(f"{source}: question_id {key!r} answered twice")
        out[key] = row
    return out


IMAGE_STATS = ("visual_before", "visual_after", "inflection")  # per image: means over the questions with an image


def _stat_means(rows: list[dict[str, Any]]) -> dict[str, float]:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in (row.get("tokens") or {}).items():
            if isinstance(value, list):
                value = sum(v for v in value if isinstance(v, (int, float)))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sorted(sums)}


def has_image(row: dict[str, Any]) -> bool:
    """An answer to a question with an image: its tokens count visual tokens before pruning."""
    before = (row.get("tokens") or {}).get("visual_before")
    if isinstance(before, list):
        before = sum(v for v in before if isinstance(v, (int, float)))
    return isinstance(before, (int, float)) and not isinstance(before, bool) and before > 0


def token_means(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Means of the token statistics: per question (every answer that carries the statistic; lists are summed per
    answer) at the top level, as before, and ``per_image``: the visual statistics over the questions with an
    image only, with ``image_questions`` counting those (when the answers record ``visual_before``, which tells
    them apart). A benchmark with text-only questions (ScienceQA) has a
    lower per-question visual mean than per-image; the paper's tables mean tokens per image."""
    rows = list(rows)
    means: dict[str, Any] = _stat_means(rows)
    if "visual_before" not in means:  # answers without visual counts cannot tell image questions apart
        return means
    with_image = [row for row in rows if has_image(row)]
    per_image = _stat_means(with_image)
    means["image_questions"] = len(with_image)
    means["per_image"] = {key: per_image[key] for key in IMAGE_STATS if key in per_image}
    return means


def token_stat(tokens: dict[str, Any] | None, stat: str) -> float | None:
    """The mean a table prints for ``stat``: per image for the visual statistics (when the result has them), per
    question otherwise. Results written before per-image means existed fall back to the per-question mean."""
    tokens = tokens or {}
    per_image = tokens.get("per_image") if isinstance(tokens.get("per_image"), dict) else {}
    value = per_image.get(stat) if stat in IMAGE_STATS and stat in per_image else tokens.get(stat)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


RUN_RECORD_SUFFIX = ".run.json"


def run_record_path(answers_file: str | Path) -> Path:
    """The runner's record of what produced ``answers/x.jsonl``: ``answers/x.run.json`` (the last suffix replaced).
    The one definition of the name: ``llava.eval.run_record`` writes the record there, scorers read it."""
    answers_file = Path(answers_file)
    return answers_file.with_name(answers_file.stem + RUN_RECORD_SUFFIX)


def run_fields(answers_file: str | Path | None) -> dict[str, Any]:
    """What a result JSON records about the run behind its answers: ``run`` (the whole record), ``model``
    (the model path as given), ``config`` (the resolved pruning config) and ``label`` (the answers file's name,
    CKPT in the scripts). Answers without a record (written by other tools) give only the label."""
    if answers_file is None:
        return {}
    fields: dict[str, Any] = {"label": Path(answers_file).stem}
    path = run_record_path(answers_file)
    if path.is_file():
        record = read_json(path)
        if not isinstance(record, dict):
            raise EvalInputError(f"{path}: a run record must be a JSON object")
        fields.update(run=record, model=record.get("model_path"), config=record.get("pruning"))
    return fields


def check_finite(metrics: dict[str, Any], source: str) -> None:
    """Refuse to write NaN or infinite metrics: they are always a bug upstream of the scorer."""
    for key, value in metrics.items():
        if isinstance(value, dict):
            check_finite(value, f"{source}.{key}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise EvalInputError(f"{source}: metric {key!r} is {value}; refusing to write a non-finite score")


def write_result(
    path: str | Path | None,
    benchmark: str,
    metrics: dict[str, Any],
    headline: float | None,
    count: int,
    tokens: dict[str, Any],
    result_file: str | Path | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write the result JSON every scorer produces (and return it). ``result_file`` is the answers file scored;
    its run record's settings are copied into the result (``run_fields``)."""
    result = {
        "benchmark": benchmark,
        "headline": headline,
        "count": count,
        "metrics": metrics,
        "tokens": tokens,
        **({"result_file": str(result_file)} if result_file is not None else {}),
        **run_fields(result_file),
        **extra,
    }
    check_finite({"headline": headline, **metrics}, benchmark)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain Markdown table (numbers printed with at most 2 decimals)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def answer_text(row: dict[str, Any], source: str) -> str | None:
    """The prediction of an answer line, or None when the runner recorded a failure (``error``, from --skip-errors).

    Failed samples must be scored as wrong, never dropped, so scorers treat None like an unparseable answer.
    """
    if row.get("error") is not None:
        return None
    text = row.get("text")
    if not isinstance(text, str):
        raise EvalInputError(f"{source}: question_id {row.get('question_id')!r}: 'text' is missing or not a string")
    return text


def answers_by_str_id(rows: Iterable[dict[str, Any]], source: str) -> dict[str, dict[str, Any]]:
    """Index answers by ``str(question_id)``, so ids written as 12 or "12" by different tools still meet."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if "question_id" not in row:
            raise EvalInputError(f"{source}: answer line without question_id: {str(row)[:120]}")
        key = str(row["question_id"])
        if key in out:
            raise EvalInputError(f"{source}: question_id {row['question_id']!r} answered twice")
        out[key] = row
    return out


def check_known_ids(ids: Iterable[Any], known: Container[Any], source: str) -> None:
    """An answer to a question the benchmark does not have means the wrong question or answer file: refuse."""
    unknown = [key for key in ids if key not in known]
    if unknown:
        raise EvalInputError(
            f"{source}: {len(unknown)} answer(s) for question ids not in the benchmark, e.g. {id_list(unknown)}"
        )


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, with 0.0 for an empty denominator so no NaN reaches a result."""
    return numerator / denominator if denominator else 0.0


def id_list(ids: Iterable[Any], limit: int = 10) -> str:
    """A short printable list of ids for messages (the first ``limit``, then a count of the rest)."""
    ids = list(ids)
    shown = ", ".join(repr(key) for key in ids[:limit])
    return shown + (f" ... (+{len(ids) - limit} more)" if len(ids) > limit else "")


def run_cli(main: Callable[[], Any]) -> None:
    """Entry point of a scorer module: bad input ends with its one-line message and exit status 2, no traceback."""
    try:
        main()
    except EvalInputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(INPUT_ERROR_STATUS) from None
