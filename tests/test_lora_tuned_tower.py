"""LoRA on a base whose vision tower was tuned (issue #26): the tuned tower must survive saving, loading and merging.

The base is the tiny LLaVA-1.5 checkpoint with ``unfreeze_mm_vision_tower: true`` and tower weights in the checkpoint
that differ from the CLIP folder's (as the demo checkpoint and LLaVA-1.6's releases ship). A loader that fell back to
the folder's weights would change the logits and the number of visual tokens stage 1 keeps, so every route is held to
the trained model's logits (fp32, 1e-5) and kept counts: LoRA + base, ``run_llava --model-base`` and the merged folder;
once with the tower frozen during the LoRA run and once with ``--unfreeze_mm_vision_tower True``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionModel

from llava.constants import IMAGE_TOKEN_INDEX, NON_LORA_FILE
from llava.eval import run_llava
from llava.inference import build_prompt
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.train import train as train_module
from llava.utils import load_from_args
from pruning import pruning_overrides
from tests.helpers import random_image
from tests.test_train_lora import train_args, write_records

REPO = Path(__file__).resolve().parents[1]
TOWER_KEY = "vision_tower.vision_tower."  # inside non_lora_trainables.bin and the merged weights
QUESTION = "What is shown in the image?"


def write_tuned_tower_base(tiny_ckpt: Path, out: Path, scale: float = 0.05, seed: int = 7) -> Path:
    """A copy of the tiny checkpoint whose tower was 'fine-tuned': the CLIP folder's weights plus noise, stored in the
    checkpoint under the release's names (transformers 4.x: ``...vision_tower.vision_model.*``), and the config saying
    ``unfreeze_mm_vision_tower: true``."""
    shutil.copytree(tiny_ckpt, out)
    config = json.loads((out / "config.json").read_text())
    config["unfreeze_mm_vision_tower"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    clip = CLIPVisionModel.from_pretrained(config["mm_vision_tower"])
    generator = torch.Generator().manual_seed(seed)
    tower = {
        f"model.vision_tower.vision_tower.vision_model.{key}": (
            value + scale * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        ).contiguous()
        for key, value in clip.state_dict().items()
    }
    shard = "pytorch_model-tower.bin"
    torch.save(tower, out / shard)
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(tower, shard))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


@pytest.fixture(scope="module")
def tuned_base(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tuned")
    base = write_tuned_tower_base(tiny_ckpt, root / "llava-v1.5-tiny-tuned-tower")
    images = root / "images"
    images.mkdir()
    data = root / "llava_tiny_mix.json"
    data.write_text(json.dumps(write_records(images, images=8, texts=2)))
    probe = root / "probe.png"
    random_image(11, size=(100, 80)).save(probe)
    return {"base": base, "images": images, "data": data, "probe": probe}


def lora_args(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """A task LoRA on the tuned base (it names its own tower and projector), checkpoints at steps 1 and 2."""
    args = train_args({**ws, "tower": "-", "adapter": "-"}, out)
    for flag_name in ("--vision_tower", "--pretrain_mm_mlp_adapter"):
        at = args.index(flag_name)
        del args[at : at + 2]
    schedule = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size",
                "2", "--learning_rate", "5e-3", "--mm_projector_lr", "5e-3"]  # fmt: skip
    return [*args, *schedule, *extra]


def probe_inputs(tokenizer, model, processor, images) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt per image, as a batch (the ids have equal length; stage 1 gives each image its own count)."""
    prompt = build_prompt(QUESTION, "vicuna_v1", model_config=model.config)
    ids = torch.tensor([tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)] * len(images))
    return ids, process_images(images, processor, model.config)


def probe_images(ws: dict[str, Path]) -> list:
    return [load_image(str(ws["probe"])), *(random_image(seed, size=(90 + 7 * seed, 110)) for seed in range(20, 25))]


def logits_and_kept(llava, model, ids, pixels) -> tuple[torch.Tensor, list[int]]:
    """The logits of ``model`` (a LLaVA, or the peft model around ``llava``) and stage 1's kept count per image."""
    with torch.no_grad():
        logits = model(input_ids=ids, images=pixels).logits
        merged = llava.merge_multimodal(ids, None, None, pixels)
    return logits, [sample["visual_after"] for sample in merged.token_stats]


