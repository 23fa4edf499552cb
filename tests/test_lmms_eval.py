"""The lmms-eval plugin (issue #23): ``--model_args`` checks, scoring replies through ``generate``, and lmms-eval's
own CLI end to end on the demo checkpoint with local tasks (a POPE-like set built on disk, no network).

The end-to-end tests need lmms-eval (the ``[lmms]`` extra; CI installs it in its torchvision environment) and are
skipped only when it is not importable; the rest runs everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from llava.inference import build_prompt
from llava.lmms.options import GenerationSettings, ModelArgsError, check_model_args, parse_model_args
from llava.lmms.scoring import reply_text, reply_tokens, score_replies
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "playground" / "checkpoints" / "llava-v1.5-demo")
HAS_LMMS_EVAL = find_spec("lmms_eval") is not None
needs_lmms_eval = pytest.mark.skipif(not HAS_LMMS_EVAL, reason="lmms-eval is not installed (the [lmms] extra)")


# ---- --model_args -------------------------------------------------------------------------------------------------
def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ModelArgsError, match=r"--model_args alpah: unknown key \(did you mean alpha\?\)"):
        parse_model_args({"pretrained": DEMO, "alpah": 0.3})
    with pytest.raises(ModelArgsError, match=r"conv_template: unknown key \(did you mean conv_mode\?\)"):
        parse_model_args({"pretrained": DEMO, "conv_template": "vicuna_v1"})


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"visual_pruning": "longtial"}, "visual_pruning='longtial'"),
        ({"alpha": "abc"}, "alpha='abc'"),
        ({"visual_topk": 64.5}, "visual_topk=64.5"),
        ({"batch_size": "auto"}, "batch_size=auto"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"dtype": "fp8"}, "dtype='fp8'"),
        ({"use_flash_attn": "yes please"}, "use_flash_attn="),
        ({"device": "gpu0"}, "device='gpu0'"),
    ],
)
def test_invalid_values_are_named(values, named):
    with pytest.raises(ModelArgsError) as caught:
        parse_model_args({"pretrained": DEMO, **values})
    assert str(caught.value).startswith(f"--model_args {named}")


def test_missing_checkpoint_is_named():
    with pytest.raises(ModelArgsError, match="pretrained: missing"):
        parse_model_args({"alpha": 0.3})
    with pytest.raises(ModelArgsError, match="pretrained=/no/such/checkpoint: model folder not found"):
        check_model_args(parse_model_args({"pretrained": "/no/such/checkpoint"}))


def test_pruning_values_go_through_the_flags_and_keep_the_checkpoint_defaults():
    # lmms-eval hands over numbers already converted: 1 for alpha=1, 0.24 for alpha=0.24
    options = parse_model_args(
        {"pretrained": DEMO, "visual_pruning": "longtail", "alpha": 1, "kv_pruning": "h2o", "batch_size": "4"}
    )
    assert options.pruning == {"visual_pruning": "longtail", "alpha": 1.0, "kv_pruning": "h2o"}
    assert options.batch_size == 4
    resolved = check_model_args(options)
    assert (resolved.visual_pruning, resolved.alpha, resolved.kv_pruning) == ("longtail", 1.0, "h2o")
    assert resolved.visual_layer == 3  # the demo checkpoint's own (the library default is 16)
    assert (resolved.heavy_ratio, resolved.recent_ratio) == (0.5, 0.5)


def test_out_of_range_pruning_values_name_the_key():
    with pytest.raises(ModelArgsError, match=r"alpha must be in \(0, 1\]"):
        check_model_args(parse_model_args({"pretrained": DEMO, "alpha": 2.0}))
    with pytest.raises(ModelArgsError, match=r"--visual-layer 30: .* has 4 layers .*\(key visual_layer\)"):
        check_model_args(parse_model_args({"pretrained": DEMO, "visual_pruning": "longtail", "visual_layer": 30}))
    with pytest.raises(ModelArgsError, match="conv_mode='vicuna': unknown"):
        check_model_args(parse_model_args({"pretrained": DEMO, "conv_mode": "vicuna"}))


def test_generation_settings_follow_do_sample_and_until():
    mmvet = GenerationSettings.from_kwargs({"max_new_tokens": 1024, "temperature": 0.2, "do_sample": False})
    assert (mmvet.temperature, mmvet.max_new_tokens) == (0.0, 1024)
    assert GenerationSettings.from_kwargs({"temperature": 0.2}).temperature == 0.2  # lmms-eval's llava: T > 0 samples
    assert GenerationSettings.from_kwargs({}).max_new_tokens == 1024
    stops = GenerationSettings.from_kwargs({"until": ["ASSISTANT:", "\n\n"]})
    assert stops.cut("Yes.\n\nASSISTANT: more") == "Yes."


# ---- scoring replies through generate -----------------------------------------------------------------------------
def test_reply_text_follows_the_template():
    assert reply_text("vicuna_v1", "A") == " A"
    assert reply_text("chatml_direct", "A") == "A"
    assert reply_text("llava_llama_2", "No, it is not.") == " No, it is not."


def forward_logprob(model, tokenizer, processor, prompt: str, reply: str, image) -> float:
    """The reply's log-probability from one teacher-forced forward pass (no cache: no stage 2)."""
    full = prompt + reply_text("vicuna_v1", reply)
    count = len(reply_tokens(tokenizer, prompt, full))
    ids = torch.tensor([tokenizer_image_token(full, tokenizer)])
    pixels = process_images([image], processor, model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, images=pixels, image_sizes=[image.size]).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    length = logits.shape[0]  # the image tokens are merged in: count from the end
    return sum(float(logprobs[length - count - 1 + i, ids[0, -count + i]]) for i in range(count))


