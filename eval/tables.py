"""The paper's Tables 1-5, 7 and 8 from a folder of scorer result JSONs, next to the paper's own values.

Which result belongs to which row is data, not code: ``eval/table_specs/table<N>.json`` lists the columns
(benchmark, decimals, and a title when it is not the benchmark's own, ``eval.benchmarks``), the token statistic printed in parentheses (or none), and the rows (label, how to
match a result, the paper's values). A result is matched to a cell by its ``benchmark`` field and the row's
``match``: ``ckpt`` (glob on the run name: the path below the ``results/`` folder without .json, so
``<bench>/results/exp1/demo.json`` is ``exp1/demo``; scorers write ``<bench>/results/<ckpt>.json``), ``path``
(glob on the path below --results), ``label`` / ``model`` (globs on those result fields: the answers file's name
and the model path, from the run record), ``config`` (a subset of the result's ``config`` mapping: the resolved
pruning config of the run). A cell without a result prints "-", one with several prints "?" and a warning: nothing
is invented and nothing is silently picked; rows that match nothing are listed on stderr with the runs that exist.
Visual token statistics are means per image (``tokens.per_image``), the others per question. A caption may
contain ``{model}``: the models of the matched results (the spec's ``model`` when none matched). Table 6 (compute
cost) comes from ``python -m eval.roofline``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from eval.benchmarks import get_benchmark, registered_benchmarks
from eval.common import format_table, token_stat

SPEC_DIR = Path(__file__).resolve().parent / "table_specs"
TABLES = ("1", "2", "3", "4", "5", "7", "8")
TOKEN_STATS = ("visual_before", "visual_after", "inflection", "prompt", "generated", "kv_final")
MATCH_KEYS = ("ckpt", "path", "label", "model", "config")
MISSING, AMBIGUOUS = "-", "?"


class SpecError(ValueError):
    """A table spec that does not describe a table; the message names the spec file."""


# ---- results ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    path: Path  # relative to the --results folder
    data: dict[str, Any]

    @property
    def ckpt(self) -> str:
        """The run name: the path below the last ``results`` folder, without .json (``exp1/demo``)."""
        parts = self.path.with_suffix("").parts
        folders = parts[:-1]
        if "results" not in folders:
            return "/".join(parts)
        last = len(folders) - 1 - folders[::-1].index("results")
        return "/".join(parts[last + 1 :])

    @property
    def model_name(self) -> str | None:
        model = self.data.get("model")
        return Path(model.rstrip("/")).name if isinstance(model, str) and model else None

    def matches(self, match: dict[str, Any]) -> bool:
        for key, pattern in match.items():
            if key == "config":
                config = self.data.get("config")
                if not isinstance(config, dict) or any(config.get(k, object()) != v for k, v in pattern.items()):
                    return False
                continue
            value = {"ckpt": self.ckpt, "path": self.path.as_posix()}.get(key, self.data.get(key))
            if not isinstance(value, str) or not fnmatchcase(value, pattern):
                return False
        return True


def load_results(folder: Path, warn: Any = print) -> list[Result]:
    """Result JSONs in ``folder`` itself and in any ``results/`` folder below it (the playground layout).

    Other JSON files there (question files, upstream outputs) are not results and are skipped with a warning,
    so one stray file never costs the whole table.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"--results: {folder} is not a folder")
    paths = sorted({*folder.glob("*.json"), *folder.glob("**/results/**/*.json")})
    results = []
    for path in paths:
        relative = path.relative_to(folder)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            warn(f"skipped {path}: not readable JSON ({err})")
            continue
        problem = _result_problem(data)
        if problem:
            warn(f"skipped {path}: {problem}")
            continue
        results.append(Result(relative, data))
    return results


def _result_problem(data: Any) -> str | None:
    if not isinstance(data, dict) or "benchmark" not in data or "headline" not in data:
        return "not a scorer result (needs 'benchmark' and 'headline')"
    known = [benchmark.name for benchmark in registered_benchmarks()]
    if data["benchmark"] not in known:
        return f"unknown benchmark {data['benchmark']!r} (known: {', '.join(known)})"
    if not _is_number(data["headline"]):
        return f"headline is {data['headline']!r}, not a finite number"
    if data.get("tokens") is not None and not isinstance(data["tokens"], dict):
        return "'tokens' is not a mapping"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- specs --------------------------------------------------------------------------------------------------


def spec_path(table: str) -> Path:
    return SPEC_DIR / f"table{table}.json"


