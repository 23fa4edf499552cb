"""The shell recipe, and DeepSpeed for real: scripts/v1_5/finetune_lora.sh drives train.py under ZeRO-2 and ZeRO-3
with 2 processes on CPU (gloo), using the script's own JSON configs.

What differs from the GPU run, and why: the launcher is ``torchrun --standalone --nproc_per_node 2`` instead of the
``deepspeed`` launcher (which counts CUDA devices), the entry point is train.py's ``main`` (PyTorch SDPA) instead of
train_mem.py (FlashAttention-2 needs CUDA), run by tests/deepspeed_cpu_train.py, which keeps DeepSpeed from compiling
its CPU shared-memory allreduce (40-85 CPU-s in each new environment), bf16/tf32 are off and --use_cpu is on, and
DS_ACCELERATOR=cpu makes DeepSpeed communicate over gloo. The configs, the flags and train.py's code are the ones a
GPU run uses.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

import llava.train.train as train_module
from llava.model.builder import load_pretrained_model
from llava.train.train import build_parser
from tests.test_train_lora import LORA_FILES, image_inputs, make_workspace

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "v1_5" / "finetune_lora.sh"
CPU_RANK_ENTRY = Path(__file__).with_name("deepspeed_cpu_train.py")  # train.py's main, no compiled shm allreduce
TASK_SCRIPT = REPO / "scripts" / "v1_5" / "finetune_task_lora.sh"


def run_script(script: Path, env: dict[str, str], *args: str, timeout: int = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


def dry_run_command(script: Path, env: dict[str, str], *args: str) -> tuple[str, list[str]]:
    result = run_script(script, env, *args)
    assert result.returncode == 0, result.stderr
    batch_line, command_line = result.stdout.strip().splitlines()
    assert command_line.startswith("command: ")
    return batch_line, shlex.split(command_line[len("command: ") :])


def flag(command: list[str], name: str) -> str:
    return command[len(command) - 1 - command[::-1].index(name) + 1]  # the last occurrence wins, as in argparse


def test_dry_run_prints_the_command_and_the_global_batch_without_launching(tmp_path):
    out = tmp_path / "never-created"
    batch, command = dry_run_command(SCRIPT, {"OUTPUT_DIR": str(out)}, "--dry-run")
    assert batch == "effective global batch: 4 per device x 8 accumulation x 4 GPUs = 128"
    assert command[:6] == ["deepspeed", "--num_gpus", "4", "--master_port", "29500", "llava/train/train_mem.py"]
    expected = {
        "--deepspeed": "./scripts/zero3.json", "--per_device_train_batch_size": "4",
        "--gradient_accumulation_steps": "8", "--bf16": "True", "--gradient_checkpointing": "True",
        "--lora_enable": "True", "--lora_r": "128", "--lora_alpha": "256", "--mm_projector_lr": "2e-5",
        "--model_name_or_path": "lmsys/vicuna-7b-v1.5", "--version": "v1", "--group_by_modality_length": "True",
        "--visual-pruning": "longtail", "--alpha": "0.24", "--visual-layer": "16", "--output_dir": str(out),
    }  # fmt: skip
    assert {name: flag(command, name) for name in expected} == expected
    assert flag(command, "--pretrain_mm_mlp_adapter").endswith("pretrain-vicuna-7b-v1.5/mm_projector.bin")
    _, unknown = build_parser().parse_known_args(command[6:])
    assert unknown == []  # every flag of the recipe is one train.py knows
    assert not out.exists()


@pytest.mark.parametrize(
    "env,line",
    [
        ({"NUM_GPUS": "8"}, "4 per device x 4 accumulation x 8 GPUs = 128"),
        ({"NUM_GPUS": "2", "PER_DEVICE_BATCH": "8"}, "8 per device x 8 accumulation x 2 GPUs = 128"),
        ({"NUM_GPUS": "1"}, "4 per device x 32 accumulation x 1 GPUs = 128"),
    ],
)
def test_other_gpu_counts_keep_the_global_batch(env, line):
    batch, command = dry_run_command(SCRIPT, {**env, "DRY_RUN": "1"})
    assert batch == f"effective global batch: {line}"
    assert flag(command, "--num_gpus") == env["NUM_GPUS"]


def test_a_batch_that_does_not_divide_is_refused():
    result = run_script(SCRIPT, {"NUM_GPUS": "3"}, "--dry-run")
    assert result.returncode == 2
    assert "GLOBAL_BATCH=128 is not a multiple of PER_DEVICE_BATCH=4 x NUM_GPUS=3" in result.stderr


def test_task_lora_starts_from_llava_without_a_pretrained_adapter():
    _, command = dry_run_command(TASK_SCRIPT, {}, "--dry-run", "--num_train_epochs", "3")
    assert flag(command, "--model_name_or_path") == "liuhaotian/llava-v1.5-7b"
    assert "--pretrain_mm_mlp_adapter" not in command
    assert flag(command, "--num_train_epochs") == "3"  # extra arguments come last and win


@pytest.mark.parametrize("value", ["", "none"])
def test_an_empty_or_none_deepspeed_config_means_no_deepspeed(value):
    _, command = dry_run_command(
        SCRIPT, {"DEEPSPEED_CONFIG": value, "NUM_GPUS": "1", "LAUNCHER": "python"}, "--dry-run"
    )
    assert command[:2] == ["python", "llava/train/train_mem.py"]
    assert "--deepspeed" not in command
    _, unset = dry_run_command(SCRIPT, {}, "--dry-run")  # the variable unset: the recipe's ZeRO-3
    assert flag(unset, "--deepspeed") == "./scripts/zero3.json"


def test_a_python_launcher_with_several_gpus_is_refused():
    result = run_script(SCRIPT, {"LAUNCHER": "python", "NUM_GPUS": "4"}, "--dry-run")
    assert result.returncode == 2
    assert "starts one process; set NUM_GPUS=1" in result.stderr


def test_the_documented_single_process_cpu_command_trains_without_deepspeed(tiny_ckpt, tmp_path):
    """docs/training.md's one-process command (no DeepSpeed, no launcher), on CPU as documented there."""
    ws = make_workspace(tiny_ckpt, tmp_path)
    out = tmp_path / "llava-v1.5-tiny-lora-single"
    env = {
        "NUM_GPUS": "1", "LAUNCHER": sys.executable, "DEEPSPEED_CONFIG": "none",
        "TRAIN_SCRIPT": "llava/train/train.py", "PER_DEVICE_BATCH": "2", "GLOBAL_BATCH": "4",
        "MODEL_NAME_OR_PATH": str(ws["base"]), "PRETRAIN_MM_MLP_ADAPTER": str(ws["adapter"]),
        "DATA_PATH": str(ws["data"]), "IMAGE_FOLDER": str(ws["images"]), "VISION_TOWER": str(ws["tower"]),
        "OUTPUT_DIR": str(out), "REPORT_TO": "none", "OMP_NUM_THREADS": "2",
        "PRUNING_ARGS": "--visual-pruning longtail --alpha 0.24 --visual-layer 2",
    }  # fmt: skip
    extra = ["--use_cpu", "True", "--bf16", "False", "--tf32", "False", "--lora_r", "8", "--lora_alpha", "16",
             "--max_steps", "2", "--save_steps", "1", "--model_max_length", "512", "--dataloader_num_workers", "0",
             "--disable_tqdm", "True"]  # fmt: skip
    result = run_script(SCRIPT, env, *extra, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "2 per device x 2 accumulation x 1 GPUs = 4" in result.stdout
    assert result.stdout.count("{'loss'") == 2
    assert "process 0 of 1 on cpu" in result.stderr
    assert not list(out.glob("checkpoint-*/global_step*"))  # no DeepSpeed state
    for folder in (out / "checkpoint-1", out):
        assert all((folder / name).is_file() for name in LORA_FILES), sorted(p.name for p in folder.iterdir())
    tokenizer, model, processor, _ = load_pretrained_model(str(out), str(ws["base"]), None, device="cpu")
    ids, pixels = image_inputs(tokenizer, model, processor)
    generated = model.generate(ids, images=pixels, max_new_tokens=3, do_sample=False, return_stats=True)
    assert generated.sequences.shape == (1, 3) and generated.token_stats[0]["visual_after"] < 64


# ---- DeepSpeed on CPU ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tiny_ckpt, tmp_path_factory):
    return make_workspace(tiny_ckpt, tmp_path_factory.mktemp("ds"))


def launch(ws: dict[str, Path], out: Path, config: str) -> subprocess.CompletedProcess:
    if find_spec("deepspeed") is None:
        pytest.fail(
            "DeepSpeed is not installed; on a CPU-only machine: "
            "DS_BUILD_OPS=0 DS_ACCELERATOR=cpu pip install --no-build-isolation deepspeed==0.19.8"
        )
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
        "LAUNCHER": f"{torchrun} --standalone --nproc_per_node 2", "TRAIN_SCRIPT": str(CPU_RANK_ENTRY),
        "NUM_GPUS": "2", "PER_DEVICE_BATCH": "2", "GLOBAL_BATCH": "4", "DEEPSPEED_CONFIG": f"./scripts/{config}.json",
        "MODEL_NAME_OR_PATH": str(ws["base"]), "PRETRAIN_MM_MLP_ADAPTER": str(ws["adapter"]),
        "DATA_PATH": str(ws["data"]), "IMAGE_FOLDER": str(ws["images"]), "VISION_TOWER": str(ws["tower"]),
        "OUTPUT_DIR": str(out), "REPORT_TO": "none",
        "PRUNING_ARGS": "--visual-pruning longtail --alpha 0.24 --visual-layer 2",
    }  # fmt: skip
    extra = ["--use_cpu", "True", "--bf16", "False", "--tf32", "False", "--lora_r", "8", "--lora_alpha", "16",
             "--max_steps", "4", "--save_steps", "2", "--model_max_length", "512", "--dataloader_num_workers", "0",
             "--learning_rate", "1e-3", "--mm_projector_lr", "1e-3", "--disable_tqdm", "True"]  # fmt: skip
    result = run_script(SCRIPT, env, *extra, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "shm_comm" not in result.stdout + result.stderr  # DeepSpeed built (and announced) no shared-memory op
    return result


def logged_losses(folder: Path) -> dict[int, float]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


# Started first, beside the demo's one process (tests/test_demo_model.py, start=1) rather than the shell-script tests,
# which start several processes. (The ZeRO-2 launch that took 57-63 s instead of 9-13 s in some runs was DeepSpeed
# compiling its shared-memory op in each new environment; tests/deepspeed_cpu_train.py keeps it from doing so.)
@pytest.mark.slow(start=0)
# one run at a time: --dist loadfile keeps both on one worker (4 ranks on 2 cores made ZeRO-3 abort at exit)
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_run_saves_lora_checkpoints_that_load(workspace, tmp_path, config):
    out = tmp_path / f"llava-v1.5-tiny-lora-{config}"
    first = launch(workspace, out, config)
    assert first.stdout.count("{'loss'") == 4  # rank 0 prints each logged step
    assert (out / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own state, for resuming
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    kept = [e["visual_tokens_kept"] for e in state["log_history"] if "visual_tokens_kept" in e]
    assert kept and all(1 <= k < 64 for k in kept)
    steps = [e for e in state["log_history"] if "loss" in e]
    assert all("learning_rate_projector" in e for e in steps)  # the optimizer groups keep their names under ZeRO
    _, base, _, _ = load_pretrained_model(str(workspace["base"]), None, None, device="cpu")
    for folder in (out / "checkpoint-2", out):
        assert all((folder / name).is_file() for name in LORA_FILES), sorted(p.name for p in folder.iterdir())
        tokenizer, model, processor, _ = load_pretrained_model(str(folder), str(workspace["base"]), None, device="cpu")
        ids, pixels = image_inputs(tokenizer, model, processor)
        generated = model.generate(ids, images=pixels, max_new_tokens=3, do_sample=False, return_stats=True)
        assert generated.sequences.shape == (1, 3) and generated.token_stats[0]["visual_after"] < 64
        name = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.allclose(model.get_parameter(name), base.get_parameter(name))  # the adapter was merged in
    if config == "zero3":
        resumed = tmp_path / "resumed" / out.name
        resumed.mkdir(parents=True)
        shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
        second = launch(workspace, resumed, config)  # finds checkpoint-2 in the output folder and continues from it
        assert second.stdout.count("{'loss'") == 2  # only steps 3 and 4 ran
        losses, again = logged_losses(out), logged_losses(resumed)
        assert sorted(again) == [1, 2, 3, 4]  # 1-2 restored with the checkpoint's state, 3-4 trained again
        assert again == pytest.approx(losses, rel=1e-4)


# ---- the end of a distributed run ------------------------------------------------------------------------------
@pytest.mark.parametrize("outcome", ["left the group", "single process", "failed"])
def test_the_process_ends_before_library_teardown_only_after_a_clean_distributed_run(monkeypatch, outcome):
    """run_training registers its exit handler before anything else of the run; the handler ends the process (exit
    status 0) only when every rank trained, saved and left the process group."""
    handlers, exits = [], []
    monkeypatch.setattr(train_module.atexit, "register", handlers.append)
    monkeypatch.setattr(train_module.os, "_exit", exits.append)
    monkeypatch.setitem(train_module._RUN, "left_the_group", False)

    def fake_train(attn_implementation, argv):
        assert handlers == [train_module.end_process_after_clean_shutdown]  # registered before the run
        if outcome == "failed":
            raise RuntimeError("a step failed")

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(train_module, "shut_down_distributed", lambda: outcome == "left the group")
    if outcome == "failed":
        with pytest.raises(RuntimeError, match="a step failed"):
            train_module.run_training(argv=[])
    else:
        train_module.run_training(argv=[])
    handlers[0]()
    assert exits == ([0] if outcome == "left the group" else [])
