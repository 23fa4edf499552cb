"""Concatenate chunk answer files in index order into one answers file, with one run record for them.

    python -m llava.eval.merge_chunks --out answers/ckpt.jsonl answers/ckpt/2_0.jsonl answers/ckpt/2_1.jsonl

The scripts call this after their chunks finish (upstream used ``cat``). The chunks' run records must agree on
every compared setting (``llava.eval.run_record.COMPARED``); the merged record notes the number of chunks. Both
files are written whole (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from eval.common import INPUT_ERROR_STATUS, run_record_path, split_unfinished
from llava.eval import run_record


def merge(chunks: list[Path], out: Path) -> int:
    """Write ``out`` and its run record; returns the number of answer lines."""
    records = []
    parts = []
    for chunk in chunks:
        if not chunk.is_file():
            raise run_record.RunRecordError(f"chunk answers file not found: {chunk}")
        data = chunk.read_bytes()
        if split_unfinished(data)[1]:
            raise run_record.RunRecordError(f"{chunk}: the last line is unfinished; rerun the script to resume it")
        parts.append(data)
        record = run_record.read_record(run_record_path(chunk))
        if record is None and data.strip():
            raise run_record.RunRecordError(f"{chunk} has answers but no run record ({run_record_path(chunk)})")
        if record is not None:
            records.append((chunk, record))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(b"".join(parts))
    if records:
        run_record.write_record(run_record_path(out), run_record.merge_records(records))
    os.replace(tmp, out)
    return sum(part.count(b"\n") for part in parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.merge_chunks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the merged answers file")
    parser.add_argument("chunks", nargs="+", type=Path, help="chunk answer files, in chunk-index order")
    args = parser.parse_args(argv)
    try:
        lines = merge(args.chunks, args.out)
    except run_record.RunRecordError as err:
        print(f"error: {err}", file=sys.stderr)
        return INPUT_ERROR_STATUS
    print(f"answers: {args.out} ({lines} lines from {len(args.chunks)} chunk(s))", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