REPLIES = ["A", "No, there is not.", "a red circle and a blue square"]
QUESTIONS = ["Which option?", "Is there a dog?", "What is in the image?"]


def test_reply_scores_equal_a_forward_pass(tiny_model, images):
    tokenizer, model, processor, _ = tiny_model
    prompts = [build_prompt(q, "vicuna_v1", model_config=model.config) for q in QUESTIONS]
    scores = score_replies(model, tokenizer, processor, prompts, REPLIES, images[:3], "vicuna_v1")
    for prompt, reply, image, score in zip(prompts, REPLIES, images, scores):
        assert score.logprob == pytest.approx(
            forward_logprob(model, tokenizer, processor, prompt, reply, image), abs=1e-4
        )
        assert score.tokens == len(reply_tokens(tokenizer, prompt, prompt + reply_text("vicuna_v1", reply)))
        assert score.mean_nll == pytest.approx(-score.logprob / score.tokens)
        assert score.token_stats["generated"] == score.tokens + 1  # the reply and its end-of-sequence token
    assert len({s.tokens for s in scores}) == 3  # the batch really mixed reply lengths


def test_greedy_flag_matches_what_generate_answers():
    from llava.inference import generate_answers
    from llava.mm_utils import load_image

    tokenizer, model, processor, _ = load_pretrained_model(DEMO, None, None, device="cpu")
    image = load_image(REPO / "playground" / "demo" / "images" / "green_triangle.png")
    questions = ["Is there a green triangle in the image?", "Is there a red circle in the image?"]
    prompts = [
        build_prompt(f"{q}\nAnswer the question using a single word or phrase.", "vicuna_v1", model_config=model.config)
        for q in questions
    ]
    answers = [a.text for a in generate_answers(model, tokenizer, processor, prompts, [image] * 2, max_new_tokens=4)]
    assert answers == ["Yes", "No"]
    scores = score_replies(
        model, tokenizer, processor, prompts * 2, ["Yes", "No", "No", "Yes"], [image] * 4, "vicuna_v1"
    )
    assert [s.greedy for s in scores] == [True, True, False, False]
    assert scores[0].logprob > scores[2].logprob and scores[1].logprob > scores[3].logprob


def test_both_stages_act_on_scores_and_batches_equal_single_runs(tiny_ckpt, tiny_model, images):
    pruning = {"visual_pruning": "longtail", "alpha": 1.0, "kv_pruning": "h2o", "heavy_budget": 3, "recent_budget": 3}
    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_ckpt), None, None, device="cpu", pruning=pruning)
    prompts = [build_prompt(q, "vicuna_v1", model_config=model.config) for q in QUESTIONS]
    batched = score_replies(model, tokenizer, processor, prompts, REPLIES, images[:3], "vicuna_v1")
    single = [
        score_replies(model, tokenizer, processor, [p], [r], [im], "vicuna_v1")[0]
        for p, r, im in zip(prompts, REPLIES, images)
    ]
    for b, s in zip(batched, single):
        assert b.logprob == pytest.approx(s.logprob, abs=1e-4)
        assert b.token_stats == s.token_stats
        assert b.token_stats["visual_after"] < b.token_stats["visual_before"]  # stage 1
        assert b.token_stats["kv_final"] == 6  # stage 2: heavy 3 + recent 3
    # stage 2 changes the later tokens of a long reply (stage 1 alone is a plain forward over the kept tokens)
    stage1_only = load_pretrained_model(
        str(tiny_ckpt), None, None, device="cpu", pruning={"visual_pruning": "longtail", "alpha": 1.0}
    )[1]
    long_reply = forward_logprob(stage1_only, tokenizer, processor, prompts[2], REPLIES[2], images[2])
    assert batched[2].logprob != pytest.approx(long_reply, abs=1e-3)


