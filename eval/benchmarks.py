"""The benchmarks: one spec per benchmark, read by the script driver, the data preparation and the table builder.

A :class:`Benchmark` says everything the pipeline needs to know about one benchmark: its name (the ``benchmark``
of its result JSONs, the table column, ``scripts/v1_5/eval/<name>.sh``), its folder under
``playground/data/eval``, the question file and image folder, which runner reads the questions (a question format
of ``llava/eval``) with which flags, the scorer and how it is called, where answers and results go, how
``python -m eval.prepare`` builds the folder, the table title and what the headline number means.

    python -m llava.eval.run_benchmark pope   # what scripts/v1_5/eval/pope.sh runs: runner -> merge -> scorer
    python -m eval.prepare pope                # builds playground/data/eval/pope from the Hugging Face copy
    python -m eval.benchmarks                  # the table of registered benchmarks (docs/evaluation.md)

Adding a benchmark is one spec plus its scorer (a module whose ``main(argv)`` writes a result JSON with
``eval.common.write_result``), and a question reader only when its question format is new; see
docs/architecture.md, "Add a benchmark". Specs from outside this package register themselves with
:func:`register_benchmark` in a module named by the environment variable ``BENCHMARK_MODULES``.

Pure Python: imports no model code, so runners, scorers, data preparation and tables can all read it.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval import prepare_choice, prepare_open, prepare_short
from eval.common import EvalInputError, format_table
from eval.prepare_io import ImageRefs, Requirement

MODULES_ENV = "BENCHMARK_MODULES"


class BenchmarkError(EvalInputError):
    """An unknown benchmark, a spec that cannot be registered, or a setting a benchmark refuses."""


@dataclass(frozen=True)
class Part:
    """One Hugging Face split a benchmark folder is built from."""

    dataset: str
    config: str | None
    split: str


@dataclass(frozen=True)
class Preparation:
    """How ``python -m eval.prepare`` builds the folder (``build``: the parts' rows -> the files, a list of what
    it wrote) and checks an existing one (``check``: the required files and the image references of the parts)."""

    parts: Mapping[str, Part]
    default_parts: tuple[str, ...]
    build: Callable[[Benchmark, dict[str, Any], Path], list[str]]
    check: Callable[[Benchmark, tuple[str, ...]], tuple[list[Requirement], list[ImageRefs]]]


@dataclass(frozen=True)
class Run:
    """One scripted run: the benchmark, its data folder (as the user gave it: paths are joined as text, so the
    answers, records and results name files exactly as the shell scripts always did), the run name (CKPT), the
    split and the environment."""

    benchmark: Benchmark
    data_dir: str
    ckpt: str
    split: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def path(self, relative: str) -> str:
        """``<data folder>/<relative>``, with ``{split}`` and ``{ckpt}`` filled in."""
        return f"{self.data_dir}/{relative.format(split=self.split, ckpt=self.ckpt)}"

    def file(self, key: str) -> str:
        """One of the benchmark's named files (``Benchmark.files``) in the data folder."""
        return self.path(self.benchmark.files[key])

    @property
    def question_file(self) -> str:
        return self.path(self.benchmark.question_file)

    @property
    def image_folder(self) -> str | None:
        override = self.benchmark.image_folder_env
        if override and self.env.get(override):
            return self.env[override]
        return None if self.benchmark.image_folder is None else self.path(self.benchmark.image_folder)

    @property
    def answers(self) -> str:
        """The merged answers file the scorer reads."""
        return self.path(self.benchmark.answers_file)

    @property
    def chunk_dir(self) -> str:
        """Where the runners write ``<chunks>_<index>.jsonl``, one per GPU."""
        return self.path(self.benchmark.chunk_dir)

    @property
    def result_json(self) -> str:
        return self.path("results/{ckpt}.json")

    def runner_args(self) -> list[str]:
        """The question file, image folder and the benchmark's own runner flags (before the shared ones)."""
        args = ["--question-file", self.question_file]
        if self.image_folder is not None:
            args += ["--image-folder", self.image_folder]
        args += self.benchmark.runner_args
        for name, flags in self.benchmark.env_flags.items():
            if self.env.get(name) == "1":
                args += flags
        return args


