"""The inflection point i* (paper eq. 2-3) and the keep rule k = min(n, max(min_keep, ceil(i*/alpha)))."""

import math

import pytest
import torch

from pruning.inflection import inflection_point, keep_count, split_objective

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def loop_inflection(values: list[float]) -> int:
    """Eq. 3 straight from the paper, one i at a time, in Python floats."""
    d = sorted(values, reverse=True)
    n = len(d)
    if d[0] == d[-1]:
        return n
    best_i, best = 1, -math.inf
    for i in range(1, n):
        value = (n - i) * (d[0] - d[i - 1])
        if value > best:
            best_i, best = i, value
    return best_i


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        # steep head: (n-i)(d1-di) = 0, 6*1, 5*9, 4*9.1, 3*9.2, 2*9.3, 1*9.4 -> i* = 3
        ([10.0, 9.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5], 3),
        # gentle linear decay 4,3,2,1,0: (5-i)(i-1) = 0, 3, 4, 3 -> i* = 3, the middle
        ([4.0, 3.0, 2.0, 1.0, 0.0], 3),
        # two steps 1,1,1,0,0,0: 0, 0, 0, 2*1, 1*1 -> i* = 4, the first tail element
        ([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], 4),
        # ties in f: d = 2,1,0,0 gives f(2) = 2*1 = f(3) = 1*2 -> the smallest i wins
        ([2.0, 1.0, 0.0, 0.0], 2),
        # n = 2: only i = 1 is a candidate
        ([0.3, 0.7], 1),
        # flat: no head, keep everything -> reported as n
        ([0.2, 0.2, 0.2, 0.2, 0.2], 5),
        # a single patch
        ([0.4], 1),
    ],
)
def test_hand_computed_curves(scores: list[float], expected: int) -> None:
    assert loop_inflection(scores) == expected
    unsorted = torch.tensor(scores)[torch.randperm(len(scores), generator=torch.Generator().manual_seed(0))]
    result = inflection_point(unsorted)
    assert result.dtype == torch.int64 and result.shape == ()
    assert int(result) == expected


def test_scores_need_not_be_sorted_and_scale_does_not_matter() -> None:
    scores = torch.tensor([0.6, 9.0, 0.5, 1.0, 10.0, 0.9, 0.8, 0.7])
    assert int(inflection_point(scores)) == 3
    assert int(inflection_point(scores * 1000 - 7)) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_random_curves_match_the_direct_loop(device: str) -> None:
    generator = torch.Generator().manual_seed(1)
    for n in (2, 3, 7, 64, 576):
        uniform = torch.rand(8, n, generator=generator)
        long_tail = torch.softmax(torch.randn(8, n, generator=generator) * 3, dim=-1)
        coarse = torch.randint(0, 4, (8, n), generator=generator).float()  # many exact ties
        for batch in (uniform, long_tail, coarse):
            result = inflection_point(batch.to(device)).cpu()
            assert result.shape == (8,)
            assert result.tolist() == [loop_inflection(row.tolist()) for row in batch]


def test_leading_batch_shape_is_kept() -> None:
    scores = torch.rand(2, 3, 10, generator=torch.Generator().manual_seed(2))
    result = inflection_point(scores)
    assert result.shape == (2, 3)
    assert result.flatten().tolist() == [loop_inflection(row.tolist()) for row in scores.reshape(6, 10)]


def test_split_objective_is_eq_2() -> None:
    f = split_objective(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert f.dtype == torch.float64
    # (n - i)(d1 - di) / (d1 - dn) for i = 1..4 with d = 4,3,2,1,0
    assert f.tolist() == [0.0, 3 / 4, 4 / 4, 3 / 4]
    assert split_objective(torch.full((2, 4), 0.5)).tolist() == [[0.0] * 3, [0.0] * 3]
    scores = torch.rand(4, 50, generator=torch.Generator().manual_seed(3))
    assert (split_objective(scores).argmax(-1) + 1).tolist() == inflection_point(scores).tolist()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_raise(bad: float) -> None:
    scores = torch.tensor([[0.5, 0.2, 0.1], [0.4, bad, 0.1]])
    name = "NaN" if math.isnan(bad) else "inf"
    with pytest.raises(ValueError, match=name):
        inflection_point(scores)
    with pytest.raises(ValueError, match=name):
        keep_count(scores)
    with pytest.raises(ValueError, match=name):
        split_objective(scores)


def test_bad_shapes_and_types_raise() -> None:
    with pytest.raises(ValueError, match=r"n >= 1"):
        inflection_point(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="floating-point"):
        inflection_point(torch.tensor([3, 2, 1]))


def test_keep_count_scales_i_star_by_one_over_alpha() -> None:
    # two steps: 5 high then 35 low -> i* = 6 (the first low one); 6 / 0.24 = 25 exactly in decimal, and binary
    # rounding (25.000000000000004) must not turn it into 26.
    scores = torch.tensor([1.0] * 5 + [0.0] * 35)
    assert int(inflection_point(scores)) == 6
    assert int(keep_count(scores, alpha=0.24)) == 25
    assert int(keep_count(scores, alpha=0.5)) == 12
    assert int(keep_count(scores, alpha=0.1)) == 40  # capped at n
    assert int(keep_count(scores, alpha=1.0, min_keep=10)) == 10
    assert int(keep_count(scores, alpha=1.0, min_keep=100)) == 40  # min_keep never exceeds n


def test_keep_count_edges() -> None:
    assert int(keep_count(torch.tensor([0.3, 0.7]))) == 2  # n = 2: ceil(1 / 0.24) = 5 -> 2
    assert int(keep_count(torch.full((9,), 0.1))) == 9  # flat -> all
    batch = torch.rand(16, 576, generator=torch.Generator().manual_seed(4))
    k = keep_count(batch, alpha=0.24)
    assert k.dtype == torch.int64
    expected = [min(576, max(1, math.ceil(loop_inflection(row.tolist()) / 0.24 - 1e-9))) for row in batch]
    assert k.tolist() == expected
    with pytest.raises(ValueError, match="alpha"):
        keep_count(batch, alpha=0.0)
    with pytest.raises(ValueError, match="min_keep"):
        keep_count(batch, min_keep=0)
