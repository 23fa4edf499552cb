"""P-Sigmoid (Zhao et al., arXiv 2412.00556, Scenario II: "the best accuracy for a budget"): the fraction of visual
tokens kept per decoder layer follows a sigmoid over depth, and Bayesian optimisation (optuna's Gaussian-process
sampler) tunes its parameters on a calibration set for a prefill budget; the best schedule is written as a schedule
file for ``--llm-pruning schedule --schedule FILE``.

    python -m eval.tools.psigmoid --flops-ratio 0.5 --out output/schedules/psigmoid-50.json   # the demo model
    python -m eval.tools.psigmoid --mean-tokens 144 --model-path P --benchmark pope --data-dir DIR --out s.json
    python -m eval.tools.psigmoid --flops-ratio 0.3 --visual-pruning longtail --out s.json  # on top of stage 1

The family (x = l / (L - 1), the depth of layer l in [0, 1]; layer 0 keeps everything)::

    r_l = floor + (1 - floor) / (1 + exp(steepness * (x - centre)))       l = 1 .. L-1

G-Search's schedules fall like this: everything kept in the shallow layers, a steep fall, a small tail. The budget is
met by construction: for each (steepness, floor) the optimiser proposes, the centre is the largest whose schedule
costs at most the budget (bisection; the cost grows with the centre), so every schedule tried is within the budget
and the optimiser searches two parameters. The budget is the prefill FLOPs relative to the unpruned model
(``--flops-ratio``, by ``eval.roofline``'s per-layer count on the calibration samples' own token counts) or the mean
number of visual tokens entering a decoder layer (``--mean-tokens``). ``--seed`` makes the search reproducible.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from eval.tools.gsearch import (
    PrefillCost,
    SampleTokens,
    add_calibration_args,
    mean_visual_tokens,
    open_calibration,
    provenance,
    run_search,
    schedule_config,
)
from llava.utils import run_entry_point
from pruning.llm_methods.schedule import Schedule, write_schedule

STEEPNESS = (2.0, 60.0)  # per unit of depth: from a gentle slope to a step between two layers of a 32-layer model
CENTRE = (-3.0, 3.0)  # in units of depth; beyond these the sigmoid is flat over the layers
DECIMALS = 4  # fractions as written to the schedule file

Cost = Callable[[Schedule], float]  # the budget quantity of a schedule (FLOPs ratio or mean visual tokens)
Objective = Callable[[tuple[float, ...]], float]  # a schedule -> the calibration metric, higher is better


def p_sigmoid(layers: int, steepness: float, centre: float, floor: float) -> tuple[float, ...]:
    """The schedule (fractions per decoder layer) of the family in the module docstring."""
    if layers < 1:
        raise ValueError(f"a schedule needs at least one decoder layer, got {layers}")
    keep = [1.0]
    for layer in range(1, layers):
        depth = layer / (layers - 1)
        exponent = min(steepness * (depth - centre), 700.0)  # exp overflows past ~709
        keep.append(round(floor + (1 - floor) / (1 + math.exp(exponent)), DECIMALS))
    return tuple(keep)


def fit_centre(layers: int, steepness: float, floor: float, cost: Cost, budget: float) -> float | None:
    """The largest centre in CENTRE whose schedule costs at most ``budget``; None when even the smallest does not."""
    low, high = CENTRE

    def within(centre: float) -> bool:
        return cost(Schedule("fraction", p_sigmoid(layers, steepness, centre, floor))) <= budget

    if not within(low):
        return None
    if within(high):
        return high
    for _ in range(40):  # the interval shrinks below 1e-11
        middle = (low + high) / 2
        low, high = (middle, high) if within(middle) else (low, middle)
    return low


def max_floor(layers: int, cost: Cost, budget: float) -> float:
    """The largest floor the budget allows (every layer after 0 at the floor); ValueError if not even 0 is."""
    floor_only = lambda floor: Schedule("fraction", (1.0,) + (round(floor, DECIMALS),) * (layers - 1))  # noqa: E731
    if cost(floor_only(0.0)) > budget:
        raise ValueError(
            f"the budget {budget:g} is below what any schedule reaches ({cost(floor_only(0.0)):.4g}: layer 0 keeps "
            "every visual token and the later layers none)"
        )
    low, high = 0.0, 1.0
    if cost(floor_only(high)) <= budget:
        return high
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if cost(floor_only(middle)) <= budget else (low, middle)
    return low


@dataclass
class PSigmoidResult:
    keep: tuple[float, ...]
    params: dict[str, float]  # steepness, floor, centre
    metric: float
    cost: float
    trials: list[dict[str, Any]] = field(default_factory=list)  # every trial: params, keep, cost, metric or pruned


def optimise(
    layers: int,
    objective: Objective,
    cost: Cost,
    budget: float,
    *,
    trials: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> PSigmoidResult:
    """Bayesian optimisation of (steepness, floor), the centre fitted to the budget; the best trial's schedule.
    The same seed and objective give the same trials."""
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    top_floor = max_floor(layers, cost, budget)
    scores: dict[tuple[float, ...], float] = {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # half the trials (at most 10, optuna's default) sample at random before the Gaussian process leads
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=max(1, min(10, trials // 2)))
    study = optuna.create_study(direction="maximize", sampler=sampler)

    def trial_value(trial: optuna.Trial) -> float:
        steepness = trial.suggest_float("steepness", *STEEPNESS, log=True)
        floor = trial.suggest_float("floor", 0.0, top_floor)
        centre = fit_centre(layers, steepness, floor, cost, budget)
        if centre is None:
            raise optuna.TrialPruned()  # this shape cannot fall far enough within the range of centres
        keep = p_sigmoid(layers, steepness, centre, floor)
        trial.set_user_attr("centre", centre)
        trial.set_user_attr("keep", list(keep))
        trial.set_user_attr("cost", cost(Schedule("fraction", keep)))
        if keep not in scores:  # the same schedule is not evaluated twice
            scores[keep] = float(objective(keep))
        return scores[keep]

    study.optimize(trial_value, n_trials=trials, show_progress_bar=progress)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise ValueError(f"no trial met the budget {budget:g}; allow more trials or a larger budget")
    best = max(done, key=lambda t: (t.value, -t.user_attrs["cost"]))  # of equal scores, the cheapest
    record = [
        {
            "params": {**t.params, **({"centre": t.user_attrs["centre"]} if "centre" in t.user_attrs else {})},
            "keep": t.user_attrs.get("keep"),
            "cost": t.user_attrs.get("cost"),
            "metric": t.value,
            "state": t.state.name.lower(),
        }
        for t in study.trials
    ]
    params = {**best.params, "centre": best.user_attrs["centre"]}
    return PSigmoidResult(tuple(best.user_attrs["keep"]), params, best.value, best.user_attrs["cost"], record)


def budget_cost(cost: PrefillCost, samples: Sequence[SampleTokens], kind: str) -> Cost:
    """The budget quantity of a schedule on the calibration samples: 'flops' (ratio to the unpruned prefill) or
    'tokens' (mean visual tokens entering a layer)."""
    if kind == "flops":
        return lambda schedule: cost.schedule_ratio(samples, schedule)
    return lambda schedule: mean_visual_tokens(samples, schedule)


# ---- the command ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Optimise and write the schedule; bad input ends with one ``error:`` line (status 2)."""
    return run_entry_point(_main, argv)