@dataclass(frozen=True)
class Benchmark:
    """One benchmark. Paths are relative to its folder; ``{split}`` (the SPLIT setting, default ``split``) and
    ``{ckpt}`` (the run name) are filled in per run."""

    name: str  # result JSONs' "benchmark", table columns, scripts/v1_5/eval/<name>.sh and v1_6
    title: str  # table column title
    headline: str  # what the headline number of its result measures
    folder: str  # playground/data/eval/<folder>
    runner: str  # module that reads the question file: python -m <runner> (a question format of llava/eval)
    question_file: str
    scorer: str  # module run as python -m <scorer> with score_args
    score_args: Callable[[Run], list[str] | None]  # None: nothing to score (a note says why)
    prepare: Preparation | None = None  # how eval.prepare builds the folder (ours all have one)
    image_folder: str | None = None
    image_folder_env: str | None = None  # environment variable that points at another image folder
    runner_args: tuple[str, ...] = ()  # the benchmark's own runner flags
    env_flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # variable set to 1 -> runner flags
    split: str | None = None  # default of SPLIT
    answers_file: str = "answers/{ckpt}.jsonl"
    chunk_dir: str = "answers/{ckpt}"
    files: Mapping[str, str] = field(default_factory=dict)  # other files its scorer and preparation share
    aliases: tuple[str, ...] = ()  # other names that eval.prepare and the driver accept
    select: Callable[[Mapping[str, str]], str] | None = None  # the benchmark a script runs, from the environment

    @property
    def script(self) -> str:
        """The script name in scripts/v1_5/eval and scripts/v1_6/eval."""
        return f"{self.name}.sh"

    def run(self, data_dir: str, ckpt: str, env: Mapping[str, str]) -> Run:
        split = (env.get("SPLIT") or self.split) if self.split is not None else None
        return Run(self, data_dir, ckpt, split, env)


_REGISTERED: dict[str, Benchmark] = {}
_NAMES: dict[str, str] = {}  # name, folder or alias -> name


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    """Add a benchmark (returned, so a module can write ``MINE = register_benchmark(Benchmark(...))``). Its name,
    folder and aliases must not name another benchmark; registering the same spec again changes nothing."""
    if _REGISTERED.get(benchmark.name) is benchmark:
        return benchmark
    if not benchmark.name or "/" in benchmark.name or benchmark.name.startswith("_"):
        raise BenchmarkError(f"benchmark name {benchmark.name!r}: expected a plain name such as 'pope'")
    keys = dict.fromkeys((benchmark.name, benchmark.folder, *benchmark.aliases))
    taken = [key for key in keys if key in _NAMES]
    if taken:
        raise BenchmarkError(
            f"cannot register benchmark {benchmark.name!r}: {', '.join(map(repr, taken))} already names "
            f"benchmark {_NAMES[taken[0]]!r}"
        )
    prepare = benchmark.prepare
    if prepare is not None and not set(prepare.default_parts) <= set(prepare.parts):
        raise BenchmarkError(f"benchmark {benchmark.name!r}: default parts must be among {sorted(prepare.parts)}")
    _REGISTERED[benchmark.name] = benchmark
    _NAMES.update(dict.fromkeys(keys, benchmark.name))
    return benchmark


def load_benchmark_modules(env: Mapping[str, str] | None = None) -> None:
    """Import the modules named in BENCHMARK_MODULES (comma-separated), which register benchmarks of their own."""
    value = (os.environ if env is None else env).get(MODULES_ENV, "")
    for module in filter(None, (name.strip() for name in value.split(","))):
        if module in sys.modules:
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise BenchmarkError(f"{MODULES_ENV} names {module!r}, which cannot be imported: {err}") from None


def registered_benchmarks(env: Mapping[str, str] | None = None) -> tuple[Benchmark, ...]:
    """Every benchmark, in registration order (ours first)."""
    load_benchmark_modules(env)
    return tuple(_REGISTERED.values())


