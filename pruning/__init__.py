"""Model-agnostic pruning algorithms (torch only; never imports llava): stage 1 visual token pruning, stage 2 KV
eviction, their shared config. See docs/method.md."""

from pruning.config import PruningConfig, PruningConfigError, add_pruning_args, pruning_overrides, resolve_pruning
from pruning.h2o import enable_kv_eviction
from pruning.inflection import inflection_point, keep_count, split_objective
from pruning.kv_cache import KVEvictionCache, kv_budget
from pruning.scoring import cls_patch_scores
from pruning.strategies import KeepDecision, StrategyResult, apply_strategy, get_strategy, register_strategy
from pruning.visual import VisualSelection, raster_order_indices, select_visual_tokens

__all__ = [
    "KVEvictionCache",
    "KeepDecision",
    "PruningConfig",
    "PruningConfigError",
    "StrategyResult",
    "VisualSelection",
    "add_pruning_args",
    "apply_strategy",
    "cls_patch_scores",
    "enable_kv_eviction",
    "get_strategy",
    "inflection_point",
    "keep_count",
    "kv_budget",
    "pruning_overrides",
    "raster_order_indices",
    "register_strategy",
    "resolve_pruning",
    "select_visual_tokens",
    "split_objective",
]