# ---- lmms-eval's CLI end to end -----------------------------------------------------------------------------------
POPE_MC_YAML = """task: pope_mc_local
dataset_path: {dataset}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: multiple_choice
doc_to_visual: !function choice_utils.doc_to_visual
doc_to_text: "{{{{question}}}}\\nAnswer the question using a single word or phrase."
doc_to_choice: ["Yes", "No"]
doc_to_target: !function choice_utils.doc_to_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
CHOICE_UTILS = """def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_target(doc):
    return 0 if doc["answer"] == "yes" else 1
"""
MODEL_ARGS = f"pretrained={DEMO},visual_pruning=longtail,alpha=0.24,kv_pruning=h2o"


def build_local_tasks(root: Path) -> dict:
    """The demo's held-out synthetic POPE questions (adversarial, 3 images) as a dataset on disk, asked through
    lmms-eval's own POPE task (its YAML included, only the data replaced) and as a Yes/No multiple-choice task."""
    import datasets

    from eval.synthetic import generate

    synthetic = root / "synthetic"
    generate(synthetic, 3, seed=1)
    questions = [json.loads(line) for line in (synthetic / "llava_pope_test.jsonl").read_text().splitlines()]
    questions = [q for q in questions if q["category"] == "adversarial"]
    label_file = synthetic / "coco" / "coco_pope_adversarial.json"
    labels = {str(row["question_id"]): row["label"] for row in map(json.loads, label_file.read_text().splitlines())}
    features = datasets.Features(
        {name: datasets.Value("string") for name in ("question_id", "question", "answer", "category")}
        | {"image": datasets.Image()}
    )
    rows = {
        "question_id": [str(q["question_id"]) for q in questions],
        "question": [q["text"].split("\n")[0] for q in questions],
        "answer": [labels[str(q["question_id"])] for q in questions],
        "category": [q["category"] for q in questions],
        "image": [str(synthetic / "images" / q["image"]) for q in questions],
    }
    dataset = root / "pope_dataset"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(dataset))
    tasks = root / "tasks"
    tasks.mkdir()
    pope_yaml = Path(find_spec("lmms_eval").submodule_search_locations[0]) / "tasks" / "pope" / "pope.yaml"
    (tasks / "pope_local.yaml").write_text(
        f"include: {pope_yaml}\ntask: pope_local\ndataset_path: {dataset}\ndataset_kwargs:\n  load_from_disk: true\n"
    )
    (tasks / "pope_mc_local.yaml").write_text(POPE_MC_YAML.format(dataset=dataset))
    (tasks / "choice_utils.py").write_text(CHOICE_UTILS)
    return {"tasks": tasks, "synthetic": synthetic, "questions": questions, "rows": rows}


