"""python -m eval.tools.compare end to end on the tiny checkpoint: rows through the runner core, the report's numbers
against the scorer's result JSONs and the answers files, the matched counts, refused rows, flag errors, resuming and
the settings check, and eval.tables rows filled from the results it writes."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from eval.common import read_jsonl, run_record_path, token_stat
from eval.roofline import ModelSpec, prefill_cost
from eval.tables import main as tables_main
from eval.tools import compare, compare_plan, compare_report
from eval.tools.gsearch import PrefillCost
from tests.helpers import REPO, markdown_cells

METHODS = "topk,random,pool,fastv,pdrop"
BUDGETS = "16,64"  # 64 = every patch of the tiny tower (8 x 8), the budget of the table specs' rows


def compare_argv(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("--model-path", str(ckpt), "--output-dir", str(out), "--num-images", "2", "--device", "cpu"),
        *("--methods", METHODS, "--budgets", BUDGETS, "--batch-size", "4", "--max-new-tokens", "3"),
        *("--speed-batch", "2", "--speed-repeats", "1", "--speed-new-tokens", "2", "--no-progress", "--no-plot"),
        *extra,
    ]


@pytest.fixture(scope="module")
def compared(tiny_ckpt, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compare")
    return out, compare.main(compare_argv(tiny_ckpt, out))


def rows_by_key(report: dict) -> dict[str, dict]:
    return {row["key"]: row for row in report["rows"]}


def test_every_row_is_a_runner_run_scored_by_the_benchmark(compared):
    out, report = compared
    rows = rows_by_key(report)
    expected = {"none", "longtail", "topk-matched", "random-matched", "pool-matched"}
    expected |= {f"{m}-{b}" for m in METHODS.split(",") for b in (16, 64)}
    assert set(rows) == expected
    for row in report["rows"]:
        answers = Path(row["answers_file"])
        assert answers.parent.name == "answers" and answers.stem == row["run_name"]
        record = json.loads(run_record_path(answers).read_text())  # the runner's record, before the first answer
        assert record["pruning"] == row["config"]
        if row["status"] != "ok":
            continue
        result = json.loads(Path(row["result_json"]).read_text())
        assert result["benchmark"] == "pope" and result["config"] == row["config"]
        assert row["metric"] == result["headline"]
        answered = [line for line in read_jsonl(answers)]
        assert result["count"] == len(answered) == report["benchmark"]["questions"]
        tokens = [line["tokens"] for line in answered]
        figures = row["figures"]
        assert figures["visual_tokens"] == pytest.approx(token_stat(result["tokens"], "visual_after"))
        assert figures["visual_tokens"] == pytest.approx(statistics.fmean(t["visual_after"] for t in tokens))
        assert figures["kv_final"] == pytest.approx(statistics.fmean(t["kv_final"] for t in tokens))
        per_layer = [statistics.fmean(t.get("visual_per_layer") or [t["visual_after"]]) for t in tokens]
        assert figures["llm_visual_tokens"] == pytest.approx(statistics.fmean(per_layer))
    assert rows["none"]["figures"]["visual_tokens"] == 64
    assert rows["topk-16"]["figures"]["visual_tokens"] == 16
    # PyramidDrop drops inside the LLM: every patch enters it, fewer go on after layer 1 of the tiny model's 2
    pdrop = rows["pdrop-16"]
    assert pdrop["figures"]["visual_tokens"] == 64 and pdrop["figures"]["llm_visual_tokens"] == (64 + 16) / 2
    assert pdrop["note"].startswith("layers 1 of 2")
    assert (out / "comparison.md").is_file() and json.loads((out / "comparison.json").read_text())["rows"]


def test_matched_rows_keep_ours_mean_count(compared):
    _, report = compared
    rows = rows_by_key(report)
    ours = json.loads(Path(rows["longtail"]["result_json"]).read_text())
    count = round(token_stat(ours["tokens"], "visual_after"))
    assert report["matched_count"] == count
    assert rows["topk-matched"]["budget"] == rows["random-matched"]["budget"] == count
    assert rows["pool-matched"]["budget"] == compare_plan.nearest_pool_count(count, 8)
    for key in ("topk-matched", "random-matched", "pool-matched"):
        budget = rows[key]["budget"]
        assert {line["tokens"]["visual_after"] for line in read_jsonl(rows[key]["answers_file"])} == {budget}
        assert rows[key]["config"]["visual_topk"] == budget


def test_rows_the_model_refuses_are_reported_not_dropped(compared):
    out, report = compared
    rows = rows_by_key(report)
    for key in ("fastv-16", "fastv-64"):  # FastV acts before layer 2: the tiny LLM has two layers
        assert rows[key]["status"].startswith("not applicable") and "--fastv-k" in rows[key]["status"]
    text = (out / "comparison.md").read_text()
    assert (
        "FastV (`--visual-pruning none --kv-pruning none --llm-pruning fastv --llm-tokens 16`): not applicable" in text
    )
    assert "`ratio`: the same selection as top-k" in text and "`CrossGET`: needs its fine-tuned cross tokens" in text
    cells = markdown_cells(text)
    assert cells["FastV (16)"]["POPE"] == "not run"


def test_speed_rows_against_no_pruning(compared):
    _, report = compared
    rows = rows_by_key(report)
    assert rows["none"]["speed"]["1"]["prefill_speedup"] == 1.0
    assert rows["none"]["speed"]["batch"]["decode_vs_none"] == 1.0
    for row in report["rows"]:
        if row["status"] == "ok":
            assert set(row["speed"]) == {"1", "batch"}
            assert row["speed"]["1"]["prefill_ms"] > 0 and row["speed"]["batch"]["decode_ms_per_token"] > 0


def test_prefill_ops_count_each_layer_at_its_own_length():
    cost = PrefillCost(ModelSpec("toy", 64, 128, 4, 4, 3, 400, 16))
    assert compare_report.layer_tokens(3, 100, 40) == [100, 100, 100]
    assert compare_report.layer_tokens(3, 100, 40, [40, 40, 10]) == [100, 100, 70]  # 30 dropped before layer 2
    assert cost.prefill([100] * 3) == pytest.approx(prefill_cost(cost.spec, tokens=100).ops)
    lm_head = prefill_cost(cost.spec, 1).lm_head.ops
    layer = {n: (prefill_cost(cost.spec, n).ops - lm_head) / 3 for n in (100, 70)}
    assert cost.prefill([100, 100, 70]) == pytest.approx(2 * layer[100] + layer[70] + lm_head)


def test_rerun_resumes_and_other_settings_are_refused(compared, tiny_ckpt, capsys):
    out, report = compared
    rows = rows_by_key(report)
    before = {key: Path(rows[key]["answers_file"]).read_text() for key in ("none", "longtail", "topk-16")}
    again = compare.main(compare_argv(tiny_ckpt, out, "--methods", "topk", "--budgets", "16", "--no-speed"))
    for key, text in before.items():  # answered already: nothing generated again (same answer ids)
        assert Path(rows[key]["answers_file"]).read_text() == text
    assert rows_by_key(again)["topk-16"]["metric"] == rows["topk-16"]["metric"]
    with pytest.raises(SystemExit) as exit_info:
        compare.main(compare_argv(tiny_ckpt, out, "--methods", "topk", "--budgets", "16", "--alpha", "0.3"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "written with other settings" in err and "pruning.alpha: 0.24 -> 0.3" in err
    for key, text in before.items():
        assert Path(rows[key]["answers_file"]).read_text() == text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--budgets", "0"), "--budgets: a budget must be >= 1 visual token, got 0"),
        (("--budgets", "64,abc"), "--budgets: 'abc' is not an integer"),
        (("--methods", "topk,crossget"), "--methods: unknown method 'crossget'"),
        (("--benchmark", "nope"), "unknown benchmark 'nope'"),
        (("--speed-batch", "0"), "--speed-batch must be >= 1"),
    ],
)
def test_bad_flags_name_the_flag(tiny_ckpt, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(compare_argv(tiny_ckpt, tmp_path / "out", *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # stopped before anything was written


def test_a_budget_above_the_patches_is_refused_before_any_answer(tiny_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(compare_argv(tiny_ckpt, tmp_path / "out", "--budgets", "16,65"))
    assert exit_info.value.code == 2
    assert "--budgets: 65 is above the 64 visual tokens per image" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("**/answers/*.jsonl"))


@pytest.mark.parametrize(("table", "decimals"), [("1", 1), ("5", 2)])
def test_tables_fill_rows_by_config_from_the_comparison(compared, tmp_path, capsys, table, decimals):
    _, report = compared
    rows = rows_by_key(report)
    name = report["model"]["name"]  # the specs' rows are LLaVA-1.5-7B's; the same rows, for the tiny model
    text = (REPO / "eval" / "table_specs" / f"table{table}.json").read_text()
    spec = tmp_path / f"table{table}.json"
    spec.write_text(text.replace("llava-v1.5-7b", name))
    assert tables_main(["--results", report["benchmark"]["folder"], "--spec", str(spec), "--no-paper"]) == 0
    cells = markdown_cells(capsys.readouterr().out)

    def half_up(value: float, places: int) -> str:  # as tables are read (eval.tables)
        return str(Decimal(repr(value)).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))

    def shown(key: str) -> str:  # Table 1 prints the visual tokens per image in parentheses, Table 5 no tokens
        tokens = f" ({half_up(rows[key]['figures']['visual_tokens'], 0)})" if table == "1" else ""
        return half_up(rows[key]["metric"], decimals) + tokens

    assert cells["Top-k (64)"]["POPE"] == shown("topk-64")
    assert cells["Pooling (64)"]["POPE"] == shown("pool-64")
    assert cells["PyramidDrop (64 after its layer)"]["POPE"] == shown("pdrop-64")
    assert cells["Random at ours' count"]["POPE"] == shown("random-matched")
    assert cells["FastV (64 after its layer)"]["POPE"] == "-"  # refused by the model: no result
    assert cells["DivPrune (64)"]["POPE"] == "-"  # not run here
    if table == "1":
        assert cells["Ours"]["POPE"] == shown("longtail")
    else:
        assert cells["LLaVA-1.5"]["POPE"] == shown("none")


def test_plan_arithmetic():
    assert compare_plan.pdrop_schedule(32) == {"pdrop_layers": "8,16,24", "pdrop_ratios": "0.5,0.25,0.125"}
    assert compare_plan.pdrop_schedule(3) == {"pdrop_layers": "1,2", "pdrop_ratios": "0.5,0.25"}
    assert compare_plan.nearest_pool_count(105, 24) == 105  # 7 x 15
    assert compare_plan.nearest_pool_count(109, 24) == 108  # prime: 108 and 110 are as near; the smaller
    assert compare_plan.nearest_pool_count(600, 24) == 576
    assert compare_plan.parse_budgets("64, 128,64") == [64, 128]
    listed = {item["method"]: item["reason"] for item in compare_plan.not_planned()}
    assert {"ratio", "schedule", "CrossGET"} <= set(listed)
    planned = {"topk", "random", "pool", "divprune", "visionzip", "tome", "prumerge", "prumerge_plus", "recovery"}
    assert not planned & set(listed)


def test_a_benchmark_folder_gets_the_scripts_answers_and_results(tiny_ckpt, tmp_path):
    """--benchmark pope --data-dir DIR: each row answers into DIR/answers/<run>.jsonl and is scored into
    DIR/results/<run>.json, the files scripts/v1_5/eval/pope.sh writes for CKPT=<run>."""
    synthetic = tmp_path / "synthetic"
    subprocess.run(
        [sys.executable, "-m", "eval.synthetic", "--out", str(synthetic), "--split", "test", "--num-images", "1"],
        check=True,
        capture_output=True,
    )
    pope = tmp_path / "eval" / "pope"
    pope.mkdir(parents=True)
    shutil.copytree(synthetic / "images", pope / "val2014")
    shutil.copytree(synthetic / "coco", pope / "coco")
    shutil.copy(synthetic / "llava_pope_test.jsonl", pope)
    argv = ["--model-path", str(tiny_ckpt), "--benchmark", "pope", "--data-dir", str(pope), "--device", "cpu"]
    argv += ["--methods", "topk", "--budgets", "16", "--no-speed", "--no-plot", "--no-progress"]
    report = compare.main([*argv, "--output-dir", str(tmp_path / "report")])
    name = tiny_ckpt.name
    expected = {name, f"{name}-longtail", f"{name}-topk-matched", f"{name}-topk-16"}
    assert {path.stem for path in (pope / "answers").glob("*.jsonl")} == expected
    assert {path.stem for path in (pope / "results").glob("*.json")} == expected
    rows = rows_by_key(report)
    assert rows["topk-16"]["metric"] == json.loads((pope / "results" / f"{name}-topk-16.json").read_text())["headline"]
    assert report["benchmark"]["questions"] == len(read_jsonl(pope / "llava_pope_test.jsonl"))
    assert "speed" not in rows["topk-16"] or rows["topk-16"]["speed"] == {}