def load_spec(path: Path) -> dict[str, Any]:
    """Read and check a spec, so that a typo fails here with the file name rather than as an odd table."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SpecError(f"{path}: cannot read the spec ({err})") from None

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise SpecError(f"{path}: {message}")

    need(isinstance(spec, dict), "expected a JSON object")
    for key in ("table", "caption", "row_header", "columns", "rows"):
        need(key in spec, f"missing key {key!r}")
    need(spec.get("tokens") in (None, *TOKEN_STATS), f"tokens must be null or one of {', '.join(TOKEN_STATS)}")
    need(isinstance(spec["columns"], list) and spec["columns"], "columns must be a non-empty list")
    known = [benchmark.name for benchmark in registered_benchmarks()]
    for column in spec["columns"]:
        need(isinstance(column, dict) and column.get("benchmark") in known, f"bad column {column!r}")
        column.setdefault("title", get_benchmark(column["benchmark"]).title)
        need(isinstance(column["title"], str), f"column {column['benchmark']!r}: the title must be a string")
        decimals = column.get("decimals")
        need(isinstance(decimals, int) and 0 <= decimals <= 4, f"column {column['title']!r}: decimals 0..4")
    benchmarks = [column["benchmark"] for column in spec["columns"]]
    need(len(set(benchmarks)) == len(benchmarks), "a benchmark appears in two columns")
    need(isinstance(spec["rows"], list), "rows must be a list")
    need(isinstance(spec.get("model", ""), str), "model must be a string (the caption's {model} when nothing matched)")
    need("{model}" not in spec["caption"] or "model" in spec, "a caption with {model} needs a 'model' default")
    for row in spec["rows"]:
        need(isinstance(row, dict), f"bad row {row!r}")
        if "section" in row:
            need(isinstance(row["section"], str), f"bad section {row!r}")
            continue
        need(isinstance(row.get("label"), str), f"row without a label: {row!r}")
        match = row.get("match")
        need(match is None or (isinstance(match, dict) and match), f"row {row['label']!r}: match must be an object")
        for key, pattern in (match or {}).items():
            need(key in MATCH_KEYS, f"row {row['label']!r}: unknown match key {key!r} ({', '.join(MATCH_KEYS)})")
            need(isinstance(pattern, dict if key == "config" else str), f"row {row['label']!r}: bad {key} pattern")
        for field in ("paper", "paper_tokens"):
            values = row.get(field) or {}
            need(isinstance(values, dict), f"row {row['label']!r}: {field} must be an object")
            for bench, value in values.items():
                need(bench in benchmarks, f"row {row['label']!r}: {field} names {bench!r}, which is not a column")
                need(value is None or _is_number(value), f"row {row['label']!r}: {field}.{bench} = {value!r}")
    return spec


# ---- the grid -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    ours: float | None
    ours_tokens: float | None
    paper: float | None
    paper_tokens: float | None
    sources: tuple[Result, ...]

    @property
    def ambiguous(self) -> bool:
        return len(self.sources) > 1


@dataclass(frozen=True)
class Row:
    label: str
    cells: tuple[Cell, ...] | None  # None for a section heading


def build_grid(spec: dict[str, Any], results: list[Result], warn: Any = print) -> list[Row]:
    """One Cell per (row, column): our value and token mean (if exactly one result matches) and the paper's."""
    stat = spec.get("tokens")
    rows = []
    unmatched = []
    for row in spec["rows"]:
        if "section" in row:
            rows.append(Row(row["section"], None))
            continue
        cells = []
        for column in spec["columns"]:
            bench = column["benchmark"]
            found = [
                r for r in results if row.get("match") and r.data["benchmark"] == bench and r.matches(row["match"])
            ]
            if len(found) > 1:
                names = ", ".join(str(r.path) for r in found)
                warn(f"table {spec['table']}, row {row['label']!r}, {column['title']}: {len(found)} results match "
                     f"({names}); narrow the spec's match")  # fmt: skip
            ours = found[0] if len(found) == 1 else None
            tokens = token_stat(ours.data.get("tokens"), stat) if ours and stat else None
            cells.append(
                Cell(
                    ours=ours.data["headline"] if ours else None,
                    ours_tokens=tokens,
                    paper=(row.get("paper") or {}).get(bench),
                    paper_tokens=(row.get("paper_tokens") or {}).get(bench),
                    sources=tuple(found),
                )
            )
        if row.get("match") and not any(cell.sources for cell in cells):
            unmatched.append(row)
        rows.append(Row(row["label"], tuple(cells)))
    if unmatched:
        warn(unmatched_message(spec, unmatched, results))
    return rows