def _main(argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibration_args(parser)
    parser.add_argument("--out", required=True, help="the schedule file to write (JSON)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops-ratio", type=float, help="prefill FLOPs at most this fraction of the unpruned model's")
    budget.add_argument("--mean-tokens", type=float, help="visual tokens entering a decoder layer, on average, at most")
    parser.add_argument("--trials", type=int, default=20, help="Bayesian optimisation trials (model evaluations)")
    parser.add_argument("--seed", type=int, default=0, help="the optimiser's seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return run_search(search, args)


def search(args: argparse.Namespace) -> dict[str, Any]:
    kind, budget = ("flops", args.flops_ratio) if args.flops_ratio is not None else ("tokens", args.mean_tokens)
    if not budget > 0 or (kind == "flops" and budget > 1):
        raise ValueError(f"the budget must be in (0, 1] for --flops-ratio and > 0 for --mean-tokens, got {budget}")
    calibration, base = open_calibration(args)
    candidate = Path(args.work_dir) / "psigmoid-candidate.json"
    start = time.perf_counter()
    full = calibration.evaluate(base)  # the token counts the cost is computed from, and the metric to beat
    samples = [SampleTokens.from_stats(t) for t in full.tokens]
    cost = budget_cost(calibration.cost, samples, kind)

    def objective(keep: tuple[float, ...]) -> float:
        return calibration.evaluate(schedule_config(base, keep, candidate)).metric

    print(
        f"P-Sigmoid on {calibration.run.question_file} ({len(calibration.samples)} questions), base {base.describe()}: "
        f"metric {full.metric:.2f} with nothing dropped; budget {kind} <= {budget:g}"
    )
    result = optimise(
        calibration.layers, objective, cost, budget, trials=args.trials, seed=args.seed, progress=not args.no_progress
    )
    seconds = time.perf_counter() - start
    schedule = Schedule("fraction", result.keep)
    report = {
        "method": "psigmoid",
        "paper": "arXiv 2412.00556 (P-Sigmoid)",
        **provenance(args, calibration, base),
        "budget": {kind: budget},
        "params": result.params,
        "seed": args.seed,
        "baseline_metric": full.metric,
        "metric": result.metric,
        "prefill_flops_ratio": calibration.cost.schedule_ratio(samples, schedule),
        "mean_visual_tokens": mean_visual_tokens(samples, schedule),
        "search": {"evaluations": calibration.evaluations, "trials": args.trials, "seconds": round(seconds, 1)},
        "trials": result.trials,
    }
    write_schedule(args.out, "fraction", list(result.keep), **report)
    keep = ", ".join(f"{value:g}" for value in result.keep)
    print(
        f"schedule [{keep}]: metric {result.metric:.2f} (nothing dropped: {full.metric:.2f}), prefill FLOPs "
        f"{100 * report['prefill_flops_ratio']:.1f} % of the unpruned model, {report['mean_visual_tokens']:.1f} visual "
        f"tokens per layer; {calibration.evaluations} evaluations in {seconds:.0f} s\nwrote {args.out}"
    )
    return report


if __name__ == "__main__":
    main()
