"""One configuration object for every token-reduction method, derived from the method registry.

It lives in the model config under the key ``pruning`` (absent = everything off), round-trips through
``config.json``, and can be overridden from every command line with the flags added by ``add_pruning_args``. Its
keys are the three selectors (``visual_pruning``, ``kv_pruning``, ``llm_pruning``) and every parameter the registered
methods declare (pruning/registry.py); registering a method adds its keys and flags, nothing here changes.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from pruning import registry
from pruning.registry import PruningConfigError

__all__ = ["PruningConfig", "PruningConfigError", "add_pruning_args", "pruning_overrides", "resolve_pruning"]


class PruningConfig:
    """Immutable settings: ``config.alpha``, ``config.visual_pruning``, ... for every registered key.

    Construction checks everything and raises ``PruningConfigError`` naming the key (and its flag): an unknown key or
    method, a value of the wrong type or out of range, and the chosen methods' own cross-parameter rules.
    """

    __slots__ = ("_values",)

    def __init__(self, **values: Any) -> None:
        known = registry.defaults()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise PruningConfigError(f"unknown pruning keys {unknown}; known keys are {sorted(known)}")
        object.__setattr__(self, "_values", MappingProxyType({**known, **values}))
        self.validate()

    # ---- checks -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        registry.validate(dict(self._values))
        registry.check_chosen(self)

    # ---- attribute access ------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"PruningConfig has no setting {name!r}; registered keys: {', '.join(values)}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"PruningConfig is immutable; use config.merged({name}=...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PruningConfig) and dict(self._values) == dict(other._values)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        return "PruningConfig(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def __reduce__(self) -> tuple:
        return (_rebuild, (dict(self._values),))

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._values))

    # ---- views ---------------------------------------------------------------------------------------------
    @property
    def visual_enabled(self) -> bool:
        return self.visual_pruning != registry.NONE

    @property
    def kv_enabled(self) -> bool:
        return self.kv_pruning != registry.NONE

    @property
    def llm_enabled(self) -> bool:
        return self.llm_pruning != registry.NONE

    def method(self, selector_key: str) -> registry.Method:
        """The registered method chosen for ``selector_key`` ('visual_pruning', 'kv_pruning', 'llm_pruning')."""
        return registry.get(selector_key, self._values[selector_key])

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | PruningConfig | None, source: str = "config") -> PruningConfig:
        """Build from a ``pruning`` section; any error names ``source`` (e.g. the config.json it came from)."""
        if data is None:
            return cls()
        if isinstance(data, PruningConfig):
            return data
        if not isinstance(data, Mapping):
            raise PruningConfigError(f"{source}: 'pruning' must be a mapping, got {type(data).__name__}")
        try:
            return cls(**data)
        except PruningConfigError as err:
            raise PruningConfigError(f"{source}: {err}") from None

    def merged(self, **overrides: Any) -> PruningConfig:
        """A copy with the non-None overrides applied (None means 'keep')."""
        return PruningConfig(**{**self._values, **{k: v for k, v in overrides.items() if v is not None}})

    def describe(self) -> str:
        """Short human label, e.g. for table rows and logs: ``visual=longtail(alpha=0.24, layer 16), kv=h2o(...)``."""
        parts = []
        for sel in registry.SELECTORS:
            name = self._values[sel.key]
            if name != registry.NONE:
                parts.append(f"{sel.label}={name}({registry.get(sel.key, name).describe(self)})")
        return ", ".join(parts) or "no pruning"


def _rebuild(values: dict[str, Any]) -> PruningConfig:
    return PruningConfig(**values)


# ---- command line -----------------------------------------------------------------------------------------
def add_pruning_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every registered method's flags, grouped by family and method (see ``registry.add_arguments``)."""
    return registry.add_arguments(parser)


def pruning_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The pruning flags the user actually set."""
    return registry.overrides(args)


def resolve_pruning(base: PruningConfig | dict | None, overrides: dict[str, Any] | None = None) -> PruningConfig:
    """Checkpoint config (or None) plus explicit overrides, validated as a whole."""
    config = PruningConfig.from_dict(base)
    return config.merged(**(overrides or {}))
