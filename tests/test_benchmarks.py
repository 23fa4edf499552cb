"""One spec per benchmark (eval/benchmarks.py): every benchmark has its scripts, runner, scorer, data preparation and
table column from its spec, and a benchmark registered from outside the package runs end to end through the
shared script and driver."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from eval import tables
from eval.benchmarks import (
    OURS,
    Benchmark,
    BenchmarkError,
    benchmark_table,
    get_benchmark,
    register_benchmark,
    registered_benchmarks,
)
from llava.eval.run_benchmark import first_line_fields
from llava.eval.runner import QuestionFormat
from tests.helpers import REPO, random_image

SCRIPTS = {version: REPO / "scripts" / version / "eval" for version in ("v1_5", "v1_6")}


@pytest.mark.parametrize("name", OURS)
def test_every_benchmark_has_scripts_runner_scorer_preparation_and_a_table_column_from_its_spec(name, tmp_path):
    bench = get_benchmark(name)
    for folder in SCRIPTS.values():  # upstream's script names, each one line: the shared script and the name
        lines = (folder / bench.script).read_text().splitlines()
        code = [line for line in lines if line.strip() and not line.startswith("#")]
        assert code == [f'exec bash "$(dirname "${{BASH_SOURCE[0]}}")/_common.sh" {bench.name} "$@"']
    assert isinstance(importlib.import_module(bench.runner).FORMAT, QuestionFormat)
    assert callable(importlib.import_module(bench.scorer).main)
    # eval.prepare builds (and --check asks for) the question file and image folder the runner reads
    assert bench.prepare is not None and set(bench.prepare.default_parts) <= set(bench.prepare.parts)
    required, _ = bench.prepare.check(bench, bench.prepare.default_parts)
    run = bench.run("D", "ckpt", {})
    assert run.question_file.removeprefix("D/") in [r.path for r in required]
    if bench.image_folder is not None:
        assert f"{bench.image_folder}/" in [r.path for r in required]
    # a table column needs only the benchmark's name; the title comes from the spec
    spec = {
        "table": "T",
        "caption": "c",
        "row_header": "r",
        "rows": [],
        "columns": [{"benchmark": name, "decimals": 1}],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert tables.load_spec(tmp_path / "spec.json")["columns"][0]["title"] == bench.title
    assert bench.title and bench.headline and get_benchmark(bench.folder) is bench


def test_the_script_folders_hold_one_script_per_benchmark_and_the_shared_one():
    for folder in SCRIPTS.values():
        assert sorted(p.name for p in folder.glob("*.sh")) == sorted(["_common.sh", *(f"{n}.sh" for n in OURS)])


def test_the_docs_list_the_registered_benchmarks():
    assert benchmark_table(tuple(get_benchmark(name) for name in OURS)) in (REPO / "docs" / "evaluation.md").read_text()


@pytest.mark.parametrize("module", ["eval.benchmarks", "eval.tables", "eval.prepare", "llava.eval.run_benchmark"])
def test_the_specs_their_readers_and_the_driver_import_no_model_code(module):
    code = f"import sys, {module}; print(sorted(n for n in sys.modules if n.split('.')[0] in HEAVY))"
    code = "HEAVY = {'torch', 'transformers', 'pruning', 'PIL', 'pandas', 'datasets', 'numpy'}; " + code
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_names_are_unique_and_unknown_ones_are_named():
    pope = get_benchmark("pope")
    with pytest.raises(BenchmarkError, match="'pope' already names benchmark 'pope'"):
        register_benchmark(Benchmark(**{**pope.__dict__, "title": "another POPE"}))
    with pytest.raises(BenchmarkError, match="'sqa' already names benchmark 'sqa'"):
        register_benchmark(Benchmark(**{**pope.__dict__, "name": "pope2", "folder": "pope2", "aliases": ("sqa",)}))
    with pytest.raises(BenchmarkError, match="unknown benchmark 'nope'; choose from pope, textvqa"):
        get_benchmark("nope")
    with pytest.raises(BenchmarkError, match="BENCHMARK_MODULES names 'no.such.module'"):
        registered_benchmarks({"BENCHMARK_MODULES": "no.such.module"})
    assert [b.name for b in registered_benchmarks()] == list(OURS)
    assert get_benchmark("scienceqa").name == "sqa"  # the folder name works too


@pytest.mark.parametrize("value", ["", "0", "4,5,7", "0,,1,", ",", "a,,", " a , b ", "0,1\n2,3"])
def test_gpu_list_is_split_as_the_shell_did(value):
    """CUDA_VISIBLE_DEVICES -> one chunk per field, as `IFS=',' read -r -a gpus` made of it."""
    shell = 'IFS="," read -r -a f <<< "$V"; for x in "${f[@]}"; do printf "%s\\0" "$x"; done'
    done = subprocess.run(["bash", "-c", shell], env={"V": value}, capture_output=True, text=True, check=True)
    assert first_line_fields(value, ",") == done.stdout.split("\0")[:-1]


@pytest.mark.parametrize("value", ["", "--a  b\t--c", " x ", "--a b\n--c d"])
def test_pruning_args_are_split_as_the_shell_did(value):
    shell = 'read -r -a f <<< "$V"; for x in "${f[@]}"; do printf "%s\\0" "$x"; done'
    done = subprocess.run(["bash", "-c", shell], env={"V": value}, capture_output=True, text=True, check=True)
    assert first_line_fields(value, " ") == done.stdout.split("\0")[:-1]


def test_a_benchmark_registered_outside_the_package_runs_through_the_shared_script_and_reaches_a_table(
    tiny_ckpt, tmp_path
):
    """tests/toy_benchmark.py: a spec and a scorer, nothing else; the shared script finds it via BENCHMARK_MODULES,
    runs the short-answer runner on the tiny model in two chunks, merges them, scores, and eval.tables reads the
    result."""
    from tests.toy_benchmark import write_question_folder

    data = tmp_path / "eval" / "toy"
    write_question_folder(data, [random_image(seed, (80 + 8 * seed, 64)) for seed in range(3)])
    env = {k: v for k, v in os.environ.items() if k not in ("CONV_MODE", "MODEL_BASE", "DATA_DIR", "SPLIT")}
    env.update(BENCHMARK_MODULES="tests.toy_benchmark", MODEL_PATH=str(tiny_ckpt), EVAL_DIR=str(tmp_path / "eval"))
    env.update(PYTHON=sys.executable, CKPT="tiny", CUDA_VISIBLE_DEVICES="cpu0,cpu1", BATCH_SIZE="2")
    env["PRUNING_ARGS"] = "--visual-pruning longtail --kv-pruning h2o"
    script = SCRIPTS["v1_5"] / "_common.sh"
    args = ["--device", "cpu", "--max_new_tokens", "3", "--no-progress"]
    done = subprocess.run(["bash", str(script), "toy", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "toy: " in done.stdout and "of 6 right" in done.stdout

    assert sorted(p.name for p in (data / "answers" / "tiny").iterdir()) == [
        "2_0.jsonl", "2_0.run.json", "2_1.jsonl", "2_1.run.json"
    ]  # fmt: skip
    answers = [json.loads(line) for line in (data / "answers" / "tiny.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == list(range(6))
    result = json.loads((data / "results" / "tiny.json").read_text())
    assert result["benchmark"] == "toy" and result["count"] == 6 and result["label"] == "tiny"
    assert result["run"]["benchmark"] == "model_vqa_loader" and result["config"]["kv_pruning"] == "h2o"
    assert 0 < result["tokens"]["per_image"]["visual_after"] < result["tokens"]["per_image"]["visual_before"]

    spec = {
        "table": "toy",
        "caption": "The toy benchmark ({model}).",
        "model": "none",
        "row_header": "Run",
        "tokens": "visual_after",
        "columns": [{"benchmark": "toy", "decimals": 1}],
        "rows": [{"label": "tiny, both stages", "match": {"ckpt": "tiny", "config": {"kv_pruning": "h2o"}}}],
    }
    (tmp_path / "toy_table.json").write_text(json.dumps(spec))
    table = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval.tables",
            "--results",
            str(tmp_path / "eval"),
            "--spec",
            str(tmp_path / "toy_table.json"),
            "--no-paper",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert table.returncode == 0, table.stderr
    visual = round(result["tokens"]["per_image"]["visual_after"])
    assert "| Run | Toy yes/no |" in table.stdout
    assert f"| tiny, both stages | {result['headline']:.1f} ({visual}) |" in table.stdout
    assert "The toy benchmark (llava-v1.5-tiny)." in table.stdout
