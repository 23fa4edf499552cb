"""The one driver behind scripts/v1_5/eval/<benchmark>.sh and scripts/v1_6/eval/<benchmark>.sh.

    python -m llava.eval.run_benchmark pope [runner flags ...]    # what `bash scripts/v1_5/eval/pope.sh` runs

From the benchmark's spec (``eval/benchmarks.py``): its runner once per GPU in CUDA_VISIBLE_DEVICES, each on its
slice of the questions (``--num-chunks N --chunk-idx i``, one chunk in all when unset or empty), the chunks merged
in index order by ``llava.eval.merge_chunks`` (which checks that their run records agree), then the scorer. Flags
after the benchmark name go to the runner, after the defaults. Settings are environment variables, documented in
scripts/v1_5/eval/_common.sh: MODEL_PATH, MODEL_BASE, CKPT, PRUNING_ARGS, CONV_MODE, BATCH_SIZE, EVAL_DIR,
DATA_DIR, PYTHON, CUDA_VISIBLE_DEVICES, and per benchmark SPLIT, JUDGE_MODEL, MMBENCH_LANG, MMBENCH_ALL_ROUNDS,
VQAV2_IMAGES, VQAV2_ANNOTATIONS, VQAV2_QUESTIONS; BENCHMARK_MODULES adds benchmarks registered elsewhere.

Exit status: 0 when scored (or nothing to score); 1 when the data folder is missing or a chunk failed; 2 for an
unknown benchmark or a refused setting; else the status of the chunk merge or of the scorer. A chunk that exits
with 2 stopped on its input or settings (a rerun cannot fix that); any other failure is resumed by a rerun.

Starts processes only (``$PYTHON -m ...``): it imports no model code, so it starts in a moment.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence

from eval.benchmarks import Benchmark, BenchmarkError, Run, get_benchmark
from eval.common import INPUT_ERROR_STATUS

DEFAULT_MODEL = "liuhaotian/llava-v1.5-7b"
DEFAULT_EVAL_DIR = "./playground/data/eval"


def setting(env: Mapping[str, str], name: str, default: str = "") -> str:
    """The variable's value, or ``default`` when it is unset or empty (the shell's ``${NAME:-default}``)."""
    return env.get(name) or default


def first_line_fields(value: str, separator: str) -> list[str]:
    """What the shell's ``read -r -a`` made of a variable: its first line split at ``separator``."""
    line = value.split("\n", 1)[0]
    if separator == ",":  # IFS=',': empty fields are kept, except one at the very end
        fields = line.split(",")
        return fields[:-1] if fields[-1] == "" else fields
    return [field for field in re.split(r"[ \t]+", line) if field]  # default IFS: runs of blanks


def run_name(env: Mapping[str, str]) -> str:
    """CKPT, else the last part of MODEL_PATH (``/ckpts/llava-v1.5-7b-lora/`` -> ``llava-v1.5-7b-lora``)."""
    return setting(env, "CKPT") or os.path.basename(setting(env, "MODEL_PATH", DEFAULT_MODEL).rstrip("/"))


def shared_runner_args(env: Mapping[str, str]) -> list[str]:
    """The flags every runner gets: the model, greedy decoding, the batch size, the template when CONV_MODE is set
    (otherwise the runner picks the checkpoint family's), the base model and the pruning settings."""
    args = ["--model-path", setting(env, "MODEL_PATH", DEFAULT_MODEL), "--temperature", "0"]
    args += ["--batch-size", setting(env, "BATCH_SIZE", "1")]
    if setting(env, "CONV_MODE"):
        args += ["--conv-mode", env["CONV_MODE"]]
    if setting(env, "MODEL_BASE"):
        args += ["--model-base", env["MODEL_BASE"]]
    return args + first_line_fields(env.get("PRUNING_ARGS", ""), " ")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_chunks(python: str, run: Run, runner_args: Sequence[str], env: Mapping[str, str]) -> list[str] | None:
    """The runner once per GPU, each on its chunk; the chunk answer files in index order, or None when a chunk
    failed (reported once every chunk has stopped)."""
    module = run.benchmark.runner
    gpus = first_line_fields(env.get("CUDA_VISIBLE_DEVICES", ""), ",")
    chunks = max(len(gpus), 1)
    files = [f"{run.chunk_dir}/{chunks}_{index}.jsonl" for index in range(chunks)]
    os.makedirs(run.chunk_dir, exist_ok=True)
    os.makedirs(os.path.dirname(run.answers) or ".", exist_ok=True)
    processes = []
    for index, answers in enumerate(files):
        child_env = {**env, "CUDA_VISIBLE_DEVICES": gpus[index]} if gpus else dict(env)
        chunk = ["--answers-file", answers, "--num-chunks", str(chunks), "--chunk-idx", str(index)]
        processes.append(subprocess.Popen([python, "-m", module, *runner_args, *chunk], env=child_env))

    def stop(signum: int, frame: object) -> None:  # Ctrl-C or kill: stop every chunk, then report
        for process in processes:
            if process.poll() is None:
                process.terminate()

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        statuses = [process.wait() for process in processes]
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    for index, status in enumerate(statuses):
        status = 128 - status if status < 0 else status  # killed by a signal: the shell's 128 + signal number
        where = f"chunk {index} of {chunks} ({module})"
        if status == INPUT_ERROR_STATUS:
            say(f"error: {where} stopped on its input or settings (message above); fix that first")
        elif status != 0:
            say(f"error: {where} failed (exit status {status}); rerun the script to resume")
    return None if any(statuses) else files


def run_benchmark(benchmark: Benchmark, extra_args: Sequence[str], env: Mapping[str, str]) -> int:
    """Answer (chunked), merge, score; returns the exit status."""
    if benchmark.select is not None:
        benchmark = get_benchmark(benchmark.select(env), env)
    data_dir = setting(env, "DATA_DIR") or f"{setting(env, 'EVAL_DIR', DEFAULT_EVAL_DIR)}/{benchmark.folder}"
    if not os.path.isdir(data_dir):
        say(
            f"error: no data folder {data_dir} for {benchmark.folder}; see playground/data/eval/README.md "
            "(or set EVAL_DIR / DATA_DIR)"
        )
        return 1
    python = setting(env, "PYTHON", sys.executable)
    run = benchmark.run(data_dir, run_name(env), env)
    files = run_chunks(python, run, [*run.runner_args(), *shared_runner_args(env), *extra_args], env)
    if files is None:
        return 1
    status = subprocess.call([python, "-m", "llava.eval.merge_chunks", "--out", run.answers, *files], env=env)
    if status != 0:
        return status
    score_args = benchmark.score_args(run)
    if score_args is None:
        return 0
    return subprocess.call([python, "-m", benchmark.scorer, *score_args], env=env)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if env is None else env)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else INPUT_ERROR_STATUS
    try:
        return run_benchmark(get_benchmark(argv[0], env), argv[1:], env)
    except BenchmarkError as err:
        say(f"error: {err}")
        return INPUT_ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