def run_lmms_eval(root: Path, runs: list[dict]) -> subprocess.CompletedProcess:
    """lmms-eval's CLI with a --config file of several runs: one process, so lmms-eval's imports (seconds) are paid
    once. A run that fails is reported and the next one still runs (lmms-eval's own loop)."""
    defaults = {"model": "llava_longtail", "device": "cpu", "log_samples": True}
    config = root / "runs.yaml"
    config.write_text(json.dumps([{**defaults, **run} for run in runs]))  # JSON is YAML
    env = {
        **os.environ,
        "HF_HOME": str(root / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, "-m", "lmms_eval", "--config", str(config)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def read_run(folder: Path) -> dict:
    results = json.loads(next(folder.rglob("*_results.json")).read_text())
    samples = {}
    for task in ("pope_local", "pope_mc_local"):
        lines = next(folder.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()
        samples[task] = sorted(map(json.loads, lines), key=lambda row: row["doc_id"])
    return {"results": results, "samples": samples}


BAD_MODEL_ARGS = f"pretrained={DEMO},alpah=0.3"


@pytest.fixture(scope="module")
def lmms_runs(tmp_path_factory):
    """lmms-eval at batch size 4 and at batch size 1, stages 1 and 2 on; then a run with a misspelt key."""
    root = tmp_path_factory.mktemp("lmms")
    local = build_local_tasks(root)
    tasks = {"tasks": "pope_local,pope_mc_local", "include_path": str(local["tasks"]), "model_args": MODEL_ARGS}
    done = run_lmms_eval(
        root,
        [
            {**tasks, "batch_size": 4, "output_path": str(root / "batch4")},
            {**tasks, "batch_size": 1, "output_path": str(root / "batch1")},
            {"tasks": "pope", "model_args": BAD_MODEL_ARGS, "batch_size": 4, "output_path": str(root / "bad")},
        ],
    )
    output = done.stdout + done.stderr
    assert output.count("pope_f1_score") == 2, output[-4000:]
    runs = {batch_size: read_run(root / f"batch{batch_size}") for batch_size in (4, 1)}
    return {**local, "root": root, "runs": runs, "output": output}


@needs_lmms_eval
def test_pope_score_equals_our_scorer(lmms_runs, tmp_path):
    from eval import pope

    run, local = lmms_runs["runs"][4], lmms_runs
    samples = run["samples"]["pope_local"]
    assert len(samples) == len(local["questions"])
    answers = tmp_path / "answers.jsonl"
    with answers.open("w") as out:
        for sample in samples:
            qid = sample["pope_accuracy"]["question_id"]
            question = local["questions"][sample["doc_id"]]
            assert str(question["question_id"]) == qid
            out.write(
                json.dumps(
                    {
                        "question_id": question["question_id"],
                        "prompt": question["text"],
                        "text": sample["filtered_resps"],
                    }
                )
                + "\n"
            )
    ours = pope.main(
        [
            "--annotation-dir",
            str(adversarial_labels(local["synthetic"], tmp_path)),
            "--question-file",
            str(write_questions(tmp_path, local["questions"])),
            "--result-file",
            str(answers),
        ]
    )["metrics"]["adversarial"]
    theirs = run["results"]["results"]["pope_local"]
    assert theirs["pope_accuracy,none"] * 100 == pytest.approx(ours["accuracy"])
    assert theirs["pope_f1_score,none"] * 100 == pytest.approx(ours["f1"])
    assert theirs["pope_precision,none"] * 100 == pytest.approx(ours["precision"])
    assert ours["accuracy"] > 80  # the demo model reads the images (chance is 50)


def adversarial_labels(synthetic: Path, folder: Path) -> Path:
    """An annotation folder with only the category the local task asks (eval.pope scores every file it finds)."""
    labels = folder / "coco"
    labels.mkdir()
    name = "coco_pope_adversarial.json"
    (labels / name).write_text((synthetic / "coco" / name).read_text())
    return labels


def write_questions(folder: Path, questions: list[dict]) -> Path:
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


@needs_lmms_eval
def test_token_counts_in_the_logs_and_their_means_in_the_results(lmms_runs):
    run = lmms_runs["runs"][4]
    per_call_means = []
    for task in ("pope_local", "pope_mc_local"):
        counts = [c for sample in run["samples"][task] for c in sample["token_counts"]]
        assert counts and all(c is not None for c in counts)
        for c in counts:
            assert c["visual_before"] == 576  # the demo tower's 24 x 24 patches
            assert 1 <= c["visual_after"] < 576  # stage 1
            assert c["kv_final"] == c["prompt"]  # stage 2, ratios 0.5 + 0.5: the prompt's length, not P + G
            assert (c["input_tokens"], c["output_tokens"]) == (c["prompt"], c["generated"])
        per_call_means.append({k: sum(c[k] for c in counts) / len(counts) for k in ("visual_after", "kv_final")})
    throughput = run["results"]["throughput"]
    assert throughput["avg_visual_before"] == 576
    for key in ("visual_after", "kv_final"):  # one entry per model call (generation, then scoring)
        assert throughput[f"avg_{key}"] == pytest.approx(sum(m[key] for m in per_call_means) / 2)


@needs_lmms_eval
def test_multiple_choice_picks_the_greedy_answer(lmms_runs):
    run = lmms_runs["runs"][4]
    generated = {s["doc_id"]: s["filtered_resps"] for s in run["samples"]["pope_local"]}
    for sample in run["samples"]["pope_mc_local"]:
        losses = [float(loss) for loss, _ in sample["filtered_resps"]]
        greedy = [flag == "True" for _, flag in sample["filtered_resps"]]
        chosen = ["Yes", "No"][losses.index(min(losses))]
        assert chosen == generated[sample["doc_id"]]  # one-token replies: the likelier one is what generate said
        assert greedy == [choice == chosen for choice in ("Yes", "No")]
    accuracy = run["results"]["results"]["pope_mc_local"]["acc,none"]
    assert accuracy == pytest.approx(run["results"]["results"]["pope_local"]["pope_accuracy,none"])


@needs_lmms_eval
def test_batch_of_four_equals_batch_of_one(lmms_runs):
    four, one = lmms_runs["runs"][4], lmms_runs["runs"][1]
    for task in ("pope_local", "pope_mc_local"):
        assert [s["token_counts"] for s in four["samples"][task]] == [s["token_counts"] for s in one["samples"][task]]
    assert [s["filtered_resps"] for s in four["samples"]["pope_local"]] == [
        s["filtered_resps"] for s in one["samples"]["pope_local"]
    ]
    for a, b in zip(four["samples"]["pope_mc_local"], one["samples"]["pope_mc_local"]):
        assert [float(x) for x, _ in a["filtered_resps"]] == pytest.approx(
            [float(x) for x, _ in b["filtered_resps"]], abs=1e-4
        )
    assert four["results"]["results"] == one["results"]["results"]


@needs_lmms_eval
def test_bad_model_args_reach_the_cli_user_naming_the_key(lmms_runs):
    # lmms-eval checks the task names, then builds the model, which refuses the key before any data is read
    assert "Error during evaluation: --model_args alpah: unknown key (did you mean alpha?)" in lmms_runs["output"]


@needs_lmms_eval
@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        (
            "visual_pruning=longtial",
            "--model_args visual_pruning='longtial': argument --visual-pruning: invalid choice",
        ),
        ("alpha=1.5", "alpha must be in (0, 1]"),
        ("kv_pruning=h2o,heavy_budget=4", "heavy_budget"),
        ("batch_size=2", "batch_size"),  # lmms-eval's --batch_size gives it as well: a duplicate
    ],
)
def test_invalid_values_through_lmms_eval_name_the_key(model_args, message):
    from lmms_eval.models import get_model

    model_class = get_model("llava_longtail")
    with pytest.raises((ValueError, TypeError)) as caught:
        model_class.create_from_arg_string(f"pretrained={DEMO},{model_args}", {"batch_size": "4", "device": "cpu"})
    assert message in str(caught.value)


def write_family(name: str, folder: Path) -> Path:
    if name == "llava-1.6":
        from llava.testing.tiny_llava import write_tiny_llava_next

        return write_tiny_llava_next(folder, seed=0)
    if name == "phi-3-vision":
        from llava.testing.tiny_phi3v import write_tiny_phi3v

        return write_tiny_phi3v(folder)
    from llava.testing.tiny_internvl import write_tiny_internvl

    return write_tiny_internvl(folder)


@pytest.mark.parametrize("family", ["llava-1.6", "internvl2", "phi-3-vision"])
def test_other_families_score_through_the_same_path(family, tmp_path):
    """Another family plugs in through the loader, its template and default_conv_mode: nothing plugin-specific."""
    from llava.utils import default_conv_mode
    from tests.helpers import random_image

    pruning = {"visual_pruning": "longtail", "alpha": 1.0, "kv_pruning": "h2o"}
    checkpoint = write_family(family, tmp_path / family)
    tokenizer, model, processor, _ = load_pretrained_model(str(checkpoint), None, None, device="cpu", pruning=pruning)
    conv_mode = default_conv_mode(family, model.config, purpose="eval")
    pictures = [random_image(i, (200 + 60 * i, 120)) for i in range(3)]
    prompts = [build_prompt(q, conv_mode, model_config=model.config) for q in QUESTIONS]
    batched = score_replies(model, tokenizer, processor, prompts, REPLIES, pictures, conv_mode)
    for prompt, reply, picture, score in zip(prompts, REPLIES, pictures, batched):
        single = score_replies(model, tokenizer, processor, [prompt], [reply], [picture], conv_mode)[0]
        assert score.logprob == pytest.approx(single.logprob, abs=1e-4)
        assert score.token_stats == single.token_stats
        assert score.token_stats["generated"] == score.tokens + 1
        assert score.token_stats["visual_after"] < score.token_stats["visual_before"]
