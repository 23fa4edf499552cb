"""Every answer and result knows what produced it (issue #27): run records, refused resumes, retried failures,
per-image token means, tables for your own runs, and the scripts' smaller traps."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval import tables
from eval.common import INPUT_ERROR_STATUS, run_record_path, token_means, token_stat
from llava.eval import merge_chunks, model_vqa_loader, run_record
from llava.utils import default_conv_mode
from tests.helpers import REPO, random_image, read_jsonl

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

DEMO = REPO / "playground" / "checkpoints" / "llava-v1.5-demo"
POPE_MINI = REPO / "playground" / "data" / "eval" / "pope-mini"
SCRIPTS = REPO / "scripts" / "v1_5" / "eval"
SUFFIX = "\nAnswer the question using a single word or phrase."


def pope_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPTS / "pope.sh"), "--no-progress", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


# ---- the user journey: pope.sh on the bundled demo checkpoint and pope-mini -----------------------------------


def test_rerun_with_other_pruning_is_refused_overwrite_answers_afresh_and_tables_match_on_settings(tmp_path):
    data = tmp_path / "pope-mini"
    shutil.copytree(POPE_MINI, data)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "CONV_MODE", "MODEL_BASE")}
    env.update(MODEL_PATH=str(DEMO), DATA_DIR=str(data), PYTHON=sys.executable, CKPT="demo", BATCH_SIZE="4")
    stage1 = "--visual-pruning longtail --alpha 0.24"
    first = pope_script({**env, "PRUNING_ARGS": stage1})
    assert first.returncode == 0, first.stderr[-3000:]
    result_file = data / "results" / "demo.json"
    before = json.loads(result_file.read_text())
    assert before["config"]["visual_pruning"] == "longtail" and before["config"]["kv_pruning"] == "none"
    assert before["model"] == str(DEMO) and before["run"]["conv_mode"] == "vicuna_v1"  # the eval default
    assert before["config"]["visual_layer"] == 3  # the checkpoint's own default, resolved into the record

    # same CKPT, other pruning: refused before the model loads, naming the difference; the old files stay
    answers = data / "answers" / "demo.jsonl"
    kept = answers.read_bytes()
    again = pope_script({**env, "PRUNING_ARGS": f"{stage1} --kv-pruning h2o"})
    assert again.returncode != 0
    assert "pruning.kv_pruning: 'none' -> 'h2o'" in again.stderr and "--overwrite" in again.stderr
    assert "stopped on its input or settings" in again.stderr and "rerun the script to resume" not in again.stderr
    assert answers.read_bytes() == kept and json.loads(result_file.read_text()) == before

    # --overwrite answers afresh with the new settings, and the result says so
    fresh = pope_script({**env, "PRUNING_ARGS": f"{stage1} --kv-pruning h2o"}, "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    after = json.loads(result_file.read_text())
    assert after["config"]["kv_pruning"] == "h2o" and after["run"]["pruning"] == after["config"]
    assert after["tokens"]["kv_final"] < before["tokens"]["kv_final"]  # stage 2 evicted

    # a second run under another name, and a table of your own that finds both by their settings
    other = pope_script({**env, "CKPT": "exp1/demo", "PRUNING_ARGS": ""})
    assert other.returncode == 0, other.stderr[-3000:]
    spec = {
        "table": "A",
        "caption": "POPE ({model}).",
        "model": "LLaVA-1.5-7B",
        "row_header": "Setting",
        "tokens": "visual_after",
        "columns": [{"benchmark": "pope", "title": "POPE", "decimals": 2}],
        "rows": [
            {"label": "none", "match": {"config": {"visual_pruning": "none"}}},
            {"label": "both", "match": {"config": {"visual_pruning": "longtail", "kv_pruning": "h2o"}}},
            {"label": "by name", "match": {"ckpt": "demo"}},
        ],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "table.md"
    assert tables.main(["--results", str(data), "--spec", str(tmp_path / "spec.json"), "--out", str(out)]) == 0
    text = out.read_text()
    unpruned = json.loads((data / "results" / "exp1" / "demo.json").read_text())
    both = f"{after['headline']:.2f} ({round(after['tokens']['per_image']['visual_after'])})"
    assert f"| none | {unpruned['headline']:.2f} ({round(unpruned['tokens']['per_image']['visual_after'])}) |" in text
    assert f"| both | {both} |" in text and f"| by name | {both} |" in text  # exp1/demo is not "demo"
    assert "POPE (ours: llava-v1.5-demo; paper: LLaVA-1.5-7B)." in text


# ---- the runner, on the tiny model ------------------------------------------------------------------------------


@pytest.fixture
def short_qa(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        random_image(i, (80 + 20 * i, 60)).save(folder / f"img_{i}.png")
    rows = [{"question_id": i, "image": f"img_{i % 3}.png", "text": f"Is there a dog {i}?{SUFFIX}"} for i in range(5)]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return questions, folder


def loader_args(ckpt: Path, questions: Path, folder: Path, answers: Path, *extra: str) -> list[str]:
    return [
        *("--model-path", str(ckpt), "--question-file", str(questions), "--image-folder", str(folder)),
        *("--answers-file", str(answers), "--temperature", "0", "--max_new_tokens", "4", "--no-progress"),
        *extra,
    ]


def test_a_restored_image_gets_its_failed_answer_retried(tiny_ckpt, short_qa, tmp_path) -> None:
    questions, folder = short_qa
    reference = tmp_path / "reference.jsonl"
    model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, reference, "--batch-size", "2"))
    hidden = tmp_path / "img_1.png"
    (folder / "img_1.png").rename(hidden)
    answers = tmp_path / "answers.jsonl"
    model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, answers, "--skip-errors", "--batch-size", "2"))
    assert [r["question_id"] for r in read_jsonl(answers) if r.get("error")] == [1, 4]

    hidden.rename(folder / "img_1.png")  # the user restores the image and reruns the same command
    assert model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, answers, "--batch-size", "2")) == 2
    rows = read_jsonl(answers)
    assert not any(r.get("error") for r in rows) and sorted(r["question_id"] for r in rows) == list(range(5))
    expected = {r["question_id"]: (r["text"], r["tokens"]) for r in read_jsonl(reference)}
    assert {r["question_id"]: (r["text"], r["tokens"]) for r in rows} == expected


def test_changed_settings_are_named_and_a_file_without_record_is_refused(tiny_ckpt, short_qa, tmp_path) -> None:
    questions, folder = short_qa
    answers = tmp_path / "answers.jsonl"
    model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, answers, "--conv-mode", "vicuna_v1"))
    record = json.loads(run_record_path(answers).read_text())
    assert record["generation"]["max_new_tokens"] == 4 and record["vision_tower"].endswith("clip")
    assert record["pruning"]["visual_pruning"] == "none" and len(record["pruning"]) > 10  # every parameter

    changes = {
        ("--conv-mode", "llava_v1"): "conv_mode: 'vicuna_v1' -> 'llava_v1'",
        ("--max_new_tokens", "5"): "generation.max_new_tokens: 4 -> 5",
        ("--visual-pruning", "topk", "--visual-topk", "3"): "pruning.visual_pruning: 'none' -> 'topk'",
    }
    for extra, message in changes.items():  # argparse keeps the last value of a repeated flag
        with pytest.raises(SystemExit) as stop:
            model_vqa_loader.main(
                loader_args(tiny_ckpt, questions, folder, answers, "--conv-mode", "vicuna_v1", *extra)
            )
        assert stop.value.code == INPUT_ERROR_STATUS and message in str(stop.value), str(stop.value)
    # the same settings with another batch size resume (nothing left to do)
    same = loader_args(tiny_ckpt, questions, folder, answers, "--conv-mode", "vicuna_v1", "--batch-size", "3")
    assert model_vqa_loader.main(same) == 0

    run_record_path(answers).unlink()
    with pytest.raises(SystemExit, match="holds answers but no run record"):
        model_vqa_loader.main(same)


def test_a_new_code_version_resumes_and_is_noted(tiny_ckpt, short_qa, tmp_path, monkeypatch) -> None:
    questions, folder = short_qa
    answers = tmp_path / "answers.jsonl"
    lines = [json.dumps(r) for r in [json.loads(line) for line in questions.read_text().splitlines()][:3]]
    first = tmp_path / "first.jsonl"
    first.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(run_record, "code_version", lambda: "v-old")
    # the first three questions under the old code ...
    model_vqa_loader.main(loader_args(tiny_ckpt, first, folder, answers))
    shutil.copy(run_record_path(answers), tmp_path / "old.run.json")
    # ... the rest under the new one, into the same file: allowed, and the record lists both versions
    monkeypatch.setattr(run_record, "code_version", lambda: "v-new")
    assert model_vqa_loader.main(loader_args(tiny_ckpt, questions, folder, answers)) == 2
    record = json.loads(run_record_path(answers).read_text())
    assert record["code_version"] == "v-old" and record["resumed_with"] == ["v-old", "v-new"]


def test_merging_chunks_answered_with_different_settings_is_refused(tmp_path) -> None:
    chunks = []
    for idx, mode in enumerate(("vicuna_v1", "llava_v1")):
        chunk = tmp_path / f"2_{idx}.jsonl"
        chunk.write_text(json.dumps({"question_id": idx}) + "\n")
        run_record.write_record(run_record_path(chunk), {"benchmark": "b", "conv_mode": mode})
        chunks.append(str(chunk))
    assert merge_chunks.main(["--out", str(tmp_path / "merged.jsonl"), *chunks]) == 2
    assert not (tmp_path / "merged.jsonl").exists()
    run_record.write_record(run_record_path(Path(chunks[1])), {"benchmark": "b", "conv_mode": "vicuna_v1"})
    assert merge_chunks.main(["--out", str(tmp_path / "merged.jsonl"), *chunks]) == 0
    assert read_jsonl(tmp_path / "merged.jsonl") == [{"question_id": 0}, {"question_id": 1}]
    assert json.loads((tmp_path / "merged.run.json").read_text())["chunks"] == 2


def test_merging_chunks_that_agree_imports_no_model_code(tmp_path) -> None:
    """Chunks of one run carry the same record: the merge compares them as written and starts in a moment (filling
    in the pruning defaults needs the method registry, i.e. torch and transformers: 3-4 s per merge)."""
    pruning = {"visual_pruning": "longtail", "alpha": 0.24, "visual_layer": 16}
    chunks = []
    for idx in range(2):
        chunk = tmp_path / f"2_{idx}.jsonl"
        chunk.write_text(json.dumps({"question_id": idx}) + "\n")
        run_record.write_record(run_record_path(chunk), {"benchmark": "b", "pruning": pruning})
        chunks.append(str(chunk))
    code = (
        "import sys; from llava.eval import merge_chunks; "
        f"status = merge_chunks.main({['--out', str(tmp_path / 'merged.jsonl'), *chunks]!r}); "
        "print(status, sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers', 'pruning')))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[-2] == "0 []"
    assert read_jsonl(tmp_path / "merged.jsonl") == [{"question_id": 0}, {"question_id": 1}]


def test_an_empty_question_file_is_an_error(tiny_ckpt, tmp_path) -> None:
    empty = tmp_path / "q.jsonl"
    empty.write_text("\n")
    with pytest.raises(SystemExit, match="holds no questions") as stop:
        model_vqa_loader.main(loader_args(tiny_ckpt, empty, tmp_path, tmp_path / "a.jsonl"))
    assert stop.value.code == INPUT_ERROR_STATUS


def test_one_template_rule_for_every_entry_point() -> None:
    class Config:
        model_type = "llava"

    mistral = type("Mistral", (), {"model_type": "llava_mistral"})
    assert default_conv_mode("llava-v1.5-7b", Config, purpose="eval") == "vicuna_v1"  # upstream's eval scripts
    assert default_conv_mode("llava-v1.5-7b", Config) == "llava_v1"  # upstream's run_llava / cli
    assert default_conv_mode("my-finetune", mistral, purpose="eval") == "mistral_instruct"
    assert default_conv_mode("llava-v1.6-34b", Config, purpose="eval") == "chatml_direct"
    with pytest.raises(ValueError, match="purpose"):
        default_conv_mode("x", Config, purpose="serve")


# ---- token means: per question and per image --------------------------------------------------------------------


def test_text_only_questions_do_not_dilute_the_per_image_means() -> None:
    # ScienceQA-like: four image questions, one text-only
    rows = [
        {"tokens": {"visual_before": 576, "visual_after": 100 + i, "inflection": 30, "prompt": 700}} for i in range(4)
    ]
    rows.append({"tokens": {"visual_before": 0, "visual_after": 0, "inflection": None, "prompt": 90}})
    means = token_means(rows)
    assert means["visual_before"] == pytest.approx(576 * 4 / 5)  # per question, as before
    assert means["image_questions"] == 4
    assert means["per_image"] == {"visual_before": 576, "visual_after": 101.5, "inflection": 30}
    assert token_stat(means, "visual_after") == 101.5 and token_stat(means, "prompt") == pytest.approx(578)
    assert token_stat({"visual_after": 80.0}, "visual_after") == 80.0  # results written before per-image means


# ---- tables ------------------------------------------------------------------------------------------------------


def result(path: Path, bench: str, headline: float, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": bench, "headline": headline, **fields}))


def test_tables_name_rows_that_matched_nothing_and_runs_in_subfolders_do_not_collide(tmp_path, capsys) -> None:
    root = tmp_path / "eval"
    result(root / "pope" / "results" / "demo.json", "pope", 80.0)
    result(root / "pope" / "results" / "exp1" / "demo.json", "pope", 70.0)
    assert tables.main(["--results", str(root), "--table", "1", "--no-paper"]) == 0
    captured = capsys.readouterr()
    matching = [row for row in tables.load_spec(tables.spec_path("1"))["rows"] if row.get("match")]
    assert f"table 1: {len(matching)} row(s) matched no result" in captured.err
    assert "'Topk'" in captured.err and "pope: demo, exp1/demo" in captured.err
    assert "(LLaVA-1.5-7B, training-free" in captured.out  # no result matched: the spec's model

    spec = {
        "table": "B",
        "caption": "c",
        "row_header": "r",
        "columns": [{"benchmark": "pope", "title": "P", "decimals": 1}],
    }
    spec["rows"] = [{"label": "a", "match": {"ckpt": "demo"}}, {"label": "b", "match": {"ckpt": "exp1/*"}}]
    (tmp_path / "s.json").write_text(json.dumps(spec))
    assert tables.main(["--results", str(root), "--spec", str(tmp_path / "s.json"), "--no-paper"]) == 0
    out = capsys.readouterr().out
    assert "| a | 80.0 |" in out and "| b | 70.0 |" in out


def test_the_docs_example_spec_is_valid_and_fills_in_the_model(tmp_path, capsys) -> None:
    text = (REPO / "docs" / "reproducing.md").read_text()
    example = re.search(r"### Your own table.*?```json\n(.*?)```", text, re.S).group(1)
    spec_file = tmp_path / "my_table.json"
    spec_file.write_text(example)
    root = tmp_path / "eval"
    settings = {
        "a": ({"visual_pruning": "none", "kv_pruning": "none"}, 85.0),
        "b": ({"visual_pruning": "longtail", "kv_pruning": "none"}, 84.0),
        "c": ({"visual_pruning": "topk", "kv_pruning": "none"}, 83.0),
        "d": ({"visual_pruning": "longtail", "kv_pruning": "h2o"}, 84.5),
    }
    for name, (config, f1) in settings.items():
        tokens = {"visual_after": 50.0, "per_image": {"visual_after": 120.0}}
        result(
            root / "pope" / "results" / f"{name}.json", "pope", f1, config=config, model="/x/my-llava", tokens=tokens
        )
    assert tables.main(["--results", str(root), "--spec", str(spec_file), "--no-paper"]) == 0
    out = capsys.readouterr().out
    assert "POPE with and without pruning (my-llava;" in out
    assert "| No pruning | 85.0 (120) |" in out and "| Stages 1 + 2 | 84.5 (120) |" in out
    assert "| Top-k | 83.0 (120) |" in out


# ---- scripts --------------------------------------------------------------------------------------------------


def stub_bin(tmp_path: Path, status: int) -> Path:
    """A folder with only ``python3`` (no ``python``): a stub runner that logs its call and exits with ``status``,
    the real interpreter for anything else."""
    folder = tmp_path / "bin"
    folder.mkdir()
    stub = folder / "python3"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$2" = llava.eval.model_vqa_loader ]; then echo "$*" >> "{tmp_path}/calls.log"; exit {status}; fi\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    stub.chmod(0o755)
    return folder


@pytest.mark.parametrize("status", [2, 1])
def test_scripts_find_python3_pass_no_template_and_say_whether_a_rerun_helps(tmp_path, status) -> None:
    (tmp_path / "eval" / "pope").mkdir(parents=True)
    folder = stub_bin(tmp_path, status)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "CONV_MODE", "PYTHON")}
    env.update(PATH=f"{folder}:/usr/bin:/bin", EVAL_DIR=str(tmp_path / "eval"))
    if shutil.which("python", path=env["PATH"]):
        pytest.fail("this test needs a PATH without 'python'")
    done = subprocess.run(["bash", str(SCRIPTS / "pope.sh")], env=env, capture_output=True, text=True, check=False)
    call = (tmp_path / "calls.log").read_text()
    assert "-m llava.eval.model_vqa_loader" in call and "--conv-mode" not in call
    assert done.returncode != 0
    if status == 2:
        assert "stopped on its input or settings" in done.stderr and "resume" not in done.stderr
    else:
        assert "rerun the script to resume" in done.stderr
    subprocess.run(["bash", str(SCRIPTS / "pope.sh")], env={**env, "CONV_MODE": "llava_v1"}, check=False)
    assert "--conv-mode llava_v1" in (tmp_path / "calls.log").read_text().splitlines()[-1]


def test_a_record_from_before_a_parameter_existed_still_matches_its_default() -> None:
    from pruning import PruningConfig

    now = PruningConfig(visual_pruning="longtail").to_dict()
    older = {k: v for k, v in now.items() if k != "llm_pruning"}  # written before --llm-pruning existed
    assert run_record.differences({"pruning": older}, {"pruning": now}) == []
    other = {**now, "alpha": 0.5}
    assert run_record.differences({"pruning": older}, {"pruning": other}) == ["pruning.alpha: 0.24 -> 0.5"]
