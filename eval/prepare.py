"""Build LLaVA's ``playground/data/eval/<bench>`` files from the Hugging Face copies, or check an existing folder.

    python -m eval.prepare pope --out playground/data/eval/pope
    python -m eval.prepare vqav2 --parts testdev,test,val         # val adds local-accuracy annotations
    python -m eval.prepare mm-vet --from-disk /data/mmvet_saved    # a dataset saved with save_to_disk (offline)
    python -m eval.prepare textvqa --check --out playground/data/eval/textvqa

Datasets are looked up under ``lmms-lab-encoder/<name>`` and then ``lmms-lab/<name>`` (``--hf-org`` picks one),
anonymously unless ``--hf-token`` is given. Images are written once each, with the dataset's stored bytes (no
re-encoding), atomically, and kept when already present, so an interrupted run can simply be repeated.
``--check`` lists every missing file, folder and (first) missing image of a layout, e.g. one from upstream's
eval.zip, and exits 1 if anything required is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval.benchmarks import Benchmark, Part, get_benchmark, registered_benchmarks
from eval.common import INPUT_ERROR_STATUS, EvalInputError
from eval.prepare_io import DEFAULT_ORGS, check, load_part


def select_parts(bench: Benchmark, spec: str | None) -> tuple[str, ...]:
    if spec is None:
        return bench.prepare.default_parts
    parts = tuple(p.strip() for p in spec.split(",") if p.strip())
    unknown = [p for p in parts if p not in bench.prepare.parts]
    if unknown or not parts:
        raise EvalInputError(f"--parts {spec!r}: {bench.folder} has parts {sorted(bench.prepare.parts)}")
    return parts


def overridden(part: Part, args: argparse.Namespace) -> Part:
    return Part(
        args.dataset or part.dataset,
        args.config if args.config is not None else part.config,
        args.split or part.split,
    )


def run_check(bench: Benchmark, parts: tuple[str, ...], out: Path) -> int:
    problems, warnings = check(out, *bench.prepare.check(bench, parts))
    for line in warnings:
        print(f"warning: {line}")
    for line in problems:
        print(line)
    if problems:
        print(f"{bench.folder}: {len(problems)} problem(s) in {out}")
        return 1
    print(f"{bench.folder}: {out} has every required file")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.prepare",
        description=__doc__.split("\n\n")[0],
        epilog="benchmarks: "
        + ", ".join(f"{b.folder} (parts {'/'.join(b.prepare.parts)})" for b in registered_benchmarks() if b.prepare),
    )
    parser.add_argument("bench", help="benchmark (or alias: sqa, mme, mmvet, llavabench, ...)")
    parser.add_argument("--out", type=Path, help="benchmark folder (default: playground/data/eval/<bench>)")
    parser.add_argument("--check", action="store_true", help="only check an existing layout; downloads nothing")
    parser.add_argument("--parts", help="comma-separated parts (splits) to build or check; default per benchmark")
    parser.add_argument("--hf-org", help=f"dataset organisation (default: try {' then '.join(DEFAULT_ORGS)})")
    parser.add_argument("--hf-token", action="store_true", help="use your saved Hugging Face login (token=True)")
    parser.add_argument("--from-disk", help="load a dataset saved with save_to_disk instead of the Hub")
    parser.add_argument("--dataset", help="override the dataset name (e.g. MMBench instead of MMBench_EN)")
    parser.add_argument("--config", help="override the dataset config (e.g. ScienceQA-IMG)")
    parser.add_argument("--split", help="override the split name of the (single) selected part")
    parser.add_argument("--limit", type=int, help="first N rows only (a quick try)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        bench = get_benchmark(args.bench)
        if bench.prepare is None:
            raise EvalInputError(f"benchmark {bench.name!r} has no data preparation (its spec's prepare is None)")
        parts = select_parts(bench, args.parts)
        out = args.out or Path("playground/data/eval") / bench.folder
        if args.check:
            return run_check(bench, parts, out)
        if (args.dataset or args.config or args.split) and len(parts) != 1:
            raise EvalInputError("--dataset/--config/--split apply to one part; select it with --parts")
        if args.limit is not None and args.limit < 1:
            raise EvalInputError(f"--limit must be >= 1, got {args.limit}")
        orgs = (args.hf_org,) if args.hf_org else DEFAULT_ORGS
        data = {
            name: load_part(
                overridden(bench.prepare.parts[name], args),
                orgs=orgs,
                token=True if args.hf_token else None,
                from_disk=args.from_disk,
                single=len(parts) == 1,
                limit=args.limit,
            )
            for name in parts
        }
        for line in bench.prepare.build(bench, data, out):
            print(f"wrote {line}")
    except EvalInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return INPUT_ERROR_STATUS
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