def loaded(path: Path, base: Path | None, ws, pruning: dict | None = None) -> tuple[torch.Tensor, list[int], object]:
    tokenizer, model, processor, _ = load_pretrained_model(
        str(path), str(base) if base else None, None, device="cpu", pruning=pruning
    )
    ids, pixels = probe_inputs(tokenizer, model, processor, probe_images(ws))
    logits, kept = logits_and_kept(model, model, ids, pixels)
    return logits, kept, model


def tower_state(llava) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in llava.get_vision_tower().vision_tower.state_dict().items()}


@pytest.fixture(scope="module", params=[False, True], ids=["frozen-tower", "unfrozen-tower"])
def trained(request, tuned_base, tmp_path_factory):
    """A 2-step LoRA run on the tuned base with stage 1 on, and the trained model's logits, kept counts and tower."""
    unfreeze = request.param
    out = tmp_path_factory.mktemp("lora") / "llava-v1.5-tiny-tuned-lora"
    extra = ["--unfreeze_mm_vision_tower", "True", "--mm_vision_tower_lr", "5e-2"] if unfreeze else []
    trainer = train_module.train(argv=lora_args(tuned_base, out, *extra))
    model = trainer.model.eval()
    llava = model.get_base_model()
    tokenizer = trainer.processing_class
    processor = llava.get_vision_tower().image_processor
    ids, pixels = probe_inputs(tokenizer, llava, processor, probe_images(tuned_base))
    logits, kept = logits_and_kept(llava, model, ids, pixels)
    return {"out": out, "unfreeze": unfreeze, "logits": logits, "kept": kept, "tower": tower_state(llava)}


def assert_same_model(logits: torch.Tensor, kept: list[int], trained: dict) -> None:
    assert kept == trained["kept"], f"kept visual tokens {kept}, trained model kept {trained['kept']}"
    # fp32; merging the adapter into the weights reorders the sums (measured: up to 9e-6 on logits up to 5)
    torch.testing.assert_close(logits, trained["logits"], atol=1e-5, rtol=1e-5)


def test_the_base_tower_is_tuned_and_changes_what_stage1_keeps(tuned_base, tiny_ckpt):
    """The fixture is a real trap: the checkpoint's tower differs from the CLIP folder's enough to change the
    logits and the kept counts, and the builder loads the checkpoint's."""
    stage1, unpruned = {"visual_pruning": "longtail", "alpha": 0.24}, {"visual_pruning": "none"}
    _, tuned_kept, tuned = loaded(tuned_base["base"], None, tuned_base, stage1)
    _, untuned_kept, untuned = loaded(tiny_ckpt, None, tuned_base, stage1)
    assert tuned.config.unfreeze_mm_vision_tower is True
    name = "model.vision_tower.vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(tuned.get_parameter(name), untuned.get_parameter(name))
    assert tuned_kept != untuned_kept
    tuned_logits, _, _ = loaded(tuned_base["base"], None, tuned_base, unpruned)
    untuned_logits, _, _ = loaded(tiny_ckpt, None, tuned_base, unpruned)
    assert (tuned_logits - untuned_logits).abs().max() > 0.05


def test_every_checkpoint_carries_the_tuned_tower(trained, tuned_base):
    out = trained["out"]
    _, base, _, _ = load_pretrained_model(str(tuned_base["base"]), None, None, device="cpu")
    base_tower = tower_state(base)
    for folder in (out / "checkpoint-1", out / "checkpoint-2", out):
        config = json.loads((folder / "config.json").read_text())
        assert config["unfreeze_mm_vision_tower"] is True, folder
        saved = torch.load(folder / NON_LORA_FILE, weights_only=True)
        tower = {key.split(TOWER_KEY, 1)[1]: value for key, value in saved.items() if TOWER_KEY in key}
        assert set(tower) == set(base_tower), f"{folder}/{NON_LORA_FILE} lacks tower tensors"
        changed = [k for k in tower if not torch.equal(tower[k], base_tower[k])]
        if trained["unfreeze"]:
            assert changed, f"{folder}: the unfrozen tower did not train"
        else:
            assert not changed, f"{folder}: the frozen tuned tower changed: {changed[:3]}"
    final = {k.split(TOWER_KEY, 1)[1]: v for k, v in torch.load(out / NON_LORA_FILE, weights_only=True).items()
             if TOWER_KEY in k}  # fmt: skip
    assert all(torch.equal(final[k], trained["tower"][k]) for k in final)


