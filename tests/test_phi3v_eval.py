"""Phi-3-vision on the benchmarks: its chat template through every entry point, and its scripts end to end (POPE and
ScienceQA fixtures in the official layouts -> scripts/phi3v/eval/*.sh on a tiny Phi-3-vision with both stages ->
the scorers -> result JSONs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from eval import tables
from eval.benchmarks import OURS
from llava.inference import build_prompt
from llava.model.builder import load_pretrained_model
from llava.testing.tiny_phi3v import TinyPhi3VSpec, write_tiny_phi3v
from llava.utils import default_conv_mode
from pruning import PruningConfigError
from tests.helpers import markdown_cells, pope_fixture, read_jsonl, scienceqa_fixture

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "phi3v" / "eval"


@pytest.fixture(scope="module")
def tiny_phi3v(tmp_path_factory) -> Path:
    # two crops at most per image: short prompts, fast scripts
    return write_tiny_phi3v(tmp_path_factory.mktemp("phi3v_eval") / "Phi-3-vision-tiny", TinyPhi3VSpec(num_crops=2))


def test_template_is_the_releases_chat_template(tiny_phi3v):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tiny_phi3v))  # its tokenizer_config.json template
    question = "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    official = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_1|>\n" + question}], tokenize=False, add_generation_prompt=True
    )
    assert build_prompt(question, "phi3_v") == official.replace("<|image_1|>", "<image>")
    assert official == f"<|user|>\n<|image_1|>\n{question}<|end|>\n<|assistant|>\n"
    config = SimpleNamespace(model_type="phi3_v")
    assert default_conv_mode("Phi-3-vision-128k-instruct", config) == "phi3_v"
    assert default_conv_mode("Phi-3-vision-128k-instruct", config, purpose="eval") == "phi3_v"


def test_visual_layer_beyond_the_tower_is_refused_before_loading(tiny_phi3v):
    with pytest.raises(PruningConfigError, match="--visual-layer 9: the CLIP tower .* has 4 layers"):
        load_pretrained_model(str(tiny_phi3v), device="cpu", pruning={"visual_pruning": "longtail", "visual_layer": 9})


def test_every_benchmark_has_a_phi3v_script():
    names = set(OURS)  # this repository's; a test may have registered a toy one in this process
    assert {path.stem for path in SCRIPTS.glob("*.sh")} == names | {"_common"}
    for name in names:
        lines = (SCRIPTS / f"{name}.sh").read_text().splitlines()
        assert lines[-1] == f'exec bash "$(dirname "${{BASH_SOURCE[0]}}")/_common.sh" {name} "$@"'


# ---- the scripts, end to end ------------------------------------------------------------------------------------
def run_script(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    args = ["--device", "cpu", "--no-progress", "--max_new_tokens", "4"]
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )


def script_env(model: Path, eval_dir: Path, ckpt: str = "tiny") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "CONV_MODE")}
    env.update(MODEL_PATH=str(model), EVAL_DIR=str(eval_dir), PYTHON=sys.executable, CKPT=ckpt, BATCH_SIZE="2")
    env.update(PRUNING_ARGS="--visual-pruning longtail --kv-pruning h2o")
    return env


def check_answers(root: Path, count: int, ckpt: str = "tiny") -> list[dict]:
    rows = read_jsonl(root / "answers" / f"{ckpt}.jsonl")
    assert len(rows) == count
    record = json.loads((root / "answers" / f"{ckpt}.run.json").read_text(encoding="utf-8"))
    assert record["conv_mode"] == "phi3_v"
    result = json.loads((root / "results" / f"{ckpt}.json").read_text(encoding="utf-8"))
    assert result["count"] == count and result["run"] == record
    with_image = [r["tokens"] for r in rows if r["tokens"]["visual_before"]]
    assert with_image and all(t["visual_after"] <= t["visual_before"] for t in with_image)
    assert any(t["visual_after"] < t["visual_before"] for t in with_image)  # stage 1 cut tokens
    assert all(t["kv_final"] <= t["prompt"] for t in with_image)  # stage 2 capped the cache at half + generated
    assert all(len(t["crop_kept"]) == t["crops"][0] for t in with_image)
    return rows


def test_pope_script(tiny_phi3v, tmp_path):
    root = tmp_path / "eval" / "pope"
    questions = pope_fixture(root)
    done = run_script("pope.sh", script_env(tiny_phi3v, tmp_path / "eval"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Phi-3-vision: MODEL_PATH=" in done.stderr and "mean F1" in done.stdout
    rows = check_answers(root, 6)
    asked = {row["question_id"]: row["text"] for row in read_jsonl(questions)}
    assert all(row["prompt"] == asked[row["question_id"]] for row in rows)  # LLaVA's question, what POPE pairs by
    result = json.loads((root / "results" / "tiny.json").read_text(encoding="utf-8"))
    assert result["benchmark"] == "pope" and "crop_kept" in result["tokens"]


def test_scienceqa_script_to_table_5(tiny_phi3v, tmp_path, capsys):
    """The run named as Table 5's 'Phi3v + Ours' row expects lands in that row."""
    ckpt = "Phi-3-vision-128k-instruct-longtail-h2o"
    root = tmp_path / "eval" / "scienceqa"
    scienceqa_fixture(root)
    done = run_script("sqa.sh", script_env(tiny_phi3v, tmp_path / "eval", ckpt))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = check_answers(root, 4, ckpt)
    assert sum("<image>" in row["prompt"] for row in rows) == 3  # the scorer's IMG subset, as with LLaVA
    text_only = [row["tokens"] for row in rows if not row["tokens"]["visual_before"]]
    assert len(text_only) == 1  # a question without an image runs as plain text
    result = json.loads((root / "results" / f"{ckpt}.json").read_text(encoding="utf-8"))
    assert result["benchmark"] == "sqa" and result["metrics"]["img_total"] == 3
    assert tables.main(["--results", str(tmp_path / "eval"), "--table", "5", "--no-paper"]) == 0
    cells = markdown_cells(capsys.readouterr().out)
    assert cells["Phi3v + Ours"]["ScienceQA"].startswith(f"{result['headline']:.2f}")
    assert cells["Phi3v"]["ScienceQA"] == "-"