def get_benchmark(name: str, env: Mapping[str, str] | None = None) -> Benchmark:
    """The benchmark with this name, folder or alias."""
    load_benchmark_modules(env)
    if name not in _NAMES:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose from {', '.join(_REGISTERED)}")
    return _REGISTERED[_NAMES[name]]


# ---- the benchmarks -----------------------------------------------------------------------------------------------
# Flags and calls as upstream's scripts/v1_5/eval/*.sh; the runners get --temperature 0 and the shared settings
# from llava.eval.run_benchmark.

LOADER = "llava.eval.model_vqa_loader"  # short answers, one JSON line per question
SCIENCE = "llava.eval.model_vqa_science"  # ScienceQA's JSON list, multiple choice
MMBENCH_RUNNER = "llava.eval.model_vqa_mmbench"  # MMBench TSVs, images inline
OPEN_ENDED = "llava.eval.model_vqa"  # long answers, same question lines as LOADER


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


register_benchmark(
    Benchmark(
        name="pope",
        title="POPE",
        headline="F1 (%), mean over the adversarial, popular and random sets",
        folder="pope",
        runner=LOADER,
        question_file="llava_pope_test.jsonl",
        image_folder="val2014",
        files={"labels": "coco"},
        scorer="eval.pope",
        score_args=lambda run: [
            *("--annotation-dir", run.file("labels"), "--question-file", run.question_file),
            *("--result-file", run.answers, "--result-json", run.result_json),
        ],
        prepare=Preparation(
            {"test": Part("POPE", None, "test")}, ("test",), prepare_short.build_pope, prepare_short.check_pope
        ),
    )
)

register_benchmark(
    Benchmark(
        name="textvqa",
        title="TextVQA",
        headline="VQA accuracy (%) on val, questions with their OCR tokens",
        folder="textvqa",
        runner=LOADER,
        question_file="llava_textvqa_val_v051_ocr.jsonl",
        image_folder="train_images",
        files={"annotations": "TextVQA_0.5.1_val.json"},
        scorer="eval.textvqa",
        score_args=lambda run: [
            *("--annotation-file", run.file("annotations"), "--result-file", run.answers),
            *("--result-json", run.result_json),
        ],
        prepare=Preparation(
            {"val": Part("textvqa", None, "validation")},
            ("val",),
            prepare_short.build_textvqa,
            prepare_short.check_textvqa,
        ),
    )
)

register_benchmark(
    Benchmark(
        name="mme",
        title="MME",
        headline="perception score (sum over 10 subtasks, at most 2000); cognition in the metrics",
        folder="MME",
        runner=LOADER,
        question_file="llava_mme.jsonl",
        image_folder="MME_Benchmark_release_version",  # also the ground truth the scorer reads
        scorer="eval.mme",
        score_args=lambda run: [
            *("--mme-dir", run.image_folder, "--result-file", run.answers),
            *("--write-mme-txt", run.path("eval_tool/answers/{ckpt}"), "--result-json", run.result_json),
        ],
        prepare=Preparation(
            {"test": Part("MME", None, "test")}, ("test",), prepare_short.build_mme, prepare_short.check_mme
        ),
    )
)

register_benchmark(
    Benchmark(
        name="sqa",
        title="ScienceQA",
        headline="accuracy (%) on the test questions with an image (IMG)",
        folder="scienceqa",
        runner=SCIENCE,
        question_file="llava_test_CQM-A.json",
        image_folder="images/test",
        runner_args=("--single-pred-prompt",),
        scorer="eval.sqa",
        score_args=lambda run: [
            *("--base-dir", run.data_dir, "--result-file", run.answers),
            *("--output-file", run.path("answers/{ckpt}_output.jsonl")),
            *("--output-result", run.path("answers/{ckpt}_result.json"), "--result-json", run.result_json),
        ],
        prepare=Preparation(
            {
                "test": Part("ScienceQA", "ScienceQA-FULL", "test"),
                "val": Part("ScienceQA", "ScienceQA-FULL", "validation"),
            },
            ("test",),
            prepare_choice.build_scienceqa,
            prepare_choice.check_scienceqa,
        ),
    )
)


