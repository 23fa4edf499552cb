"""End to end, one test per benchmark: a fixture in the benchmark's official file format -> its runner on the tiny
model with both pruning stages on -> its scorer -> a result JSON with a headline and the token means.

The tiny model answers noise, so headlines are whatever the scorer makes of noise; what is checked is that every
question is answered once, in the format the scorer reads, and that the result carries the run's token counts.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval import merge_chunks, model_vqa, model_vqa_loader, model_vqa_mmbench, model_vqa_science
from tests.helpers import (
    SHORT,
    FakeOpenAIServer,
    pope_fixture,
    random_image,
    read_jsonl,
    save_image,
    write_json,
    write_jsonl,
)

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

BOTH_STAGES = ["--visual-pruning", "longtail", "--kv-pruning", "h2o"]
TOKEN_KEYS = ("visual_before", "visual_after", "inflection", "prompt", "generated", "kv_final")


def runner_args(tiny_ckpt: Path, questions: Path, answers: Path, images: Path | None = None, *extra: str) -> list:
    argv = ["--model-path", str(tiny_ckpt), "--question-file", str(questions), "--answers-file", str(answers)]
    if images is not None:
        argv += ["--image-folder", str(images)]
    argv += ["--temperature", "0", "--conv-mode", "vicuna_v1", "--max_new_tokens", "6", "--batch-size", "4"]
    return [*argv, "--no-progress", *BOTH_STAGES, *extra]


def check_result(result_json: Path, answers: Path, benchmark: str, count: int) -> dict:
    """The result JSON a table reads: headline, and the token means of exactly the answers that were scored."""
    result = json.loads(result_json.read_text(encoding="utf-8"))
    rows = read_jsonl(answers)
    assert result["benchmark"] == benchmark
    assert isinstance(result["headline"], (int, float)) and math.isfinite(result["headline"])
    assert result["count"] == count
    for key in TOKEN_KEYS:
        values = [r["tokens"][key] for r in rows if r["tokens"][key] is not None]  # no i* without an image
        assert result["tokens"][key] == pytest.approx(sum(values) / len(values))
    assert 0 < result["tokens"]["visual_after"] <= result["tokens"]["visual_before"] <= 64
    assert all(r["tokens"]["kv_final"] <= r["tokens"]["prompt"] + r["tokens"]["generated"] for r in rows)
    with_image = [r for r in rows if r["tokens"]["visual_before"] > 0]
    assert result["tokens"]["image_questions"] == len(with_image)
    for key in ("visual_before", "visual_after", "inflection"):
        values = [r["tokens"][key] for r in with_image]
        assert result["tokens"]["per_image"][key] == pytest.approx(sum(values) / len(values))
    # what produced the answers: the runner's record, copied into the result for eval.tables
    record = json.loads(answers.with_name(answers.stem + ".run.json").read_text(encoding="utf-8"))
    assert result["run"] == record and result["config"] == record["pruning"] and result["label"] == answers.stem
    assert result["model"] == record["model_path"]
    return result


@pytest.fixture(autouse=True)
def _judge_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    for name in ("JUDGE_MODEL", "OPENAI_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


# ---- ScienceQA ------------------------------------------------------------------------------------------------


def test_scienceqa(tiny_ckpt: Path, tmp_path: Path) -> None:
    from eval import sqa

    root = tmp_path / "scienceqa"
    problems, questions = {}, []
    for n in range(5):
        pid = str(400 + n)
        has_image = n != 2
        problems[pid] = {
            "question": f"Which option is number {n}?",
            "choices": ["one", "two", "three"],
            "answer": n % 3,
            "hint": "" if n % 2 else "A hint.",
            "image": "image.png" if has_image else None,
            "subject": "natural science",
            "grade": "grade3",
            "split": "test",
        }
        value = f"Context: {problems[pid]['hint'] or 'N/A'}\nWhich option is number {n}?\nA. one\nB. two\nC. three"
        question = {"id": pid, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "A"}]}
        if has_image:
            question["image"] = f"{pid}/image.png"
            question["conversations"][0]["value"] = "<image>\n" + value
            save_image(root / "images" / "test" / pid / "image.png", n)
        questions.append(question)
    write_json(root / "problems.json", problems)
    write_json(root / "pid_splits.json", {"test": sorted(problems), "val": []})
    write_json(root / "llava_test_CQM-A.json", questions)

    answers = root / "answers" / "tiny.jsonl"
    argv = runner_args(tiny_ckpt, root / "llava_test_CQM-A.json", answers, root / "images" / "test")
    model_vqa_science.main([*argv, "--single-pred-prompt"])
    result_json = root / "results" / "tiny.json"
    sqa.main(["--base-dir", str(root), "--result-file", str(answers), "--result-json", str(result_json)])
    result = check_result(result_json, answers, "sqa", count=5)
    assert result["metrics"]["img_total"] == 4 and result["metrics"]["total"] == 5
    text_only = next(r for r in read_jsonl(answers) if r["question_id"] == "402")
    assert text_only["tokens"]["visual_before"] == 0 and "<image>" not in text_only["prompt"]


# ---- TextVQA --------------------------------------------------------------------------------------------------


def test_textvqa(tiny_ckpt: Path, tmp_path: Path) -> None:
    from eval import textvqa

    root = tmp_path / "textvqa"
    data, lines = [], []
    for n in range(5):
        image_id = f"{n:04x}a8ae2ef43b90"
        save_image(root / "train_images" / f"{image_id}.jpg", n)
        question = f"what is written on sign {n}?"
        data.append(
            {
                "question_id": 34602 + n,
                "image_id": image_id,
                "question": question,
                "answers": ["stop"] * 6 + ["stop sign"] * 4,
                "image_classes": ["Sign"],
                "set_name": "val",
            }
        )
        text = f"{question}\nReference OCR token: stop, main, st{SHORT}"
        lines.append({"question_id": 34602 + n, "image": f"{image_id}.jpg", "text": text, "category": "default"})
    write_json(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa", "data": data})
    questions = write_jsonl(root / "llava_textvqa_val_v051_ocr.jsonl", lines)

    answers = root / "answers" / "tiny.jsonl"
    model_vqa_loader.main(runner_args(tiny_ckpt, questions, answers, root / "train_images"))
    result_json = root / "results" / "tiny.json"
    textvqa.main(
        ["--annotation-file", str(root / "TextVQA_0.5.1_val.json"), "--result-file", str(answers)]
        + ["--result-json", str(result_json)]
    )
    check_result(result_json, answers, "textvqa", count=5)


# ---- MME ------------------------------------------------------------------------------------------------------


def test_mme(tiny_ckpt: Path, tmp_path: Path) -> None:
    from eval import mme

    root = tmp_path / "MME"
    release = root / "MME_Benchmark_release_version"
    lines = []
    # flat categories keep <image>.png and <image>.txt side by side; others use images/ + questions_answers_YN/
    layout = {"existence": "flat", "artwork": "split", "code_reasoning": "flat"}
    seed = 0
    for category, kind in layout.items():
        for stem in ("0001", "0002"):
            image = f"{stem}.png" if kind == "flat" else f"images/{stem}.png"
            txt = release / category / (f"{stem}.txt" if kind == "flat" else f"questions_answers_YN/{stem}.txt")
            save_image(release / category / image, seed)
            seed += 1
            pairs = [(f"Is there a cat in picture {stem}?", "Yes"), (f"Is there a dog in picture {stem}?", "No")]
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text("".join(f"{q} Please answer yes or no.\t{a}\n" for q, a in pairs), encoding="utf-8")
            for question, _ in pairs:  # two questions per image share one question_id, as in llava_mme.jsonl
                qid = f"{category}/{image}"
                lines.append({"question_id": qid, "image": qid, "text": question + SHORT, "category": category})
    questions = write_jsonl(root / "llava_mme.jsonl", lines)

    answers = root / "answers" / "tiny.jsonl"
    model_vqa_loader.main(runner_args(tiny_ckpt, questions, answers, release))
    result_json = root / "results" / "tiny.json"
    mme.main(
        ["--mme-dir", str(release), "--result-file", str(answers), "--result-json", str(result_json)]
        + ["--write-mme-txt", str(root / "eval_tool" / "answers" / "tiny")]
    )
    result = check_result(result_json, answers, "mme", count=12)
    assert len(read_jsonl(answers)) == 12
    assert (root / "eval_tool" / "answers" / "tiny" / "artwork.txt").is_file()
    assert result["headline"] <= 2 * 200  # two perception subtasks present, 200 points each at most


# ---- VQAv2 (the multi-GPU benchmark: two chunks, merged in order) -------------------------------------------


def test_vqav2_two_chunks_merged(tiny_ckpt: Path, tmp_path: Path) -> None:
    from eval import vqav2

    root = tmp_path / "vqav2"
    lines, annotations, official_questions = [], [], []
    kinds = [("yes/no", "yes"), ("number", "2"), ("other", "red")]
    for n in range(5):
        image_id = 262148 + n
        qid = image_id * 1000 + n
        image = f"COCO_val2014_{image_id:012d}.jpg"
        save_image(root / "val2014" / image, n)
        question = f"What about object {n}?"
        lines.append({"question_id": qid, "image": image, "text": question + SHORT, "category": "default"})
        answer_type, answer = kinds[n % 3]
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "question_type": "what",
                "answer_type": answer_type,
                "multiple_choice_answer": answer,
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
            }
        )
        official_questions.append({"question_id": qid, "image_id": image_id, "question": question})
    questions = write_jsonl(root / "llava_vqav2_mscoco_val2014.jsonl", lines)
    write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": official_questions})

    chunk_dir = root / "answers" / "llava_vqav2_mscoco_val2014" / "tiny"
    for idx in range(2):
        chunk = ["--num-chunks", "2", "--chunk-idx", str(idx)]
        model_vqa_loader.main(runner_args(tiny_ckpt, questions, chunk_dir / f"2_{idx}.jsonl", root / "val2014", *chunk))
    merge = chunk_dir / "merge.jsonl"
    assert merge_chunks.main(["--out", str(merge), *(str(chunk_dir / f"2_{i}.jsonl") for i in range(2))]) == 0
    assert [r["question_id"] for r in read_jsonl(merge)] == [line["question_id"] for line in lines]
    assert json.loads((chunk_dir / "merge.run.json").read_text())["chunks"] == 2

    result_json = root / "results" / "tiny.json"
    vqav2.main(
        ["--result-file", str(merge), "--annotation-file", str(root / "v2_mscoco_val2014_annotations.json")]
        + ["--question-json", str(root / "v2_OpenEnded_mscoco_val2014_questions.json")]
        + ["--result-json", str(result_json)]
    )
    result = check_result(result_json, merge, "vqav2", count=5)
    assert set(result["metrics"]["accuracy"]) >= {"overall", "yes/no", "number", "other"}


# ---- POPE -----------------------------------------------------------------------------------------------------


def test_pope(tiny_ckpt: Path, tmp_path: Path) -> None:
    from eval import pope

    root = tmp_path / "pope"
    questions = pope_fixture(root)
    answers = root / "answers" / "tiny.jsonl"
    model_vqa_loader.main(runner_args(tiny_ckpt, questions, answers, root / "val2014"))
    result_json = root / "results" / "tiny.json"
    pope.main(
        ["--annotation-dir", str(root / "coco"), "--question-file", str(questions)]
        + ["--result-file", str(answers), "--result-json", str(result_json)]
    )
    result = check_result(result_json, answers, "pope", count=6)
    assert result["headline"] == pytest.approx(result["metrics"]["mean_f1"])


# ---- MMBench --------------------------------------------------------------------------------------------------


def png_base64(seed: int) -> str:
    buffer = io.BytesIO()
    random_image(seed, (90, 70)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_mmbench_all_rounds(tiny_ckpt: Path, tmp_path: Path) -> None:
    from eval import mmbench

    root = tmp_path / "mmbench"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source"]
    header += ["l2-category", "comment", "split"]
    rows = [
        [1, "What animal is shown?", "nan", "cat", "dog", "cow", "nan", "A", "object", png_base64(1), "x"],
        [2, "Which colour dominates?", "A plain photo.", "red", "blue", "nan", "nan", "B", "color", png_base64(2), "x"],
        # the circular copy of question 1 that the official TSV carries (index + 1e6), options rotated
        [1000001, "What animal is shown?", "nan", "dog", "cow", "cat", "nan", "C", "object", png_base64(1), "x"],
    ]
    tsv = root / "mmbench_dev_20230712.tsv"
    tsv.parent.mkdir(parents=True)
    with tsv.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header)
        writer.writerows([*row, "perception", "nan", "dev"] for row in rows)

    answers = root / "answers" / "mmbench_dev_20230712" / "tiny.jsonl"
    model_vqa_mmbench.main(runner_args(tiny_ckpt, tsv, answers, None, "--single-pred-prompt", "--all-rounds"))
    assert [(r["question_id"], r["round_id"]) for r in read_jsonl(answers)] == [
        (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (1000001, 0), (1000001, 1), (1000001, 2)
    ]  # fmt: skip
    result_json = root / "results" / "tiny.json"
    # no --upload-dir: the tiny model's noise holds control characters that an .xlsx cell cannot store
    mmbench.main(
        ["--annotation-file", str(tsv), "--result-file", str(answers), "--experiment", "tiny"]
        + ["--result-json", str(result_json)]
    )
    result = check_result(result_json, answers, "mmbench", count=2)
    assert result["headline"] in (0.0, 50.0, 100.0)  # circular accuracy over the 2 questions


# ---- MM-Vet (GPT grader on a loopback server) ----------------------------------------------------------------


def test_mmvet(tiny_ckpt: Path, tmp_path: Path) -> None:
    from eval import mmvet

    root = tmp_path / "mm-vet"
    lines, ground_truth = [], {}
    capabilities = [["rec"], ["ocr", "rec"], ["math"], ["know", "gen"]]
    for n, caps in enumerate(capabilities):
        save_image(root / "images" / f"v1_{n}.png", n)
        question = f"What is going on in picture {n}?"
        lines.append({"image": f"v1_{n}.png", "text": question, "category": "conv", "question_id": n})
        ground_truth[f"v1_{n}"] = {"imagename": f"v1_{n}.png", "capability": caps, "question": question, "answer": "x"}
    questions = write_jsonl(root / "llava-mm-vet.jsonl", lines)
    write_json(root / "mm-vet.json", ground_truth)

    answers = root / "answers" / "tiny.jsonl"
    model_vqa.main(runner_args(tiny_ckpt, questions, answers, root / "images"))
    result_json = root / "results" / "tiny.json"
    with FakeOpenAIServer(lambda body: "0.5") as server:
        code = mmvet.main(
            ["--question-file", str(questions), "--result-file", str(answers)]
            + ["--out-json", str(root / "answers_upload" / "tiny.json"), "--grade"]
            + ["--mmvet-json", str(root / "mm-vet.json"), "--result-json", str(result_json)]
            + ["--judge-model", "judge-test", "--judge-base-url", server.base_url]
        )
    assert code == 0 and len(server.requests) == 4
    result = check_result(result_json, answers, "mmvet", count=4)
    assert result["headline"] == pytest.approx(50.0)
    assert set(json.loads((root / "answers_upload" / "tiny.json").read_text())) == {f"v1_{n}" for n in range(4)}


# ---- LLaVA-Bench-in-the-Wild (GPT reviewer on a loopback server) ---------------------------------------------


def test_llavabench(tiny_ckpt: Path, tmp_path: Path) -> None:
    from eval import llavabench

    root = tmp_path / "llava-bench-in-the-wild"
    lines, references = [], []
    for n, category in enumerate(("conv", "detail", "complex", "conv")):
        image = f"{n // 2 + 1:03d}.jpg"
        save_image(root / "images" / image, n // 2)
        lines.append({"question_id": n, "image": image, "text": f"Tell me about {category} {n}.", "category": category})
        references.append({"question_id": n, "text": f"Reference answer {n}.", "answer_id": f"r{n}"})
    questions = write_jsonl(root / "questions.jsonl", lines)
    context = write_jsonl(
        root / "context.jsonl",
        [{"image": "001.jpg", "caption": "A bowl."}, {"image": "002.jpg", "caption": ["A man.", "A dog."]}],
    )
    reference = write_jsonl(root / "answers_gpt4.jsonl", references)

    answers = root / "answers" / "tiny.jsonl"
    model_vqa.main(runner_args(tiny_ckpt, questions, answers, root / "images"))
    result_json = root / "results" / "tiny.json"
    with FakeOpenAIServer(lambda body: "8 6\nAssistant 2 is shorter.") as server:
        code = llavabench.main(
            ["--question", str(questions), "--context", str(context), "--answer-list", str(reference), str(answers)]
            + ["--output", str(root / "reviews" / "tiny.jsonl"), "--result-json", str(result_json)]
            + ["--judge-model", "judge-test", "--judge-base-url", server.base_url]
        )
    assert code in (0, None) and len(server.requests) == 4
    result = check_result(result_json, answers, "llavabench", count=4)
    assert result["headline"] == pytest.approx(75.0)  # 6 / 8


# ---- a benchmark script, as a user runs it ---------------------------------------------------------------------

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "v1_5" / "eval"


def run_script(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_pope_script_on_cpu(tiny_ckpt: Path, tmp_path: Path) -> None:
    """pope.sh as a user runs it, CUDA_VISIBLE_DEVICES unset (chunking over GPUs: the stub-python test below)."""
    root = tmp_path / "eval" / "pope"
    questions = pope_fixture(root)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(MODEL_PATH=str(tiny_ckpt), EVAL_DIR=str(tmp_path / "eval"), PYTHON=sys.executable)
    env.update(CKPT="cpu", PRUNING_ARGS=" ".join(BOTH_STAGES), BATCH_SIZE="2")
    done = run_script("pope.sh", env, "--device", "cpu", "--max_new_tokens", "4", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mean F1" in done.stdout

    assert sorted(p.name for p in (root / "answers" / "cpu").iterdir()) == ["1_0.jsonl", "1_0.run.json"]
    merged = read_jsonl(root / "answers" / "cpu.jsonl")
    single = tmp_path / "single.jsonl"
    model_vqa_loader.main(
        runner_args(tiny_ckpt, questions, single, root / "val2014", "--max_new_tokens", "4", "--batch-size", "2")
    )
    assert [(r["question_id"], r["text"], r["tokens"]) for r in merged] == [
        (r["question_id"], r["text"], r["tokens"]) for r in read_jsonl(single)
    ]
    check_result(root / "results" / "cpu.json", root / "answers" / "cpu.jsonl", "pope", count=6)


STUB_PYTHON = """#!/usr/bin/env bash
# Stands in for python: the scripts' driver runs for real (it starts the other calls with this stub); the rest is
# logged; as a runner, the stub writes one answer line naming its chunk (and a run record); the chunk merge runs
# for real.
[ "$2" = llava.eval.run_benchmark ] && exec "$REAL_PYTHON" "$@"
echo "${CUDA_VISIBLE_DEVICES-unset}|$*" >> "$STUB_LOG"
[ "$2" = llava.eval.merge_chunks ] && exec "$REAL_PYTHON" "$@"
args=("$@"); answers=""; idx=""
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --answers-file) answers=${args[$((i + 1))]} ;;
    --chunk-idx) idx=${args[$((i + 1))]} ;;
  esac
