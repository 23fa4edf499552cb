"""Pieces of scripts/train_demo_model.py: the 2-D position start, the per-object loss, the projector start."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from llava.tokenization import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "playground" / "checkpoints" / "llava-v1.5-demo"
spec = importlib.util.spec_from_file_location("train_demo_model", REPO / "scripts" / "train_demo_model.py")
steps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(steps)


def test_sincos_positions_make_near_patches_alike() -> None:
    table = steps.sincos_positions(64, 24)
    assert table.shape == (1 + 24 * 24, 64) and torch.equal(table[0], torch.zeros(64))
    patch = table[1:].reshape(24, 24, 64)
    centre = patch[12, 12]
    assert torch.dot(centre, patch[12, 13]) > torch.dot(centre, patch[12, 20])
    assert torch.dot(centre, patch[13, 12]) > torch.dot(centre, patch[20, 12])
    assert len({tuple(row.tolist()) for row in table[1:]}) == 24 * 24  # every patch has its own code


def test_object_loss_classifies_each_objects_mean_feature() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 6, 4)
    labels = torch.tensor([[0, 3, 3, 0, 7, 0], [5, 0, 0, 0, 0, 5]])  # 0 = background, else category + 1
    head = nn.Linear(4, 13)
    expected = nn.functional.cross_entropy(
        head(torch.stack([features[0, 1:3].mean(0), features[0, 4], features[1, [0, 5]].mean(0)]))[:, 1:],
        torch.tensor([2, 6, 4]),
    )
    assert torch.allclose(steps.object_loss(features, labels, head), expected)


def test_init_projector_starts_as_patch_classifier_then_category_words(tmp_path: Path) -> None:
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO / name, tmp_path / name)
    tokenizer = load_tokenizer(tmp_path)
    vocab = len(tokenizer)
    state = {
        "model.mm_projector.0.weight": torch.zeros(16, 4),
        "model.mm_projector.0.bias": torch.zeros(16),
        "model.mm_projector.2.weight": torch.randn(8, 16),
        "model.mm_projector.2.bias": torch.randn(8),
        "model.embed_tokens.weight": torch.randn(vocab, 8),
    }
    torch.save(state, tmp_path / "pytorch_model.bin")
    head = nn.Linear(4, 13)
    torch.save(head.state_dict(), tmp_path / "head.pt")
    steps.init_projector(tmp_path, tmp_path / "head.pt")
    out = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    # unit k + 1 reads the log-odds of category k against the background (row 0 of the head); unit 0 is silent
    features = torch.randn(5, 4)
    hidden = features @ out["model.mm_projector.0.weight"].T + out["model.mm_projector.0.bias"]
    logits = head(features).detach()
    assert torch.allclose(hidden[:, 1:13], logits[:, 1:] - logits[:, :1], atol=1e-6)
    assert not hidden[:, 0].any()
    assert not out["model.mm_projector.0.weight"][13:].any()
    # a hidden vector that fires only the "red circle" unit comes out as embed("red") + embed("circle")
    hidden = torch.zeros(16)
    hidden[1 + steps.CATEGORIES.index("red circle")] = 1.0
    projected = out["model.mm_projector.2.weight"] @ hidden + out["model.mm_projector.2.bias"]
    emb = state["model.embed_tokens.weight"]
    red, circle = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("red", "circle"))
    assert torch.allclose(projected, emb[red] + emb[circle])
    assert not out["model.mm_projector.2.weight"][:, 0].any()  # the background unit writes nothing
    assert not out["model.mm_projector.2.weight"][:, 13:].any()  # the other hidden units start silent


def test_init_projector_refuses_a_head_of_the_wrong_size(tmp_path: Path) -> None:
    state = {"model.mm_projector.0.weight": torch.zeros(16, 4), "model.mm_projector.0.bias": torch.zeros(16)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    torch.save(nn.Linear(4, 7).state_dict(), tmp_path / "head.pt")
    with pytest.raises(SystemExit, match="7 rows"):
        steps.init_projector(tmp_path, tmp_path / "head.pt")


def test_select_records_keeps_the_asked_kinds_in_order(tmp_path: Path) -> None:
    records = [
        {"id": f"train_{i:05d}-{kind}", "image": f"train_{i:05d}.png"}
        for i in range(3)
        for kind in ("pope", "mme-sqa", "caption", "vqa")
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    steps.select_records(tmp_path, ["pope", "vqa"], tmp_path / "out.json")
    chosen = json.loads((tmp_path / "out.json").read_text())
    assert [r["id"] for r in chosen] == [r["id"] for r in records if r["id"].endswith(("-pope", "-vqa"))]
    with pytest.raises(SystemExit, match="no counting records"):
        steps.select_records(tmp_path, ["pope", "counting"], tmp_path / "out.json")


def test_select_records_per_image_merges_an_images_turns_behind_one_image_token(tmp_path: Path) -> None:
    def record(i: int, kind: str, questions: list[str]) -> dict:
        turns = []
        for q in questions:
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": f"answer to {q}"}]
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        return {"id": f"train_{i:05d}-{kind}", "image": f"train_{i:05d}.png", "conversations": turns}

    records = [
        record(0, "pope", ["p0a", "p0b"]),
        record(0, "caption", ["c0"]),
        record(0, "vqa", ["v0"]),
        record(1, "pope", ["p1"]),
        record(1, "vqa", ["v1a", "v1b"]),
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    steps.select_records(tmp_path, ["pope", "vqa"], tmp_path / "out.json", per_image=True)
    merged = json.loads((tmp_path / "out.json").read_text())
    assert [(r["id"], r["image"]) for r in merged] == [
        ("train_00000-pope+vqa", "train_00000.png"),
        ("train_00001-pope+vqa", "train_00001.png"),
    ]
    humans = [[t["value"] for t in r["conversations"] if t["from"] == "human"] for r in merged]
    assert humans == [["<image>\np0a", "p0b", "v0"], ["<image>\np1", "v1a", "v1b"]]
    answers = [t["value"] for t in merged[1]["conversations"] if t["from"] == "gpt"]
    assert answers == ["answer to p1", "answer to v1a", "answer to v1b"]
