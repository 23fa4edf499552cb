"""LoRA fine-tuning of the tiny model in upstream's JSON format with stage 1 on: checkpoints that load, resuming,
overfitting, where LoRA goes, merging."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava.constants import IMAGE_TOKEN_INDEX
from llava.inference import build_prompt
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.train import train as train_module
from llava.train.callbacks import NON_LORA_FILE, non_lora_state
from tests.helpers import random_image
from tests.test_builder import _write_base_llm

REPO = Path(__file__).resolve().parents[1]
ANSWERS = ["A red circle.", "A blue square.", "Yes.", "No, there is nothing."]
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json", NON_LORA_FILE, "tokenizer.model")


def write_records(folder: Path, images: int, texts: int) -> list[dict]:
    """Upstream's llava_v1_5_mix665k.json layout: image samples with <image>, text-only samples without 'image'."""
    records = []
    for i in range(images):
        random_image(i, size=(60 + 13 * i, 90)).save(folder / f"{i:06d}.jpg")
        turns = [
            {"from": "human", "value": "What is shown in the image?\n<image>" if i % 2 else "<image>\nDescribe it."},
            {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]},
        ]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "Is there a red circle?"}, {"from": "gpt", "value": "Yes."}]
        records.append({"id": f"{i:012d}", "image": f"{i:06d}.jpg", "conversations": turns})
    for i in range(texts):
        records.append({"id": f"text-{i}", "conversations": [
            {"from": "human", "value": "How many objects are there?"}, {"from": "gpt", "value": str(i)},
            {"from": "human", "value": "Please answer yes or no."}, {"from": "gpt", "value": "No."},
        ]})  # fmt: skip
    return records


def make_workspace(tiny_ckpt: Path, root: Path) -> dict[str, Path]:
    """A Vicuna-like base LLM, the CLIP tower, a pretrained projector, images and a mixed data file."""
    _, model, _, _ = load_pretrained_model(str(tiny_ckpt), None, None, device="cpu")
    base = _write_base_llm(model, root / "vicuna-tiny")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_ckpt / name, base / name)
    adapter = root / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in model.get_model().mm_projector.state_dict().items()}, adapter)
    images = root / "images"
    images.mkdir()
    data = root / "llava_tiny_mix.json"
    data.write_text(json.dumps(write_records(images, images=8, texts=4)))
    return {
        "base": base,
        "tower": tiny_ckpt.with_name(tiny_ckpt.name + "-clip"),
        "adapter": adapter,
        "images": images,
        "data": data,
        "llava": tiny_ckpt,
    }


def train_args(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(ws["base"]), "--version", "v1",
        "--data_path", str(ws["data"]), "--image_folder", str(ws["images"]),
        "--vision_tower", str(ws["tower"]), "--pretrain_mm_mlp_adapter", str(ws["adapter"]),
        "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
        "--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16",
        "--output_dir", str(out), "--report_to", "none", "--use_cpu", "True", "--disable_tqdm", "True",
        "--dataloader_num_workers", "0", "--model_max_length", "512", "--logging_steps", "1", "--seed", "0",
        "--visual-pruning", "longtail", "--alpha", "0.24", "--visual-layer", "2",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    return make_workspace(tiny_ckpt, tmp_path_factory.mktemp("train"))


def image_inputs(tokenizer, model, processor, seed: int = 3):
    prompt = build_prompt("What is shown in the image?", "vicuna_v1", model_config=model.config)
    ids = torch.tensor([tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)])
    return ids, process_images([random_image(seed)], processor, model.config)


def loaded_logits(path: Path, base: Path | None) -> tuple[torch.Tensor, object]:
    tokenizer, model, processor, _ = load_pretrained_model(str(path), str(base) if base else None, None, device="cpu")
    ids, pixels = image_inputs(tokenizer, model, processor)
    with torch.no_grad():
        logits = model(ids, images=pixels).logits
    out = model.generate(ids, images=pixels, max_new_tokens=4, do_sample=False, return_stats=True)
    return logits, out


SCHEDULE = ("--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--mm_projector_lr", "2e-3",
            "--group_by_modality_length", "True", "--gradient_checkpointing", "True")  # fmt: skip