def unmatched_message(spec: dict[str, Any], rows: list[dict[str, Any]], results: list[Result]) -> str:
    """Which rows found no result, and which runs exist for the table's benchmarks, so a typo or a run under
    another name is seen at once."""
    benchmarks = [column["benchmark"] for column in spec["columns"]]
    runs: dict[str, list[str]] = {}
    for result in results:
        if result.data["benchmark"] in benchmarks:
            runs.setdefault(result.data["benchmark"], []).append(result.ckpt)
    shown = "; ".join(f"{bench}: {', '.join(sorted(runs[bench]))}" for bench in benchmarks if bench in runs)
    labels = ", ".join(f"{row['label']!r} {json.dumps(row['match'])}" for row in rows)
    found = f"runs found for its benchmarks: {shown}" if shown else "no result found for any of its benchmarks"
    return (
        f"table {spec['table']}: {len(rows)} row(s) matched no result: {labels}; {found}. Name your runs as the "
        "spec's match expects (CKPT=...), or write a spec of your own (--spec; docs/reproducing.md)"
    )


def _fixed(value: float, decimals: int) -> Decimal:
    """Round half up, as tables are read (repr first, so 1.15 is 1.15 and not 1.149999...)."""
    return Decimal(repr(value)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def _with_tokens(value: float | None, tokens: float | None, decimals: int, show_tokens: bool) -> str:
    if value is None:
        return MISSING
    text = str(_fixed(value, decimals))
    if show_tokens:
        text += f" ({_fixed(tokens, 0)})" if tokens is not None else f" ({MISSING})"
    return text


def _difference(cell: Cell, decimals: int) -> str:
    """Ours as printed minus the paper's figure, so the three cells of a row always agree."""
    if cell.ours is None or cell.paper is None or cell.ambiguous:
        return MISSING
    diff = _fixed(cell.ours, decimals) - _fixed(cell.paper, decimals)
    return f"{diff:+f}" if diff else str(diff.copy_abs())


def cell_texts(spec: dict[str, Any], cell: Cell, column: dict[str, Any], paper: bool) -> list[str]:
    """The printed pieces of one cell: ours, then (with ``paper``) the paper's value and the difference."""
    decimals, show_tokens = column["decimals"], spec.get("tokens") is not None
    ours = AMBIGUOUS if cell.ambiguous else _with_tokens(cell.ours, cell.ours_tokens, decimals, show_tokens)
    if not paper:
        return [ours]
    paper_tokens = show_tokens and cell.paper_tokens is not None
    return [ours, _with_tokens(cell.paper, cell.paper_tokens, decimals, paper_tokens), _difference(cell, decimals)]


# ---- output -------------------------------------------------------------------------------------------------


def caption(spec: dict[str, Any], grid: list[Row], paper: bool) -> str:
    """The spec's caption with ``{model}`` filled in: the models behind our values (with the paper's model beside
    them when the paper's values are printed too), or the spec's ``model`` when no result matched."""
    if "{model}" not in spec["caption"]:
        return spec["caption"]
    default = spec["model"]
    names = sorted(
        {r.model_name for row in grid for cell in row.cells or () for r in cell.sources if r.model_name is not None}
    )
    if not names:
        model = default
    elif paper and names != [default]:
        model = f"ours: {', '.join(names)}; paper: {default}"
    else:
        model = ", ".join(names)
    return spec["caption"].replace("{model}", model)


def _subtitles(paper: bool) -> list[str]:
    return ["ours", "paper", "Δ"] if paper else ["ours"]


def render_markdown(spec: dict[str, Any], grid: list[Row], paper: bool = True) -> str:
    header = [spec["row_header"]]
    for column in spec["columns"]:
        title = column["title"]
        header += [title, f"{title} (paper)", f"Δ {title}"] if paper else [title]
    body = []
    for row in grid:
        if row.cells is None:
            body.append([f"**{row.label}**"] + [""] * (len(header) - 1))
            continue
        body.append(
            [row.label] + [t for c, col in zip(row.cells, spec["columns"]) for t in cell_texts(spec, c, col, paper)]
        )
    return f"**Table {spec['table']}.** {caption(spec, grid, paper)}\n\n{format_table(header, body)}\n"


def render_csv(spec: dict[str, Any], grid: list[Row], paper: bool = True) -> str:
    """Numbers and token counts in columns of their own, for spreadsheets; "-" where there is no value."""
    show_tokens = spec.get("tokens") is not None
    header = [spec["row_header"]]
    for column in spec["columns"]:
        title = column["title"]
        header += [title] + ([f"{title} tokens"] if show_tokens else [])
        if paper:
            header += [f"{title} paper"] + ([f"{title} paper tokens"] if show_tokens else []) + [f"{title} diff"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([f"Table {spec['table']}. {caption(spec, grid, paper)}"])
    writer.writerow(header)
    for row in grid:
        if row.cells is None:
            writer.writerow([row.label] + [""] * (len(header) - 1))
            continue
        values = [row.label]
        for cell, column in zip(row.cells, spec["columns"]):
            decimals = column["decimals"]
            ours = AMBIGUOUS if cell.ambiguous else _plain(cell.ours, decimals)
            values += [ours] + ([_plain(cell.ours_tokens, 0)] if show_tokens else [])
            if paper:
                values += [_plain(cell.paper, decimals)]
                values += [_plain(cell.paper_tokens, 0)] if show_tokens else []
                values += [_difference(cell, decimals)]
        writer.writerow(values)
    return out.getvalue()


def _plain(value: float | None, decimals: int) -> str:
    return MISSING if value is None else str(_fixed(value, decimals))


_LATEX_ESCAPES = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(text: str) -> str:
    text = "".join(_LATEX_ESCAPES.get(c, c) for c in text.replace("\\", r"\textbackslash{}"))
    return text.replace("Δ", r"$\Delta$")


def render_latex(spec: dict[str, Any], grid: list[Row], paper: bool = True) -> str:
    """A booktabs table: one group of (ours, paper, Δ) columns per benchmark."""
    width = len(_subtitles(paper))
    n_cols = 1 + width * len(spec["columns"])
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_tex(caption(spec, grid, paper))}}}",
        rf"\label{{tab:paper-table-{spec['table']}}}",
        r"\begin{tabular}{l" + "r" * (n_cols - 1) + "}",
        r"\toprule",
    ]
    titles = [_tex(column["title"]) for column in spec["columns"]]
    if paper:
        lines.append(" & ".join([""] + [rf"\multicolumn{{{width}}}{{c}}{{{t}}}" for t in titles]) + r" \\")
        lines.append("".join(rf"\cmidrule(lr){{{2 + i * width}-{1 + (i + 1) * width}}}" for i in range(len(titles))))
        lines.append(
            " & ".join([_tex(spec["row_header"])] + [_tex(s) for s in _subtitles(paper)] * len(titles)) + r" \\"
        )
    else:
        lines.append(" & ".join([_tex(spec["row_header"]), *titles]) + r" \\")
    lines.append(r"\midrule")
    for row in grid:
        if row.cells is None:
            lines.append(rf"\multicolumn{{{n_cols}}}{{l}}{{\textit{{{_tex(row.label)}}}}} \\")
            continue
        texts = [t for cell, col in zip(row.cells, spec["columns"]) for t in cell_texts(spec, cell, col, paper)]
        lines.append(" & ".join(_tex(t) for t in [row.label, *texts]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


RENDERERS = {"md": render_markdown, "csv": render_csv, "latex": render_latex}


def build_tables(results_dir: Path, specs: list[Path], fmt: str = "md", paper: bool = True, warn: Any = print) -> str:
    """Every requested table in one text, separated by a blank line."""
    results = load_results(results_dir, warn)
    rendered = []
    for path in specs:
        spec = load_spec(path)
        rendered.append(RENDERERS[fmt](spec, build_grid(spec, results, warn), paper))
    return "\n".join(rendered)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.tables",
        description="Build the paper's Tables 1-5, 7, 8 from scorer result JSONs, with the paper's values beside.",
        epilog="Table 6 (FLOPs, prefill time, memory) is a roofline estimate: python -m eval.roofline --help. "
        "Row matching lives in eval/table_specs/table<N>.json; see docs/reproducing.md.",
    )
    parser.add_argument(
        "--results", required=True, type=Path, help="folder of result JSONs (e.g. playground/data/eval)"
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--table", help=f"{' | '.join(TABLES)} | all")
    which.add_argument("--spec", type=Path, help="a table spec JSON of your own")
    parser.add_argument("--format", choices=list(RENDERERS), default="md")
    parser.add_argument("--out", type=Path, help="write here instead of stdout")
    parser.add_argument("--no-paper", action="store_true", help="only our values, without the paper's and Δ")
    args = parser.parse_args(argv)
    if args.table == "6":
        parser.error(
            "--table 6 is the roofline estimate: python -m eval.roofline --text-tokens 60 --visual-tokens 576 120"
        )
    if args.table is not None and args.table not in (*TABLES, "all"):
        parser.error(f"--table must be one of {', '.join(TABLES)} or all, got {args.table!r}")
    specs = [args.spec] if args.spec else [spec_path(t) for t in (TABLES if args.table == "all" else (args.table,))]

    def warn(message: str) -> None:
        print(f"eval.tables: warning: {message}", file=sys.stderr)

    try:
        text = build_tables(args.results, specs, args.format, not args.no_paper, warn)
    except (FileNotFoundError, SpecError) as err:
        parser.error(str(err))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
