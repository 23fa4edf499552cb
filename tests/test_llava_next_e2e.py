"""End to end on LLaVA-1.6: a POPE fixture in the official layout -> the shared runner on the tiny 1.6 Mistral
checkpoint (conversation mode chosen from the checkpoint, stage 1 across crops) -> the POPE scorer -> a result JSON
whose token means include the per-crop counts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval import model_vqa_loader
from llava.testing.tiny_llava import write_tiny_llava_next
from tests.helpers import random_image, write_jsonl

SHORT = "\nAnswer the question using a single word or phrase."
# (width, height): grids 2x1, 1x2, 3x1, 1x3, 2x2 and a small image
SIZES = [(150, 100), (90, 170), (420, 60), (50, 330), (230, 220), (40, 30)]


def _pope_fixture(root: Path) -> Path:
    lines, qid = [], 1
    for c, category in enumerate(("adversarial", "popular", "random")):
        labels = []
        for n, (thing, label) in enumerate([("dog", "yes"), ("car", "no")]):
            image = f"COCO_val2014_{310196 + 10 * c + n:012d}.jpg"
            (root / "val2014").mkdir(parents=True, exist_ok=True)
            random_image(qid, SIZES[qid - 1]).save(root / "val2014" / image)
            text = f"Is there a {thing} in the image?"
            lines.append({"question_id": qid, "image": image, "text": text + SHORT, "category": category})
            labels.append({"question_id": n + 1, "image": image, "text": text, "label": label})
            qid += 1
        write_jsonl(root / "coco" / f"coco_pope_{category}.json", labels)
    return write_jsonl(root / "llava_pope_test.jsonl", lines)


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory) -> Path:
    return write_tiny_llava_next(tmp_path_factory.mktemp("tiny16") / "llava-v1.6-mistral-7b-tiny", llm="mistral")


def test_pope_with_tiny_llava_16(tiny16: Path, tmp_path: Path) -> None:
    from eval import pope

    ckpt = tiny16
    root = tmp_path / "pope"
    questions = _pope_fixture(root)
    answers = root / "answers" / "llava-v1.6-tiny.jsonl"
    argv = ["--model-path", str(ckpt), "--question-file", str(questions), "--image-folder", str(root / "val2014")]
    argv += ["--answers-file", str(answers), "--temperature", "0", "--max_new_tokens", "4", "--batch-size", "3"]
    argv += ["--no-progress", "--visual-pruning", "longtail", "--crop-budget", "global"]
    model_vqa_loader.main(argv)

    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["question_id"] for r in rows) == list(range(1, 7))
    assert all(r["prompt"].endswith(SHORT) for r in rows)
    crops = []
    for row in rows:
        tokens = row["tokens"]
        crops.append(tokens["crops"][0])
        assert len(tokens["crop_kept"]) == len(tokens["crop_inflection"]) == tokens["crops"][0]
        assert 0 < tokens["visual_after"] < tokens["visual_before"]
        assert tokens["visual_after"] - tokens["newlines"][0] == sum(tokens["crop_kept"])  # padding never kept
    assert sorted(set(crops)) == [3, 4, 5]

    result_json = root / "results" / "llava-v1.6-tiny.json"
    pope.main(
        ["--annotation-dir", str(root / "coco"), "--question-file", str(questions)]
        + ["--result-file", str(answers), "--result-json", str(result_json)]
    )
    result = json.loads(result_json.read_text(encoding="utf-8"))
    assert result["benchmark"] == "pope" and result["count"] == 6
    assert math.isfinite(result["headline"])
    for key in ("visual_before", "visual_after", "prompt", "crop_kept", "newlines"):
        per_answer = [sum(v) if isinstance(v, list) else v for v in (r["tokens"][key] for r in rows)]
        assert result["tokens"][key] == pytest.approx(sum(per_answer) / len(per_answer))


def test_v1_6_pope_script_picks_the_checkpoints_template_and_reuses_the_v1_5_pipeline(tiny16: Path, tmp_path: Path):
    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "pope"
    _pope_fixture(root)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "CONV_MODE")}
    env.update(MODEL_PATH=str(tiny16), DATA_DIR=str(root), PYTHON=sys.executable, CKPT="tiny16")
    env.update(PRUNING_ARGS="--visual-pruning longtail", BATCH_SIZE="3")
    done = subprocess.run(
        ["bash", str(repo / "scripts/v1_6/eval/pope.sh"), "--device", "cpu", "--max_new_tokens", "3", "--no-progress"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "conv mode mistral_instruct" in done.stderr  # llava_mistral config -> the Mistral template
    assert "mean F1" in done.stdout
    rows = [json.loads(line) for line in (root / "answers" / "tiny16.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["tokens"]["crop_kept"]) == r["tokens"]["crops"][0] for r in rows)
    result = json.loads((root / "results" / "tiny16.json").read_text())
    assert result["benchmark"] == "pope" and result["count"] == 6 and "crop_kept" in result["tokens"]