def test_lora_on_its_base_reproduces_the_trained_model(trained, tuned_base):
    logits, kept, model = loaded(trained["out"], tuned_base["base"], tuned_base)
    assert model.config.unfreeze_mm_vision_tower is True
    assert_same_model(logits, kept, trained)


def test_an_intermediate_checkpoint_loads_its_own_tower(trained, tuned_base):
    folder = trained["out"] / "checkpoint-1"
    _, _, model = loaded(folder, tuned_base["base"], tuned_base)
    saved = torch.load(folder / NON_LORA_FILE, weights_only=True)
    loaded_tower = tower_state(model)
    for key, value in saved.items():
        if TOWER_KEY in key:
            assert torch.equal(loaded_tower[key.split(TOWER_KEY, 1)[1]], value), key


def test_run_llava_with_model_base_reproduces_the_trained_model(trained, tuned_base, capsys):
    flags = ["--model-path", str(trained["out"]), "--model-base", str(tuned_base["base"]), "--device", "cpu",
             "--image-file", str(tuned_base["probe"]), "--query", QUESTION]  # fmt: skip
    args = run_llava.parse_args(flags)
    tokenizer, model, processor, _ = load_from_args(args, pruning_overrides(args))  # what run_llava loads
    ids, pixels = probe_inputs(tokenizer, model, processor, probe_images(tuned_base))
    assert_same_model(*logits_and_kept(model, model, ids, pixels), trained)

    run_llava.main([*flags, "--temperature", "0", "--max_new_tokens", "2", "--show-tokens"])
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["visual_after"] == trained["kept"][0]  # the probe image is the first of the batch


def test_merged_folder_holds_the_tuned_tower_and_reproduces_the_trained_model(trained, tuned_base, tmp_path):
    spec = importlib.util.spec_from_file_location("merge_lora_weights", REPO / "scripts" / "merge_lora_weights.py")
    merge_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_script)
    merged = tmp_path / "llava-v1.5-tiny-tuned-merged"
    merge_script.main(["--model-path", str(trained["out"]), "--model-base", str(tuned_base["base"]),
                       "--save-model-path", str(merged), "--dtype", "float32"])  # fmt: skip
    assert json.loads((merged / "config.json").read_text())["unfreeze_mm_vision_tower"] is True
    weights = load_file(merged / "model.safetensors")
    tower = {k.split(TOWER_KEY, 1)[1]: v for k, v in weights.items() if TOWER_KEY in k}
    assert tower and all(torch.equal(tower[k], trained["tower"][k]) for k in tower)
    logits, kept, _ = loaded(merged, None, tuned_base)
    assert_same_model(logits, kept, trained)


@pytest.mark.parametrize("trained", [False], indirect=True, ids=["frozen-tower"])
def test_a_lora_folder_written_before_the_fix_takes_the_tower_from_its_tuned_base(trained, tuned_base, tmp_path):
    """Older LoRA folders trained on a tuned base with the tower frozen say unfreeze_mm_vision_tower: false and carry
    only the projector; training used the base's tuned tower, so the loader takes it from the base."""
    old = tmp_path / "llava-v1.5-tiny-tuned-lora-old"
    shutil.copytree(trained["out"], old, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "unfreeze_mm_vision_tower": False}))
    state = torch.load(old / NON_LORA_FILE, weights_only=True)
    torch.save({k: v for k, v in state.items() if TOWER_KEY not in k}, old / NON_LORA_FILE)
    logits, kept, model = loaded(old, tuned_base["base"], tuned_base)
    assert model.config.unfreeze_mm_vision_tower is True
    assert_same_model(logits, kept, trained)


def test_full_fine_tuning_of_a_tuned_base_with_the_tower_frozen_keeps_the_tower(tuned_base, tmp_path):
    out = tmp_path / "llava-v1.5-tiny-tuned-full"
    trainer = train_module.train(argv=[*lora_args(tuned_base, out), "--lora_enable", "False", "--max_steps", "1"])
    llava = trainer.model.eval()
    assert json.loads((out / "config.json").read_text())["unfreeze_mm_vision_tower"] is True
    _, _, model = loaded(out, None, tuned_base)
    _, _, base = loaded(tuned_base["base"], None, tuned_base)
    for key, value in tower_state(model).items():
        assert torch.equal(value, tower_state(llava)[key]) and torch.equal(value, tower_state(base)[key]), key