done
if [ -n "$answers" ]; then
  [ "$idx" = "${STUB_FAIL_CHUNK:-none}" ] && exit 3
  echo "{\\"question_id\\": $idx}" >> "$answers"
  echo "{\\"benchmark\\": \\"stub\\"}" > "${answers%.jsonl}.run.json"
fi
exit 0
"""

SCRIPT_CALLS = {  # script: (data folder, runner module, a flag + value the runner gets, scorer module)
    "sqa.sh": ("scienceqa", "llava.eval.model_vqa_science", "--single-pred-prompt", "eval.sqa"),
    "textvqa.sh": ("textvqa", "llava.eval.model_vqa_loader", "llava_textvqa_val_v051_ocr.jsonl", "eval.textvqa"),
    "mme.sh": ("MME", "llava.eval.model_vqa_loader", "MME_Benchmark_release_version", "eval.mme"),
    "vqav2.sh": ("vqav2", "llava.eval.model_vqa_loader", "llava_vqav2_mscoco_test-dev2015.jsonl", "eval.vqav2"),
    "pope.sh": ("pope", "llava.eval.model_vqa_loader", "llava_pope_test.jsonl", "eval.pope"),
    "mmbench.sh": ("mmbench", "llava.eval.model_vqa_mmbench", "mmbench_dev_20230712.tsv", "eval.mmbench"),
    "mmbench_cn.sh": ("mmbench_cn", "llava.eval.model_vqa_mmbench", "--lang cn", "eval.mmbench"),
    "mmvet.sh": ("mm-vet", "llava.eval.model_vqa", "llava-mm-vet.jsonl", "eval.mmvet"),
    "llavabench.sh": ("llava-bench-in-the-wild", "llava.eval.model_vqa", "questions.jsonl", "eval.llavabench"),
}


@pytest.mark.parametrize("script", sorted(SCRIPT_CALLS))
def test_scripts_chunk_per_gpu_merge_in_order_and_score(script: str, tmp_path: Path) -> None:
    folder, module, flag, scorer = SCRIPT_CALLS[script]
    (tmp_path / "eval" / folder).mkdir(parents=True)
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "CKPT", "MODEL_BASE")}
    env.update(PYTHON=str(stub), STUB_LOG=str(log), EVAL_DIR=str(tmp_path / "eval"), JUDGE_MODEL="judge-x")
    env.update(REAL_PYTHON=sys.executable)
    env.update(MODEL_PATH="/ckpts/llava-v1.5-7b-lora/", MODEL_BASE="lmsys/vicuna-7b-v1.5")
    env["PRUNING_ARGS"] = "--visual-pruning longtail --kv-pruning h2o"

    # CUDA_VISIBLE_DEVICES unset: one chunk, run as is
    assert run_script(script, env, "--batch-size", "8").returncode == 0
    calls = log.read_text().splitlines()
    runs = [c for c in calls if f"-m {module} " in c]
    assert len(runs) == 1 and runs[0].startswith("unset|")
    assert flag in runs[0] and "--model-base lmsys/vicuna-7b-v1.5" in runs[0]
    assert "--visual-pruning longtail --kv-pruning h2o" in runs[0] and "--temperature 0" in runs[0]
    assert runs[0].endswith("--batch-size 8 --answers-file " + runs[0].split("--answers-file ")[1])
    assert "--num-chunks 1 --chunk-idx 0" in runs[0]
    assert any(f"-m {scorer} " in c for c in calls[1:])
    assert "llava-v1.5-7b-lora" in runs[0].split("--answers-file ")[1]  # CKPT defaults to the model folder name

    # three GPUs: three chunks, one GPU each, merged in chunk order
    log.unlink()
    assert run_script(script, {**env, "CKPT": "run3", "CUDA_VISIBLE_DEVICES": "4,5,7"}).returncode == 0
    runs = sorted(c for c in log.read_text().splitlines() if f"-m {module} " in c)
    assert [c.split("|")[0] for c in runs] == ["4", "5", "7"]
    merged = next(p for p in (tmp_path / "eval" / folder).rglob("*") if p.name in ("run3.jsonl", "merge.jsonl"))
    assert read_jsonl(merged) == [{"question_id": 0}, {"question_id": 1}, {"question_id": 2}]

    # a failed chunk fails the script before scoring, and says how to resume
    log.unlink()
    failed = run_script(script, {**env, "CKPT": "bad", "CUDA_VISIBLE_DEVICES": "0,1", "STUB_FAIL_CHUNK": "1"})
    assert failed.returncode != 0 and "chunk 1 of 2" in failed.stderr and "resume" in failed.stderr
    assert not any(f"-m {scorer} " in c for c in log.read_text().splitlines())


def test_scripts_stop_when_the_data_folder_is_missing(tmp_path: Path) -> None:
    env = {**os.environ, "EVAL_DIR": str(tmp_path / "nowhere"), "PYTHON": sys.executable}
    done = run_script("pope.sh", env)
    assert done.returncode != 0 and f"no data folder {tmp_path / 'nowhere' / 'pope'}" in done.stderr
    assert not (tmp_path / "nowhere").exists()  # stopped before any runner


# ---- the README demo ----------------------------------------------------------------------------------------------
