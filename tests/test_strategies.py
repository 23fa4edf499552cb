"""Stage 1 keep rules: the registry, and what each rule keeps."""

import math

import pytest
import torch

from pruning import registry
from pruning.config import PruningConfig, PruningConfigError
from pruning.inflection import inflection_point
from pruning.strategies import KeepDecision, apply_strategy, get_keep_rule, keep_rule_names, register_keep_rule

CONFIGS = [
    PruningConfig(visual_pruning="longtail"),
    PruningConfig(visual_pruning="longtail", alpha=0.5, visual_min_keep=4),
    PruningConfig(visual_pruning="alpha_times"),
    PruningConfig(visual_pruning="topk", visual_topk=3),
    PruningConfig(visual_pruning="topk", visual_topk=10_000),
    PruningConfig(visual_pruning="ratio", visual_ratio=0.3),
    PruningConfig(visual_pruning="ratio", visual_topk=5),
    PruningConfig(visual_pruning="random", visual_ratio=0.25),
    PruningConfig(visual_pruning="random", visual_topk=2),
    PruningConfig(visual_pruning="none"),
]


def long_tail_batch(batch: int, n: int, seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(batch, n, generator=torch.Generator().manual_seed(seed)) * 3, dim=-1)


def test_registry_holds_exactly_the_configurable_names() -> None:
    builtin = {"longtail", "topk", "ratio", "alpha_times", "random"}
    assert builtin <= set(keep_rule_names()) <= set(registry.names("visual_pruning"))
    assert "none" in registry.names("visual_pruning") and "none" not in keep_rule_names()  # the plain path
    for name in keep_rule_names():
        assert PruningConfig(visual_pruning=name, visual_topk=3).visual_pruning == name
    with pytest.raises(PruningConfigError, match="unknown visual_pruning 'bogus'"):
        get_keep_rule("bogus")
    with pytest.raises(PruningConfigError, match="unknown visual_pruning 'bogus'"):
        PruningConfig(visual_pruning="bogus")
    with pytest.raises(ValueError, match="registered twice"):
        register_keep_rule("topk", description="again")(lambda scores, inflection, config, generator: None)


def test_a_new_rule_is_one_function_and_one_name() -> None:
    @register_keep_rule("keep_two", description="Two patches.")
    def keep_two(scores, inflection, config, generator):  # noqa: ANN001, ANN202
        return KeepDecision(torch.full((scores.shape[0],), 2), scores)

    try:
        assert get_keep_rule("keep_two") is keep_two
        assert "keep_two" in keep_rule_names()
        result = apply_strategy(long_tail_batch(2, 9, seed=0), PruningConfig(visual_pruning="keep_two"))
        assert result.keep.tolist() == [2, 2]
    finally:
        registry.unregister("visual_pruning", "keep_two")
    assert "keep_two" not in keep_rule_names()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
@pytest.mark.parametrize("n", [1, 2, 5, 24, 576])
def test_every_rule_keeps_between_one_and_n(config: PruningConfig, n: int) -> None:
    scores = long_tail_batch(6, n, seed=n)
    result = apply_strategy(scores, config)
    assert result.keep.dtype == torch.int64 and result.keep.shape == (6,)
    assert bool((result.keep >= 1).all()) and bool((result.keep <= n).all())
    assert result.ranking.shape == scores.shape
    assert result.inflection.tolist() == inflection_point(scores).tolist()  # logged whatever the rule


def test_longtail_and_alpha_times() -> None:
    scores = long_tail_batch(32, 576, seed=5)
    i_star = inflection_point(scores).tolist()
    longtail = apply_strategy(scores, PruningConfig(visual_pruning="longtail", alpha=0.24)).keep.tolist()
    assert longtail == [min(576, max(1, math.ceil(i / 0.24 - 1e-9))) for i in i_star]
    assert len(set(longtail)) > 1  # dynamic: samples keep different counts
    literal = apply_strategy(scores, PruningConfig(visual_pruning="alpha_times", alpha=0.24)).keep.tolist()
    assert literal == [max(1, math.ceil(0.24 * i - 1e-9)) for i in i_star]
    floor = apply_strategy(scores, PruningConfig(visual_pruning="alpha_times", visual_min_keep=50)).keep
    assert bool((floor >= 50).all())


def test_flat_curve_keeps_everything_under_both_alpha_readings() -> None:
    scores = torch.full((2, 40), 1 / 40)
    for name in ("longtail", "alpha_times"):
        assert apply_strategy(scores, PruningConfig(visual_pruning=name)).keep.tolist() == [40, 40]


def test_fixed_budget_rules() -> None:
    scores = long_tail_batch(3, 10, seed=6)
    assert apply_strategy(scores, PruningConfig(visual_pruning="topk", visual_topk=4)).keep.tolist() == [4] * 3
    assert apply_strategy(scores, PruningConfig(visual_pruning="topk", visual_topk=99)).keep.tolist() == [10] * 3
    # 0.3 * 10 is 3.0000000000000004 in binary; the rule must still keep 3
    assert apply_strategy(scores, PruningConfig(visual_pruning="ratio", visual_ratio=0.3)).keep.tolist() == [3] * 3
    assert apply_strategy(scores, PruningConfig(visual_pruning="ratio", visual_ratio=0.31)).keep.tolist() == [4] * 3
    assert apply_strategy(scores, PruningConfig(visual_pruning="ratio", visual_topk=6)).keep.tolist() == [6] * 3
    assert apply_strategy(scores, PruningConfig(visual_pruning="none")).keep.tolist() == [10] * 3
    for name in ("topk", "ratio", "longtail", "none"):
        config = PruningConfig(visual_pruning=name, visual_topk=4, visual_ratio=0.5)
        assert torch.equal(apply_strategy(scores, config).ranking, scores)  # ranked by the CLS scores


def test_random_is_seeded_and_leaves_the_global_rng_alone() -> None:
    scores = long_tail_batch(4, 576, seed=7)
    config = PruningConfig(visual_pruning="random", visual_ratio=0.25, seed=3)
    state = torch.get_rng_state()
    first = apply_strategy(scores, config)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.keep.tolist() == [144] * 4
    assert not torch.equal(first.ranking, scores)
    assert torch.equal(apply_strategy(scores, config).ranking, first.ranking)  # same seed, same patches
    other_seed = apply_strategy(scores, PruningConfig(visual_pruning="random", visual_ratio=0.25, seed=4))
    assert not torch.equal(other_seed.ranking, first.ranking)
    assert not torch.equal(first.ranking[0], first.ranking[1])  # samples of a batch differ
    generator = torch.Generator().manual_seed(3)
    held = [apply_strategy(scores, config, generator=generator).ranking for _ in range(2)]
    assert torch.equal(held[0], first.ranking)  # a held generator starts where the seed does ...
    assert not torch.equal(held[1], held[0])  # ... and moves on, so later batches get fresh patterns


def test_bad_scores_raise() -> None:
    with pytest.raises(ValueError, match=r"\[batch, n\]"):
        apply_strategy(torch.rand(3), PruningConfig(visual_pruning="longtail"))
    with pytest.raises(ValueError, match="NaN"):
        apply_strategy(torch.tensor([[0.1, float("nan")]]), PruningConfig(visual_pruning="none"))
