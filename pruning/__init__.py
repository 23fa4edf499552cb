"""Model-agnostic token-reduction methods (torch only; never imports llava), in one registry with two families:
vision side (pruning/visual.py; stage 1's keep rules in pruning/strategies.py, other papers' methods in
pruning/baselines/) and LLM side (pruning/llm.py; stage 2's KV eviction in pruning/kv_cache.py + pruning/h2o.py).
Importing the package registers the built-in methods. See docs/method.md, docs/architecture.md, docs/baselines.md.
"""

from pruning import baselines, h2o, llm_methods, strategies  # noqa: F401  (registers the built-in methods)
from pruning.config import PruningConfig, PruningConfigError, add_pruning_args, pruning_overrides, resolve_pruning
from pruning.h2o import enable_kv_eviction
from pruning.inflection import inflection_point, keep_count, split_objective
from pruning.kv_cache import KVEvictionCache, kv_budget
from pruning.llm import (
    KVCachePolicy,
    LayerDropper,
    LayerView,
    drop_tokens,
    register_kv_method,
    register_llm_method,
)
from pruning.registry import Param
from pruning.scoring import cls_patch_scores
from pruning.strategies import KeepDecision, StrategyResult, apply_strategy, register_keep_rule
from pruning.visual import (
    ReducedPatches,
    VisionContext,
    VisualSelection,
    raster_order_indices,
    register_vision_method,
    select_visual_tokens,
)

__all__ = [
    "KVCachePolicy",
    "KVEvictionCache",
    "KeepDecision",
    "LayerDropper",
    "LayerView",
    "Param",
    "PruningConfig",
    "PruningConfigError",
    "ReducedPatches",
    "StrategyResult",
    "VisionContext",
    "VisualSelection",
    "add_pruning_args",
    "apply_strategy",
    "cls_patch_scores",
    "drop_tokens",
    "enable_kv_eviction",
    "inflection_point",
    "keep_count",
    "kv_budget",
    "pruning_overrides",
    "raster_order_indices",
    "register_keep_rule",
    "register_kv_method",
    "register_llm_method",
    "register_vision_method",
    "resolve_pruning",
    "select_visual_tokens",
    "split_objective",
]
