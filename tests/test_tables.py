"""eval.tables on a synthetic playground of scorer result JSONs, checked cell by cell."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from eval.tables import TABLES, SpecError, load_spec, main, spec_path
from tests.helpers import markdown_cells


def write_result(root: Path, bench: str, ckpt: str, headline: float, **tokens: float) -> Path:
    path = root / bench / "results" / f"{ckpt}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": bench, "headline": headline, "count": 100, "metrics": {"headline": headline}}
    if tokens:
        result["tokens"] = {"visual_before": 576, **tokens}
    path.write_text(json.dumps(result))
    return path


@pytest.fixture()
def playground(tmp_path: Path) -> Path:
    """The layout the eval scripts write: <bench>/results/<ckpt>.json, plus files that are not results."""
    root = tmp_path / "eval"
    write_result(root, "pope", "llava-v1.5-7b-topk", 86.21, visual_after=218, kv_final=250.0)
    write_result(root, "pope", "llava-v1.5-7b-longtail", 86.43, visual_after=195.4, kv_final=197.6)
    write_result(root, "textvqa", "llava-v1.5-7b-longtail", 55.125, visual_after=250.5, kv_final=253.2)
    write_result(root, "mme", "llava-v1.5-7b-longtail", 1431.08)  # a scorer that wrote no token statistics
    write_result(root, "pope", "llava-v1.5-7b-longtail-h2o", 86.5, visual_after=195.4, kv_final=180.0)
    write_result(root, "mmvet", "llava-v1.5-7b", 31.1, visual_after=576, kv_final=713.6)
    write_result(root, "sqa", "llava-v1.5-7b", 69.51, visual_after=576, kv_final=650.0)
    write_result(root, "mme", "llava-v1.5-7b-ratio0.1", 1330.6251, visual_after=58, kv_final=120.0)
    (root / "pope" / "llava_pope_test.json").write_text("{}")  # outside results/: never read
    (root / "pope" / "results" / "notes.json").write_text('{"comment": "not a result"}')
    (root / "textvqa" / "results" / "broken.json").write_text("{not json")
    write_result(root, "mme", "nan-run", float("nan"))
    return root


def run(capsys, *argv: str) -> tuple[str, str]:
    assert main(list(argv)) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_table1_markdown_cell_by_cell(playground, capsys):
    out, err = run(capsys, "--results", str(playground), "--table", "1")
    assert out.startswith("**Table 1.** The effectiveness of the dynamic visual token pruning")
    cells = markdown_cells(out)
    assert list(cells)[:2] == ["Topk", "Ours"]  # then the rows of eval.tools.compare's runs
    assert cells["Topk"] == {
        "POPE": "86.2 (218)", "POPE (paper)": "86.5 (218)", "Δ POPE": "-0.3",
        "TextVQA": "-", "TextVQA (paper)": "54.97 (272)", "Δ TextVQA": "-",
        "MME": "-", "MME (paper)": "1417.5 (222)", "Δ MME": "-",
    }  # fmt: skip
    assert cells["Ours"] == {
        "POPE": "86.4 (195)", "POPE (paper)": "86.5 (195)", "Δ POPE": "-0.1",
        "TextVQA": "55.13 (251)", "TextVQA (paper)": "55.28 (251)", "Δ TextVQA": "-0.15",
        "MME": "1431.1 (-)", "MME (paper)": "1426.5 (200)", "Δ MME": "+4.6",
    }  # fmt: skip
    for skipped in ("notes.json", "broken.json", "nan-run.json"):
        assert skipped in err
    assert "llava_pope_test.json" not in err


def test_table2_counts_total_tokens(playground, capsys):
    cells = markdown_cells(run(capsys, "--results", str(playground), "--table", "2")[0])
    assert cells["Visual"]["POPE"] == "86.4 (198)"  # kv_final, not visual_after
    assert cells["Visual + Text"]["POPE"] == "86.5 (180)"
    assert cells["Visual + Text"]["Δ POPE"] == "0.0"
    assert cells["Visual + Text"]["TextVQA (paper)"] == "55.26 (254)"


def test_table4_and_table7_layouts(playground, capsys):
    cells = markdown_cells(run(capsys, "--results", str(playground), "--table", "4")[0])
    assert cells["LLaVA"]["MM-Vet"] == "31.1 (714)"
    assert cells["LLaVA"]["MM-Vet (paper)"] == "30.5 (714)"
    assert cells["LLaVA"]["Δ MM-Vet"] == "+0.6"
    assert cells["Visual + Text"]["LLaVA-Bench-in-the-Wild (paper)"] == "66.2 (192)"
    cells = markdown_cells(run(capsys, "--results", str(playground), "--table", "7")[0])
    assert cells["10%"]["MME"] == "1330.63"  # no parentheses: the paper prints none in Table 7
    assert cells["10%"]["Δ MME"] == "0.00"
    assert cells["50%"]["POPE (paper)"] == "85.70"


def test_table5_sections_and_paper_only_rows(playground, capsys):
    out, _ = run(capsys, "--results", str(playground), "--table", "5", "--no-paper")
    cells = markdown_cells(out)
    assert "| **Training-Free Method** |" in out and "| **Fine-tuning Method** |" in out
    assert cells["LLaVA-1.5"]["ScienceQA"] == "69.51"
    assert cells["BLIP-2"] == dict.fromkeys(["ScienceQA", "POPE", "MMBench", "VQAv2", "TextVQA", "MME"], "-")
    assert "POPE (paper)" not in cells["LLaVA-1.5"]


def test_two_matching_results_are_never_silently_picked(playground, capsys):
    spec = json.loads(spec_path("1").read_text())
    spec["rows"][1]["match"] = {"ckpt": "llava-v1.5-7b-longtail*"}
    custom = playground.parent / "spec.json"
    custom.write_text(json.dumps(spec))
    out, err = run(capsys, "--results", str(playground), "--spec", str(custom))
    cells = markdown_cells(out)
    assert (cells["Ours"]["POPE"], cells["Ours"]["Δ POPE"]) == ("?", "-")
    assert cells["Ours"]["TextVQA"] == "55.13 (251)"  # only one textvqa result matches the wider glob
    assert "2 results match" in err and "llava-v1.5-7b-longtail-h2o.json" in err


def test_match_on_label_model_and_config(tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.json").write_text(
        json.dumps({"benchmark": "pope", "headline": 80.0, "label": "run-a", "config": {"visual_pruning": "topk"}})
    )
    (flat / "b.json").write_text(
        json.dumps({"benchmark": "pope", "headline": 81.0, "model": "ckpts/x", "config": {"visual_pruning": "none"}})
    )
    spec = {
        "table": "X",
        "caption": "custom",
        "row_header": "Run",
        "columns": [{"benchmark": "pope", "title": "POPE", "decimals": 1}],
        "rows": [
            {"label": "by config", "match": {"config": {"visual_pruning": "topk"}}},
            {"label": "by label", "match": {"label": "run-*"}},
            {"label": "by model", "match": {"model": "ckpts/*", "config": {"visual_pruning": "none"}}},
            {"label": "no match", "match": {"label": "other"}, "paper": {"pope": 85.0}},
        ],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    cells = markdown_cells(run(capsys, "--results", str(flat), "--spec", str(tmp_path / "spec.json"))[0])
    assert [cells[row]["POPE"] for row in ("by config", "by label", "by model", "no match")] == [
        "80.0",
        "80.0",
        "81.0",
        "-",
    ]
    assert cells["no match"]["POPE (paper)"] == "85.0"


def test_csv_has_numbers_in_their_own_columns(playground, capsys):
    out, _ = run(capsys, "--results", str(playground), "--table", "1", "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][0].startswith("Table 1.")
    records = [dict(zip(rows[1], row)) for row in rows[2:]]
    ours = next(r for r in records if r["Method"] == "Ours")
    assert (ours["TextVQA"], ours["TextVQA tokens"], ours["TextVQA paper"], ours["TextVQA diff"]) == (
        "55.13", "251", "55.28", "-0.15",
    )  # fmt: skip
    assert (ours["MME tokens"], ours["MME paper tokens"]) == ("-", "200")


def test_latex_is_escaped_and_grouped(playground, capsys):
    out, _ = run(capsys, "--results", str(playground), "--table", "7", "--format", "latex")
    assert out.startswith("\\begin{table}") and out.rstrip().endswith("\\end{table}")
    assert "\\multicolumn{3}{c}{POPE}" in out and "\\cmidrule(lr){2-4}" in out
    assert "10\\% & - & 78.72 & - & - & 54.28 & - & 1330.63 & 1330.63 & 0.00 \\\\" in out
    assert "$\\Delta$" in out
    table5 = run(capsys, "--results", str(playground), "--table", "5", "--format", "latex")[0]
    assert "\\multicolumn{19}{l}{\\textit{Training-Free Method}} \\\\" in table5


def test_all_tables_to_a_file(playground, tmp_path, capsys):
    out_file = tmp_path / "tables" / "all.md"
    assert main(["--results", str(playground), "--table", "all", "--out", str(out_file)]) == 0
    text = out_file.read_text()
    assert [f"**Table {t}.**" in text for t in TABLES] == [True] * len(TABLES)
    assert capsys.readouterr().out == ""


def test_empty_results_folder_gives_paper_only_tables(tmp_path, capsys):
    cells = markdown_cells(run(capsys, "--results", str(tmp_path), "--table", "3")[0])
    assert cells["Fine-tuning"]["ScienceQA"] == "-"
    assert cells["Fine-tuning"]["ScienceQA (paper)"] == "70.15"


def test_bad_arguments_and_specs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--results", str(tmp_path), "--table", "6"])
    assert "eval.roofline" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--results", str(tmp_path / "missing"), "--table", "1"])
    assert "missing is not a folder" in capsys.readouterr().err
    bad = tmp_path / "bad_spec.json"
    spec = json.loads(spec_path("1").read_text())
    spec["rows"][0]["match"] = {"checkpoint": "x"}
    bad.write_text(json.dumps(spec))
    with pytest.raises(SpecError, match=r"bad_spec\.json: row 'Topk': unknown match key 'checkpoint'"):
        load_spec(bad)
    spec["rows"][0]["match"] = {"ckpt": "x"}
    spec["rows"][0]["paper"]["mmvet"] = 1.0
    bad.write_text(json.dumps(spec))
    with pytest.raises(SystemExit):
        main(["--results", str(tmp_path), "--spec", str(bad)])
    assert "paper names 'mmvet', which is not a column" in capsys.readouterr().err


def test_shipped_specs_agree_with_each_other():
    """Transcription checks: the paper repeats some figures across tables."""
    specs = {t: load_spec(spec_path(t)) for t in TABLES}

    def paper(table: str, label: str) -> dict:
        return next(r for r in specs[table]["rows"] if r.get("label") == label)["paper"]

    assert paper("3", "Training-Free") == paper("5", "LLaVA-1.5 + Ours")
    assert paper("3", "Fine-tuning") == paper("5", "LLaVA-1.5-7B + Ours")
    assert paper("8", "50%") == {k: paper("5", "InternVL2-1B + Ours")[k] for k in ("pope", "textvqa", "mme")}
    assert paper("1", "Ours") == paper("2", "Visual")
    assert {r["match"]["ckpt"] for r in specs["2"]["rows"]} == {"llava-v1.5-7b-longtail", "llava-v1.5-7b-longtail-h2o"}