@pytest.fixture(scope="module")
def trained(workspace, tmp_path_factory):
    """One run of 6 optimizer steps with checkpoints at 3 and 6, and the trained model's own logits."""
    out = tmp_path_factory.mktemp("run") / "llava-v1.5-tiny-lora"
    trainer = train_module.train(argv=train_args(workspace, out, *SCHEDULE))
    model = trainer.model.eval()
    tokenizer, _, processor, _ = load_pretrained_model(str(workspace["llava"]), None, None, device="cpu")
    ids, pixels = image_inputs(tokenizer, model.get_base_model(), processor)
    with torch.no_grad():
        logits = model(input_ids=ids, images=pixels).logits
    return out, trainer.state, logits


def test_every_checkpoint_has_the_llava_files_and_the_pruning_config(trained):
    out, state, _ = trained
    for folder in (out / "checkpoint-3", out / "checkpoint-6", out):
        missing = [name for name in LORA_FILES if not (folder / name).is_file()]
        assert not missing, f"{folder} lacks {missing}"
        config = json.loads((folder / "config.json").read_text())
        assert config["pruning"]["visual_pruning"] == "longtail" and config["pruning"]["visual_layer"] == 2
        assert config["mm_vision_tower"] and config["image_aspect_ratio"] == "pad" and config["use_cache"] is True
        keys = set(torch.load(folder / NON_LORA_FILE, weights_only=True))
        assert keys == {f"base_model.model.model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert state.global_step == 6


def test_stage1_prunes_during_training_and_is_logged(trained):
    _, state, _ = trained
    logged = [entry for entry in state.log_history if "visual_tokens_kept" in entry]
    assert logged, "no step logged visual token counts"
    for entry in logged:
        assert entry["visual_tokens_before"] == 64  # (112 / 14)^2 patches of the tiny tower
        assert 1 <= entry["visual_tokens_kept"] < 64


def test_final_and_intermediate_checkpoints_load_with_the_base_and_generate(trained, workspace):
    out, _, trained_logits = trained
    final_logits, final = loaded_logits(out, workspace["base"])
    torch.testing.assert_close(final_logits, trained_logits, atol=1e-4, rtol=1e-4)
    middle_logits, middle = loaded_logits(out / "checkpoint-3", workspace["base"])
    assert not torch.allclose(middle_logits, final_logits, atol=1e-3)
    for generated in (final, middle):
        assert generated.sequences.shape == (1, 4)
        stats = generated.token_stats[0]
        assert stats["visual_before"] == 64 and stats["visual_after"] < 64  # the trained pruning setting is loaded


def test_resumed_run_continues_from_the_intermediate_step(trained, workspace, tmp_path, capsys):
    out, state, _ = trained
    resumed_out = tmp_path / "llava-v1.5-tiny-lora"
    resumed_out.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed_out / "checkpoint-3")
    capsys.readouterr()
    resumed = train_module.train(argv=train_args(workspace, resumed_out, *SCHEDULE))  # finds checkpoint-3 itself
    assert capsys.readouterr().out.count("{'loss'") == 3  # only steps 4-6 ran (each logged step is printed)
    steps = [entry["step"] for entry in resumed.state.log_history if "loss" in entry]
    assert steps == [1, 2, 3, 4, 5, 6]  # 1-3 restored from the checkpoint's state, 4-6 trained now
    assert resumed.state.global_step == 6
    original = {e["step"]: e["loss"] for e in state.log_history if "loss" in e}
    again = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    assert again == pytest.approx(original, rel=1e-5)
    for name in ("adapter_model.safetensors", NON_LORA_FILE):
        a = load_file(out / name) if name.endswith("safetensors") else torch.load(out / name, weights_only=True)
        b = (
            load_file(resumed_out / name)
            if name.endswith("safetensors")
            else torch.load(resumed_out / name, weights_only=True)
        )
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_merge_script_writes_a_checkpoint_that_loads_without_the_base(trained, workspace, tmp_path):
    out, _, _ = trained
    spec = importlib.util.spec_from_file_location("merge_lora_weights", REPO / "scripts" / "merge_lora_weights.py")
    merge_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_script)
    merged = tmp_path / "llava-v1.5-tiny-merged"
    merge_script.main(
        ["--model-path", str(out), "--model-base", str(workspace["base"]), "--save-model-path", str(merged),
         "--dtype", "float32"]
    )  # fmt: skip
    assert not (merged / "adapter_config.json").exists()
    assert not any("vision_tower" in key for key in load_file(merged / "model.safetensors"))
    merged_logits, _ = loaded_logits(merged, None)
    lora_logits, _ = loaded_logits(out, workspace["base"])
    torch.testing.assert_close(merged_logits, lora_logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(FileExistsError, match="not empty"):
        merge_script.merge(str(out), str(workspace["base"]), merged)


def test_overfitting_a_handful_of_samples_halves_the_loss_with_pruning_on(workspace, tmp_path):
    data = tmp_path / "four.json"
    data.write_text(json.dumps(json.loads(workspace["data"].read_text())[:4]))
    trainer = train_module.train(
        argv=train_args(
            {**workspace, "data": data}, tmp_path / "overfit",
            "--max_steps", "12", "--save_strategy", "no", "--per_device_train_batch_size", "4",
            "--learning_rate", "3e-3", "--mm_projector_lr", "3e-3", "--lr_scheduler_type", "constant",
            "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.0",
        )
    )  # fmt: skip
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 <= 0.5 * losses[0], losses
    assert all(entry["visual_tokens_kept"] < 64 for entry in trainer.state.log_history if "visual_tokens_kept" in entry)


def test_lora_sits_on_every_llm_linear_and_only_lora_and_projector_train(workspace, tmp_path):
    args = train_module.parse_args(train_args(workspace, tmp_path / "x"))
    model, tokenizer, pruning = train_module.build_model(*args[:3], args[3])
    llava = model.get_base_model()
    lora_modules = {name for name, module in llava.named_modules() if hasattr(module, "lora_A")}
    layers = llava.config.num_hidden_layers
    expected = {
        f"model.layers.{i}.{block}.{proj}"
        for i in range(layers)
        for block, projs in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for proj in (f"{p}_proj" for p in projs)
    }
    assert lora_modules == expected
    trainable = {name for name, p in llava.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n or ".mm_projector." in n}
    assert any(".mm_projector." in n for n in trainable)
    assert not any(p.requires_grad for p in llava.get_vision_tower().parameters())
    assert pruning.visual_pruning == "longtail" and llava.config.pruning["visual_layer"] == 2
    assert tokenizer.pad_token == tokenizer.unk_token and tokenizer.padding_side == "right"


def test_task_lora_from_a_llava_checkpoint_keeps_its_projector_trainable(workspace, tmp_path):
    out = tmp_path / "llava-v1.5-tiny-task-lora"
    args = [a for a in train_args(workspace, out) if a not in (str(workspace["adapter"]), "--pretrain_mm_mlp_adapter")]
    args[args.index("--model_name_or_path") + 1] = str(workspace["llava"])
    args[args.index("--vision_tower") : args.index("--vision_tower") + 2] = []  # the checkpoint names its tower
    trainer = train_module.train(argv=[*args, "--max_steps", "2", "--save_strategy", "no"])
    assert trainer.state.global_step == 2
    tokenizer, tuned, processor, _ = load_pretrained_model(str(out), str(workspace["llava"]), None, device="cpu")
    ids, pixels = image_inputs(tokenizer, tuned, processor)
    assert tuned.generate(ids, images=pixels, max_new_tokens=4, do_sample=False).shape == (1, 4)
    _, base, _, _ = load_pretrained_model(str(workspace["llava"]), None, None, device="cpu")
    for name in ("model.mm_projector.0.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert not torch.allclose(tuned.get_parameter(name), base.get_parameter(name)), f"{name} did not train"
    assert torch.equal(tuned.get_parameter("lm_head.weight"), base.get_parameter("lm_head.weight"))


def test_wandb_requested_but_missing_is_a_clear_error(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_module, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        train_module.parse_args([*train_args(workspace, tmp_path / "x"), "--report_to", "wandb"])
    assert "pip install wandb" in capsys.readouterr().err


def test_a_frozen_projector_is_still_saved_with_the_adapter(workspace, tmp_path):
    args = train_module.parse_args([*train_args(workspace, tmp_path / "x"), "--freeze_mm_mlp_adapter", "True"])
    model, _, _ = train_module.build_model(*args[:3], args[3])
    assert not any(p.requires_grad for p in model.get_base_model().get_model().mm_projector.parameters())
    state = non_lora_state(model)
    assert set(state) == {f"base_model.model.model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}


def test_a_visual_layer_the_tower_lacks_fails_at_start_up(workspace, tmp_path):
    args = train_module.parse_args([*train_args(workspace, tmp_path / "x"), "--visual-layer", "4"])
    with pytest.raises(ValueError, match=r"--visual-layer 4 .* has 4 \(valid: 0\.\.3\)"):
        train_module.build_model(*args[:3], args[3])


def test_lazy_preprocess_false_keeps_the_token_ids(workspace, tmp_path):
    for flag, keeps in (("True", False), ("False", True)):
        args = train_module.parse_args([*train_args(workspace, tmp_path / "x"), "--lazy_preprocess", flag])
        model, tokenizer, _ = train_module.build_model(*args[:3], args[3])
        dataset, _ = train_module.build_dataset(model, tokenizer, *args[:3])
        dataset[0]
        if keeps:
            assert list(dataset.kept) == [0]
        else:
            assert dataset.kept is None


def test_unfrozen_tower_trains_at_its_own_rate_and_the_tuned_tower_loads(workspace, tmp_path):
    out = tmp_path / "llava-v1.5-tiny-tower-lora"
    args = [a for a in train_args(workspace, out) if a not in (str(workspace["adapter"]), "--pretrain_mm_mlp_adapter")]
    args[args.index("--model_name_or_path") + 1] = str(workspace["llava"])
    args[args.index("--vision_tower") : args.index("--vision_tower") + 2] = []
    extra = ["--unfreeze_mm_vision_tower", "True", "--mm_vision_tower_lr", "5e-3", "--learning_rate", "1e-3"]
    trainer = train_module.train(argv=[*args, *extra, "--max_steps", "2", "--save_strategy", "no"])
    rates = sorted({group["initial_lr"] for group in trainer.optimizer.param_groups})
    assert rates == [1e-3, 5e-3]  # the tower groups at --mm_vision_tower_lr, the rest at --learning_rate
    assert json.loads((out / "config.json").read_text())["unfreeze_mm_vision_tower"] is True
    saved = torch.load(out / NON_LORA_FILE, weights_only=True)
    assert any(".vision_tower.vision_tower." in key for key in saved)
    _, tuned, _, _ = load_pretrained_model(str(out), str(workspace["llava"]), None, device="cpu")
    _, base, _, _ = load_pretrained_model(str(workspace["llava"]), None, None, device="cpu")
    name = "model.vision_tower.vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(tuned.get_parameter(name), base.get_parameter(name)), "the tuned tower was not loaded"
    assert torch.allclose(tuned.get_parameter(name), saved[f"base_model.model.{name}"])


def test_full_run_with_a_tuned_tower_continues_from_that_tower(workspace, tmp_path):
    """A second phase started from a checkpoint that carries its tuned tower trains that tower, not the CLIP
    folder's (train.py reads unfreeze_mm_vision_tower from the checkpoint's config)."""
    first = tmp_path / "phase1"
    args = [
        a for a in train_args(workspace, first) if a not in (str(workspace["adapter"]), "--pretrain_mm_mlp_adapter")
    ]
    args[args.index("--model_name_or_path") + 1] = str(workspace["llava"])
    extra = ["--lora_enable", "False", "--unfreeze_mm_vision_tower", "True", "--learning_rate", "5e-3"]
    train_module.train(argv=[*args, *extra, "--max_steps", "1", "--save_strategy", "no"])
    saved = {}
    for file in first.glob("model*.safetensors"):
        saved.update(load_file(str(file)))
    prefix = "model.vision_tower.vision_tower."
    tuned = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    assert tuned and json.loads((first / "config.json").read_text())["unfreeze_mm_vision_tower"] is True

    second = train_args(workspace, tmp_path / "phase2", *extra)
    second[second.index("--model_name_or_path") + 1] = str(first)
    second = [a for a in second if a not in (str(workspace["adapter"]), "--pretrain_mm_mlp_adapter")]
    parsed = train_module.parse_args(second)
    model, _, _ = train_module.build_model(*parsed[:3], parsed[3])
    tower = model.get_vision_tower().vision_tower.state_dict()
    _, base, _, _ = load_pretrained_model(str(workspace["llava"]), None, None, device="cpu")
    untuned = base.get_vision_tower().vision_tower.state_dict()
    changed = [k for k in tuned if not torch.equal(tuned[k], untuned[k])]
    assert changed, "phase 1 did not train the tower"
    assert all(torch.equal(tower[k], tuned[k]) for k in tuned)
    assert all(p.requires_grad for p in model.get_vision_tower().parameters())


def test_the_logged_learning_rate_is_the_lora_groups_and_each_other_group_is_named(trained):
    """With --mm_projector_lr the Trainer would log the first optimizer group's rate, the projector's (issue #26)."""
    _, state, _ = trained
    logged = [entry for entry in state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4, 5, 6]
    for entry in logged:  # linear decay to 0 over 6 steps; each step logs the rate it trained at
        remaining = (6 - entry["step"] + 1) / 6
        assert entry["learning_rate"] == pytest.approx(1e-3 * remaining)  # --learning_rate: LoRA
        assert entry["learning_rate_projector"] == pytest.approx(2e-3 * remaining)  # --mm_projector_lr
        assert "learning_rate_tower" not in entry  # the tower is frozen


def five_step_run(workspace: dict[str, Path], out: Path, seed: str) -> list[tuple[float, float]]:
    trainer = train_module.train(
        argv=train_args(
            workspace, out, "--max_steps", "5", "--save_strategy", "no", "--per_device_train_batch_size", "2",
            "--learning_rate", "2e-2", "--mm_projector_lr", "2e-2", "--seed", seed,
        )
    )  # fmt: skip
    return [(entry["loss"], entry["grad_norm"]) for entry in trainer.state.log_history if "loss" in entry]


def test_two_runs_with_the_same_seed_give_the_same_losses(workspace, tmp_path):
    """LoRA's A matrices are drawn while the model is built, before the Trainer seeds: train.py seeds first."""
    torch.manual_seed(1234)  # whatever the global RNG holds before the run must not matter
    first = five_step_run(workspace, tmp_path / "a", "0")
    torch.rand(1000)
    second = five_step_run(workspace, tmp_path / "b", "0")
    assert len(first) == 5
    assert first == second
    other_seed = five_step_run(workspace, tmp_path / "c", "1")
    assert [norm for _, norm in other_seed] != [norm for _, norm in first]  # the seed does reach the initialisation


def test_task_lora_without_projector_flags_keeps_the_checkpoints_projector_type(workspace, tmp_path):
    """Left out, --mm_projector_type and friends come from the LLaVA checkpoint (upstream wrote 'linear' into
    config.json over an mlp2x_gelu projector, and the LoRA folder could not be loaded)."""
    out = tmp_path / "llava-v1.5-tiny-task-lora"
    args = train_args(workspace, out)
    args[args.index("--model_name_or_path") + 1] = str(workspace["llava"])
    for name in ("--vision_tower", "--pretrain_mm_mlp_adapter", "--mm_projector_type", "--mm_vision_select_layer"):
        del args[args.index(name) : args.index(name) + 2]
    train_module.train(argv=[*args, "--max_steps", "1", "--save_strategy", "no"])
    config = json.loads((out / "config.json").read_text())
    assert (config["mm_projector_type"], config["mm_vision_select_layer"]) == ("mlp2x_gelu", -2)
    tokenizer, model, processor, _ = load_pretrained_model(str(out), str(workspace["llava"]), None, device="cpu")
    ids, pixels = image_inputs(tokenizer, model, processor)
    assert model.generate(ids, images=pixels, max_new_tokens=2, do_sample=False).shape == (1, 2)

    parsed = train_module.parse_args([*args, "--mm_projector_type", "linear"])
    with pytest.raises(ValueError, match="--mm_projector_type linear: .* has a mlp2x_gelu projector"):
        train_module.build_model(*parsed[:3], parsed[3])