def _mmbench(name: str, title: str, lang: str, dataset: str, dev: str, test: str, aliases: tuple[str, ...]) -> None:
    register_benchmark(
        Benchmark(
            name=name,
            title=title,
            headline="circular accuracy (%) on dev; the test split is scored by the OpenCompass server",
            folder=name,
            aliases=aliases,
            runner=MMBENCH_RUNNER,
            question_file="{split}.tsv",
            split=dev,
            files={"dev": f"{dev}.tsv", "test": f"{test}.tsv"},
            runner_args=("--single-pred-prompt", "--lang", lang),
            env_flags={"MMBENCH_ALL_ROUNDS": ("--all-rounds",)},
            answers_file="answers/{split}/{ckpt}.jsonl",
            chunk_dir="answers/{split}/{ckpt}",
            scorer="eval.mmbench",
            score_args=lambda run: [
                *("--annotation-file", run.question_file, "--result-file", run.answers),
                *("--upload-dir", run.path("answers_upload/{split}"), "--experiment", run.ckpt, "--lang", lang),
                *("--result-json", run.result_json),
            ],
            select=_mmbench_language if name == "mmbench" else None,
            prepare=Preparation(
                {"dev": Part(dataset, None, "dev"), "test": Part(dataset, None, "test")},
                ("dev",),
                prepare_choice.mmbench_builder(lang),
                prepare_choice.check_mmbench,
            ),
        )
    )


MMBENCH_LANGUAGES = {"en": "mmbench", "cn": "mmbench_cn"}


def _mmbench_language(env: Mapping[str, str]) -> str:
    """mmbench.sh runs MMBench-CN when MMBENCH_LANG=cn (what upstream's mmbench_cn.sh is)."""
    lang = env.get("MMBENCH_LANG") or "en"
    if lang not in MMBENCH_LANGUAGES:
        raise BenchmarkError(f"MMBENCH_LANG must be en or cn, got {lang!r}")
    return MMBENCH_LANGUAGES[lang]


_mmbench("mmbench", "MMBench", "en", "MMBench_EN", "mmbench_dev_20230712", "mmbench_test_en_20231003", ("mmbench_en",))
_mmbench(
    "mmbench_cn",
    "MMBench-CN",
    "cn",
    "MMBench_CN",
    "mmbench_dev_cn_20231003",
    "mmbench_test_cn_20231003",
    ("mmbench-cn",),
)


def _score_vqav2(run: Run) -> list[str]:
    """test-dev: the EvalAI submission file; with VQAV2_ANNOTATIONS (and VQAV2_QUESTIONS), local val accuracy."""
    if run.env.get("VQAV2_ANNOTATIONS"):
        questions = ["--question-json", run.env["VQAV2_QUESTIONS"]] if run.env.get("VQAV2_QUESTIONS") else []
        return [
            *("--result-file", run.answers, "--annotation-file", run.env["VQAV2_ANNOTATIONS"]),
            *questions,
            *("--result-json", run.result_json),
        ]
    return [
        *("--result-file", run.answers, "--test-file", run.file("test"), "--question-file", run.question_file),
        *("--out", run.path("answers_upload/{split}/{ckpt}.json"), "--result-json", run.result_json),
    ]


register_benchmark(
    Benchmark(
        name="vqav2",
        title="VQAv2",
        headline="VQA accuracy (%) on val (VQAV2_ANNOTATIONS); test-dev is scored by the EvalAI server",
        folder="vqav2",
        runner=LOADER,
        question_file="{split}.jsonl",
        split="llava_vqav2_mscoco_test-dev2015",
        image_folder="test2015",
        image_folder_env="VQAV2_IMAGES",
        files={
            "testdev": "llava_vqav2_mscoco_test-dev2015.jsonl",
            "test": "llava_vqav2_mscoco_test2015.jsonl",  # the full test list pads the EvalAI submission
            "val": "llava_vqav2_mscoco_val2014.jsonl",
            "val_questions": "v2_OpenEnded_mscoco_val2014_questions.json",
            "val_annotations": "v2_mscoco_val2014_annotations.json",
        },
        answers_file="answers/{split}/{ckpt}/merge.jsonl",
        chunk_dir="answers/{split}/{ckpt}",
        scorer="eval.vqav2",
        score_args=_score_vqav2,
        prepare=Preparation(
            {
                "testdev": Part("VQAv2", None, "testdev"),
                "test": Part("VQAv2", None, "test"),
                "val": Part("VQAv2", None, "validation"),
            },
            ("testdev", "test"),
            prepare_short.build_vqav2,
            prepare_short.check_vqav2,
        ),
    )
)


