"""pruning.calibrate: distributions per keep rule, the alpha that reaches a target mean count; and the command,
python -m eval.tools.calibrate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from eval.tools.calibrate import image_names, main
from pruning.calibrate import alpha_for_mean, alpha_for_target, calibrate, distribution, kept_counts
from pruning.config import PruningConfig
from pruning.inflection import inflection_point, longtail_keep


def curves(batch: int = 12, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Long-tail curves whose heads have different lengths (2..13 large scores per row)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, n, generator=generator) * 0.01
    for row in range(batch):
        head = 2 + row
        scores[row, torch.randperm(n, generator=generator)[:head]] += 1.0
    return scores


def test_distribution_of_known_values() -> None:
    stats = distribution(torch.tensor([1, 2, 3, 4, 5]))
    assert stats["mean"] == 3 and stats["median"] == 3 and stats["min"] == 1 and stats["max"] == 5
    with pytest.raises(ValueError, match="empty"):
        distribution(torch.tensor([]))


def test_alpha_for_mean_reaches_a_reachable_target() -> None:
    scores = curves()
    config = PruningConfig(visual_pruning="longtail")
    target = 30.0
    alpha, reached = alpha_for_mean(scores, target, config)
    assert reached == pytest.approx(
        kept_counts(scores, PruningConfig(visual_pruning="longtail", alpha=alpha)).double().mean().item()
    )
    # no other alpha on a fine grid gets closer to the target
    grid = [a / 1000 for a in range(1, 1001)]
    best = min(
        abs(kept_counts(scores, PruningConfig(visual_pruning="longtail", alpha=a)).double().mean().item() - target)
        for a in grid
    )
    assert abs(reached - target) <= best + 1e-9
    # k = ceil(i*/alpha) by hand
    inflection = inflection_point(scores)
    by_hand = torch.tensor([min(64, math.ceil(i / alpha - 1e-9)) for i in inflection.tolist()], dtype=torch.float64)
    assert by_hand.mean().item() == pytest.approx(reached)


def scan_the_grid(mean_kept, target: float, decimals: int) -> float:
    """The reference: every alpha of the grid from 1 down, kept when strictly closer (so the largest on ties)."""
    best, best_gap = 1.0, math.inf
    for step in range(10**decimals, 0, -1):
        gap = abs(mean_kept(step / 10**decimals) - target)
        if gap < best_gap - 1e-9:
            best, best_gap = step / 10**decimals, gap
    return best


@pytest.mark.parametrize("seed", range(6))
def test_alpha_for_target_equals_a_scan_of_the_grid(seed: int) -> None:
    """Both directions, reachable and unreachable targets, ties between the steps either side of the target."""
    generator = torch.Generator().manual_seed(seed)
    inflection = torch.randint(1, 40, (int(torch.randint(1, 9, (1,), generator=generator)),), generator=generator)
    images = len(inflection)

    def longtail(alpha: float) -> float:  # non-increasing in alpha
        return float(longtail_keep(inflection, 64, alpha).sum()) / images

    def literal(alpha: float) -> float:  # non-decreasing in alpha: the alpha_times reading
        return float(torch.ceil(inflection * alpha - 1e-9).clamp(1, 64).sum()) / images

    for target in (0.5, 3.0, float(inflection.float().mean()), 17.5, 30.0, 63.0, 200.0):
        assert alpha_for_target(longtail, target, decimals=3) == scan_the_grid(longtail, target, 3), target
        assert alpha_for_target(literal, target, grows=True, decimals=3) == scan_the_grid(literal, target, 3), target
    scores = curves(batch=5, seed=seed)

    def mean(alpha: float) -> float:
        return kept_counts(scores, PruningConfig(visual_pruning="longtail", alpha=alpha)).double().mean().item()

    assert alpha_for_mean(scores, 12.0, PruningConfig(), decimals=3)[0] == scan_the_grid(mean, 12.0, 3)
    with pytest.raises(ValueError, match="target mean count must be > 0"):
        alpha_for_target(longtail, 0)


def test_literal_rule_grows_with_alpha() -> None:
    scores = curves()
    config = PruningConfig(visual_pruning="longtail")
    alpha, reached = alpha_for_mean(scores, 4.0, config, rule="alpha_times")
    assert 0 < alpha <= 1 and abs(reached - 4.0) < 1.5
    with pytest.raises(ValueError, match="alpha only drives"):
        alpha_for_mean(scores, 4.0, config, rule="topk")


def test_report_rules_and_topk_at_the_same_mean() -> None:
    scores = curves()
    report = calibrate(scores, inflection_point(scores), PruningConfig(visual_pruning="longtail", alpha=0.24))
    assert report["target_count"] == pytest.approx(127 * 64 / 576)
    kept = report["kept"]
    longtail_mean = kept["longtail (alpha=0.24)"]["mean"]
    topk = next(name for name in kept if name.startswith("topk"))
    assert kept[topk]["mean"] == round(longtail_mean) and kept[topk]["std"] == 0
    assert kept["none"]["mean"] == 64
    assert report["inflection"]["min"] >= 2


def test_image_names_reads_both_formats(tmp_path: Path) -> None:
    lines = tmp_path / "q.jsonl"
    lines.write_text(
        '{"question_id": 1, "image": "a.png"}\n{"question_id": 2, "image": "a.png"}\n{"question_id": 3, "image": "b.png"}\n'
    )
    listing = tmp_path / "q.json"
    listing.write_text(json.dumps([{"id": "x", "image": "b.png"}, {"id": "y"}]))
    assert image_names(lines) == ["a.png", "b.png"]
    assert image_names(listing) == ["b.png"]
    listing.write_text(json.dumps([{"id": "y"}]))
    with pytest.raises(ValueError, match="no record names an image"):
        image_names(listing)


def test_command_on_a_tiny_checkpoint(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from llava.testing.tiny_llava import write_tiny_llava

    model = write_tiny_llava(tmp_path / "tiny", seed=0)
    folder = tmp_path / "images"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(3):
        pixels = (torch.rand(112, 112, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "".join(json.dumps({"question_id": i, "image": f"{i}.png", "text": "?"}) + "\n" for i in range(3))
    )
    out = tmp_path / "calibration.json"
    report = main(
        [
            "--model-path",
            str(model),
            "--question-file",
            str(questions),
            "--image-folder",
            str(folder),
            "--device",
            "cpu",
            "--target-count",
            "10",
            "--output-json",
            str(out),
        ]
    )
    assert report["images"] == 3 and report["n"] == 64
    assert json.loads(out.read_text())["alpha_for_target"] == report["alpha_for_target"]
    assert "i*" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="images missing"):
        main(["--model-path", str(model), "--question-file", str(questions), "--image-folder", str(tmp_path)])


def test_object_concentration_counts_overlapping_patches() -> None:
    from pruning.calibrate import object_concentration, patches_on_objects

    mask = torch.zeros(8, 8, dtype=torch.uint8)
    mask[1:3, 1:3] = 1  # lies inside patch 0 of a 2x2 grid of 4x4 patches
    mask[4, 7] = 2  # one pixel in patch 3
    assert patches_on_objects(mask, 2).tolist() == [True, False, False, True]
    cover = 5 / 64
    found = object_concentration([torch.tensor([0, 1, -1])], [mask], 2)
    assert found["kept_on_objects"] == 0.5 and found["object_cover"] == pytest.approx(cover)
    assert found["concentration"] == pytest.approx(0.5 / cover) and found["mean_kept"] == 2
    with pytest.raises(ValueError, match="patch grid"):
        patches_on_objects(torch.zeros(9, 8), 2)
