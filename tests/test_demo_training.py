"""Pieces of scripts/train_demo_model.py: the 2-D position start, the per-object loss, the projector start."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
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


def test_init_projector_copies_the_patch_head_into_the_first_rows(tmp_path: Path) -> None:
    state = {"model.mm_projector.0.weight": torch.zeros(16, 4), "model.mm_projector.0.bias": torch.zeros(16)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    head = nn.Linear(4, 13)
    torch.save(head.state_dict(), tmp_path / "head.pt")
    steps.init_projector(tmp_path, tmp_path / "head.pt")
    out = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert torch.equal(out["model.mm_projector.0.weight"][:13], head.weight.detach())
    assert torch.equal(out["model.mm_projector.0.bias"][:13], head.bias.detach())
    assert not out["model.mm_projector.0.weight"][13:].any()