def _score_mmvet(run: Run) -> list[str]:
    """Always MM-Vet's grader input; the GPT grade (and a result JSON) only with a judge (JUDGE_MODEL)."""
    grade = []
    if run.env.get("JUDGE_MODEL"):
        grade = ["--grade", "--mmvet-json", run.file("truth"), "--result-json", run.result_json]
    else:
        _note("JUDGE_MODEL is not set: writing the grader input only (no score)")
    return [
        *("--question-file", run.question_file, "--result-file", run.answers),
        *("--out-json", run.path("answers_upload/{ckpt}.json"), *grade),
    ]


register_benchmark(
    Benchmark(
        name="mmvet",
        title="MM-Vet",
        headline="total score (0-100) of a GPT grader (JUDGE_MODEL)",
        folder="mm-vet",
        runner=OPEN_ENDED,
        question_file="llava-mm-vet.jsonl",
        image_folder="images",
        files={"truth": "mm-vet.json"},
        scorer="eval.mmvet",
        score_args=_score_mmvet,
        prepare=Preparation(
            {"test": Part("MMVet", None, "test")}, ("test",), prepare_open.build_mmvet, prepare_open.check_mmvet
        ),
    )
)


def _score_llavabench(run: Run) -> list[str] | None:
    """A GPT review against GPT-4's answers, only with a judge (JUDGE_MODEL)."""
    if not run.env.get("JUDGE_MODEL"):
        _note("JUDGE_MODEL is not set: answers written, review skipped")
        return None
    os.makedirs(run.path("reviews"), exist_ok=True)
    return [
        *("--question", run.question_file, "--context", run.file("context")),
        *("--answer-list", run.file("references"), run.answers),
        *("--output", run.path("reviews/{ckpt}.jsonl"), "--result-json", run.result_json),
    ]


register_benchmark(
    Benchmark(
        name="llavabench",
        title="LLaVA-Bench-in-the-Wild",
        headline="relative score (%): a GPT reviewer's score of the answers over its score of GPT-4's (JUDGE_MODEL)",
        folder="llava-bench-in-the-wild",
        aliases=("llava-bench", "llava_bench"),
        runner=OPEN_ENDED,
        question_file="questions.jsonl",
        image_folder="images",
        files={"context": "context.jsonl", "references": "answers_gpt4.jsonl"},
        scorer="eval.llavabench",
        score_args=_score_llavabench,
        prepare=Preparation(
            {"train": Part("llava-bench-in-the-wild", None, "train")},
            ("train",),
            prepare_open.build_llavabench,
            prepare_open.check_llavabench,
        ),
    )
)


OURS = tuple(_REGISTERED)  # the benchmarks of this repository, each with scripts in scripts/v1_5/eval and v1_6


# ---- the table of benchmarks --------------------------------------------------------------------------------------


def benchmark_table(benchmarks: tuple[Benchmark, ...] | None = None) -> str:
    """A Markdown table of the benchmarks: what docs/evaluation.md shows (a test keeps the two equal)."""
    rows = [
        [
            f"`{b.name}`",
            f"`{b.script}`",
            f"`{b.folder}/`",
            f"`{b.question_file.format(split=b.split)}`" + (" (`SPLIT`)" if b.split else ""),
            f"`{b.runner.rsplit('.', 1)[-1]}`",
            f"`{b.scorer}`",
            b.headline,
        ]
        for b in (benchmarks or registered_benchmarks())
    ]
    header = ["benchmark", "script", "folder", "questions", "runner", "scorer", "headline"]
    return format_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m eval.benchmarks", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    print(benchmark_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
