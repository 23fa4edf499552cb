"""InternVL2 on the benchmarks: its official question wordings (--prompt-style) and its scripts end to end.

The `official_*` functions transcribe how OpenGVLab/InternVL (2410d1db, internvl_chat/eval) builds each question from
the benchmark's fields; the styles must turn LLaVA's question-file text (as eval.prepare writes it and the runners
read it) into exactly that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.prepare_choice import sqa_prompt
from eval.prepare_io import SHORT_ANSWER
from eval.tables import build_grid, load_results, load_spec, spec_path
from llava.eval.prompt_styles import LETTER, PromptStyleError, restyle
from llava.eval.runner import Sample
from llava.testing.tiny_internvl import write_tiny_internvl
from tests.helpers import pope_fixture, read_jsonl, scienceqa_fixture

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "internvl2" / "eval"
PROMPT = "Answer the question using a single word or phrase."
RUN = "internvl2-1b-longtail-h2o"  # the run name Table 5's "InternVL2-1B + Ours" row reads


def official_vqa(question: str) -> str:  # vqa/evaluate_vqa.py, VQADataset.__getitem__
    return question + " " + PROMPT


def official_mme(question: str) -> str:  # mme/eval.py: the MME line's question, then ' ' + prompt
    return question + " " + PROMPT


def official_sqa(hint: str, question: str, choices: list[str]) -> str:  # scienceqa/evaluate_scienceqa.py
    hint = hint if hint else None
    choice_txt = "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(choices))
    if hint is not None:
        question = hint + "\n" + question
    question += "\n" + choice_txt
    question += "\n" + "Answer with the option's letter from the given choices directly."
    return question.strip()


def styled(style: str, runner: str, text: str) -> str:
    sample = Sample("q", text, "test")
    [out] = restyle(style, runner, [sample])
    assert out.error is None, out.error
    return out.text


def test_short_answer_wordings_are_internvls():
    question = "what is the brand of this camera?\nReference OCR token: Canon, EOS"
    assert styled("internvl2_vqa", "model_vqa_loader", question + SHORT_ANSWER) == official_vqa(question)
    mme = "Is this photo taken in a place of worship? Please answer yes or no."
    llava_mme = "Is this photo taken in a place of worship?" + SHORT_ANSWER  # eval.prepare drops the yes/no line
    assert styled("internvl2_mme", "model_vqa_loader", llava_mme) == official_mme(mme)
    assert styled("internvl2_mmvet", "model_vqa", "What is x?") == "What is x? "
    assert styled("internvl2_llavabench", "model_vqa", "Why?") == "Why? Please give a detailed answer."


@pytest.mark.parametrize("hint", ["", "The figure shows a map.\nIt is old."])
def test_scienceqa_wording_is_internvls(hint):
    question, choices = "Which state is farthest north?", ["Ohio", "Maine", "Texas"]
    # what the ScienceQA runner hands on: <image> removed, the letter line added (--single-pred-prompt)
    text = sqa_prompt(question, hint, choices, has_image=True).removeprefix("<image>\n") + "\n" + LETTER
    assert styled("internvl2_sqa", "model_vqa_science", text) == official_sqa(hint, question, choices)


def test_styles_refuse_other_runners_and_other_layouts():
    with pytest.raises(PromptStyleError, match="internvl2_sqa is for llava.eval.model_vqa_science"):
        restyle("internvl2_sqa", "model_vqa_loader", [Sample("q", "x", "t")])
    [bad] = restyle("internvl2_vqa", "model_vqa_loader", [Sample("q", "no instruction here", "f line 3")])
    assert "expected a question ending with" in bad.error
    unchanged = Sample("q", "x" + SHORT_ANSWER, "t")
    assert restyle("llava", "model_vqa_loader", [unchanged])[0].text == "x" + SHORT_ANSWER


# ---- the scripts, end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_internvl(tmp_path_factory) -> Path:
    return write_tiny_internvl(tmp_path_factory.mktemp("internvl_eval") / "InternVL2-1B-tiny", seed=3)


def run_script(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )


def script_env(model: Path, eval_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(MODEL_PATH=str(model), EVAL_DIR=str(eval_dir), PYTHON=sys.executable, CKPT=RUN, BATCH_SIZE="2")
    env.update(PRUNING_ARGS="--visual-pruning longtail --kv-pruning h2o")
    return env


def check_answers(root: Path, count: int, style: str | None) -> list[dict]:
    rows = read_jsonl(root / "answers" / f"{RUN}.jsonl")
    assert len(rows) == count
    record = json.loads((root / "answers" / f"{RUN}.run.json").read_text(encoding="utf-8"))
    assert record["conv_mode"] == "Hermes-2"
    assert record["options"].get("prompt_style") == style
    result = json.loads((root / "results" / f"{RUN}.json").read_text(encoding="utf-8"))
    assert result["count"] == count and result["run"] == record
    with_image = [r["tokens"] for r in rows if r["tokens"]["visual_before"]]
    assert with_image and all(t["visual_before"] % 16 == 0 for t in with_image)  # 16 merged tokens per tile
    assert all(t["visual_after"] <= t["visual_before"] and t["kv_final"] <= t["prompt"] for t in with_image)
    assert all(len(t["crop_kept"]) == t["crops"][0] for t in with_image)
    return rows


def test_pope_script(tiny_internvl, tmp_path):
    root = tmp_path / "eval" / "pope"
    questions = pope_fixture(root)
    done = run_script(
        "pope.sh",
        script_env(tiny_internvl, tmp_path / "eval"),
        "--device",
        "cpu",
        "--no-progress",
        "--max_new_tokens",
        "4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "InternVL2: MODEL_PATH=" in done.stderr and "mean F1" in done.stdout
    rows = check_answers(root, 6, None)
    asked = {row["question_id"]: row["text"] for row in read_jsonl(questions)}
    assert all(row["prompt"] == asked[row["question_id"]] for row in rows)  # what the POPE scorer pairs by


def test_scienceqa_script(tiny_internvl, tmp_path):
    root = tmp_path / "eval" / "scienceqa"
    scienceqa_fixture(root)
    done = run_script(
        "sqa.sh",
        script_env(tiny_internvl, tmp_path / "eval"),
        "--device",
        "cpu",
        "--no-progress",
        "--max_new_tokens",
        "4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = check_answers(root, 4, "internvl2_sqa")
    assert sum("<image>" in row["prompt"] for row in rows) == 3  # the scorer's IMG subset, as with LLaVA
    result = json.loads((root / "results" / f"{RUN}.json").read_text(encoding="utf-8"))
    assert result["benchmark"] == "sqa" and result["metrics"]["img_total"] == 3
    # the result lands in Table 5's "InternVL2-1B + Ours" row, ScienceQA column
    spec = load_spec(spec_path("5"))
    grid = {row.label: row.cells for row in build_grid(spec, load_results(tmp_path / "eval"), warn=lambda m: None)}
    columns = [column["benchmark"] for column in spec["columns"]]
    assert grid["InternVL2-1B + Ours"][columns.index("sqa")].ours == result["headline"]
    assert grid["InternVL2-1B"][columns.index("sqa")].ours is None


def test_scripts_pass_each_benchmarks_wording(tmp_path):
    """Every InternVL2 script runs the v1_5 driver on its benchmark with its style and length (a stub python logs)."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\nexit 2\n')
    stub.chmod(0o755)
    expected = {
        "pope.sh": ("pope", "--max_new_tokens 100"),
        "textvqa.sh": ("textvqa", "--prompt-style internvl2_vqa --max_new_tokens 10"),
        "vqav2.sh": ("vqav2", "--prompt-style internvl2_vqa --max_new_tokens 10"),
        "mme.sh": ("mme", "--prompt-style internvl2_mme --max_new_tokens 20"),
        "sqa.sh": ("sqa", "--prompt-style internvl2_sqa --max_new_tokens 100"),
        "mmbench.sh": ("mmbench", "--max_new_tokens 100"),
        "mmbench_cn.sh": ("mmbench_cn", "--max_new_tokens 100"),
        "mmvet.sh": ("mmvet", "--prompt-style internvl2_mmvet --max_new_tokens 1000"),
        "llavabench.sh": ("llavabench", "--prompt-style internvl2_llavabench --max_new_tokens 1000"),
    }
    assert sorted(p.name for p in SCRIPTS.glob("*.sh") if p.name != "_common.sh") == sorted(expected)
    env = {**os.environ, "PYTHON": str(stub)}
    env.pop("MODEL_PATH", None)
    for script, (benchmark, flags) in expected.items():
        run_script(script, env, "--batch-size", "4")
        assert log.read_text().splitlines()[-1] == f"-m llava.eval.run_benchmark {benchmark} {flags} --batch-size 4"
    done = run_script("pope.sh", env)
    assert "InternVL2: MODEL_PATH=OpenGVLab/InternVL2-1B" in done.stderr
