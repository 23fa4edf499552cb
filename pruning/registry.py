"""One registry for every token-reduction method, in two families.

- **vision side** (selector ``visual_pruning``): decides which visual features reach the projector
  (contract: ``pruning.visual``; today's CLS-score keep rules are the simple case, ``pruning.strategies``);
- **LLM side**, acting inside the language model, with two selectors that a run may combine with a vision-side
  method: ``kv_pruning`` (a KV-cache policy while generating, e.g. H2O) and ``llm_pruning`` (token dropping between
  decoder layers at prefill, e.g. FastV); contracts in ``pruning.llm``.

A method is one registered function or class plus the parameters it declares (``Param``). Everything else is
derived from what is registered: the config object and its validation (``pruning.config.PruningConfig``), the
command-line flags and their ``--help`` (``add_arguments``), and the method table in docs/method.md
(``python -m pruning.method_table``). Parameter names form one flat namespace (they are the keys of the ``pruning``
section in ``config.json``); methods share a parameter by listing the same ``Param`` object.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

NONE = "none"  # every selector has it: the method that changes nothing


class PruningConfigError(ValueError):
    """A pruning setting that is unknown, out of range or inconsistent; the message names the key and its flag."""


# ---- parameters ---------------------------------------------------------------------------------------------------
Check = Callable[[Any], "str | None"]  # what is wrong with a value ("must be >= 1"), or None


def at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"must be >= {low}"


def in_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Check:
    """low <= value <= high, either end open; the message writes the interval as (0, 1]."""
    text = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def check(value: float) -> str | None:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return None if above and below else f"must be in {text}"

    return check


_TYPES = (int, float, str, bool)
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Param:
    """One setting of a method: a key of the ``pruning`` config section and (unless ``flag=""``) a CLI flag.

    ``check`` gets a value of the right type and returns what is wrong with it, or None; ``choices`` restricts a
    ``str`` parameter; ``optional`` allows None ("unset"). ``flag`` defaults to ``--`` + name with dashes;
    ``aliases`` are further flags that set the same key (an old name kept working), named nowhere else.
    """

    name: str
    type: type
    default: Any
    help: str
    check: Check | None = None
    choices: tuple[str, ...] | None = None
    optional: bool = False
    flag: str | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"parameter name {self.name!r} must be lower-case letters, digits and underscores")
        if self.type not in _TYPES:
            raise ValueError(f"parameter {self.name!r}: type must be one of int, float, str, bool, got {self.type}")
        if self.flag and not self.flag.startswith("--"):
            raise ValueError(f"parameter {self.name!r}: flag {self.flag!r} must start with '--'")
        if self.aliases and self.cli_flag is None:
            raise ValueError(f"parameter {self.name!r}: a config-only key (flag='') takes no aliases")
        for alias in self.aliases:
            if not alias.startswith("--") or alias == self.cli_flag:
                raise ValueError(
                    f"parameter {self.name!r}: alias {alias!r} must start with '--' and differ from the flag"
                )
        self.validate(self.default)  # a default that fails its own check is a bug of the method

    @property
    def cli_flag(self) -> str | None:
        if self.flag == "":
            return None
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def cli_flags(self) -> tuple[str, ...]:
        """The flag and its aliases (empty for a config-only key)."""
        return () if self.cli_flag is None else (self.cli_flag, *self.aliases)

    def validate(self, value: Any) -> None:
        """Raise ``PruningConfigError`` naming the key and its flag: "alpha must be in (0, 1], got 0.0 (--alpha)"."""
        if value is None:
            if self.optional:
                return
            self._fail("must be set", value)
        if not _has_type(value, self.type):
            self._fail(f"must be {_TYPE_WORDS[self.type]}", value)
        if self.choices is not None and value not in self.choices:
            self._fail(f"must be one of {', '.join(self.choices)}", value)
        problem = self.check(value) if self.check is not None else None
        if problem:
            self._fail(problem, value)

    def _fail(self, problem: str, value: Any) -> None:
        flag = f" ({self.cli_flag})" if self.cli_flag else ""
        raise PruningConfigError(f"{self.name} {problem}, got {value!r}{flag}")

    def describe_default(self) -> str:
        return "unset" if self.default is None else str(self.default)


_TYPE_WORDS = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}


def _has_type(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


# ---- families and selectors ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selector:
    """A config key that chooses one method: ``visual_pruning``, ``kv_pruning``, ``llm_pruning``."""

    key: str
    family: str
    label: str  # describe(): "visual=longtail(...)"
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


FAMILIES = {
    "vision": "vision-side reducers: decide which visual features reach the projector",
    "llm": "LLM-side reducers: act inside the language model",
}
SELECTORS = (
    Selector("visual_pruning", "vision", "visual", "vision-side method (stage 1; 'longtail' is the paper's)"),
    Selector("kv_pruning", "llm", "kv", "KV-cache policy while generating (stage 2; 'h2o' is the paper's)"),
    Selector("llm_pruning", "llm", "llm", "token dropping between LLM decoder layers at prefill"),
)
_SELECTOR = {selector.key: selector for selector in SELECTORS}


@dataclass(frozen=True)
class Method:
    """A registered method. ``implementation`` follows its selector's contract (pruning.visual / pruning.llm).

    ``check(config)`` runs only while the method is selected (cross-parameter rules, e.g. "topk needs visual_topk");
    ``detail(config)`` is the text inside the parentheses of ``PruningConfig.describe()``.
    """

    selector: str
    name: str
    implementation: Any
    params: tuple[Param, ...]
    description: str
    check: Callable[[Any], None] | None = None
    detail: Callable[[Any], str] | None = None
    reads_text: bool = True  # vision side: reads the question per image (False: repeated images are encoded once)

    def describe(self, config: Any) -> str:
        if self.detail is not None:
            return self.detail(config)
        return ", ".join(f"{p.name}={getattr(config, p.name)}" for p in self.params)


_METHODS: dict[str, dict[str, Method]] = {selector.key: {} for selector in SELECTORS}
_PARAMS: dict[str, Param] = {}


def selector(key: str) -> Selector:
    if key not in _SELECTOR:
        raise KeyError(f"unknown selector {key!r}; selectors are {', '.join(_SELECTOR)}")
    return _SELECTOR[key]


def register(
    selector_key: str,
    name: str,
    implementation: Any,
    *,
    params: Sequence[Param] = (),
    description: str,
    check: Callable[[Any], None] | None = None,
    detail: Callable[[Any], str] | None = None,
    reads_text: bool = True,
) -> Method:
    """Add a method; its parameters join the config, the flags, ``--help`` and the docs table."""
    methods = _METHODS[selector(selector_key).key]
    if not _NAME.match(name):
        raise ValueError(f"method name {name!r} must be lower-case letters, digits and underscores")
    if name in methods:
        raise ValueError(f"{selector_key} method {name!r} is registered twice")
    params = tuple(params)
    for param in params:
        _check_new_param(param, f"{selector_key} method {name!r}")
    description = " ".join(description.split())
    method = Method(selector_key, name, implementation, params, description, check, detail, reads_text)
    methods[name] = method
    for param in params:
        _PARAMS.setdefault(param.name, param)
    return method


def method_decorator(selector_key: str, name: str, **options: Any) -> Callable[[Any], Any]:
    """``@method_decorator("kv_pruning", "h2o", params=..., description=...)`` on a function or class."""

    def add(implementation: Any) -> Any:
        register(selector_key, name, implementation, **options)
        return implementation

    return add


def unregister(selector_key: str, name: str) -> None:
    """Remove a method and the parameters no other method uses (for tests and interactive sessions)."""
    method = _METHODS[selector(selector_key).key].pop(name)
    used = {p.name for methods in _METHODS.values() for m in methods.values() for p in m.params}
    for param in method.params:
        if param.name not in used:
            _PARAMS.pop(param.name, None)


def _check_new_param(param: Param, owner: str) -> None:
    if param.name in _SELECTOR:
        raise ValueError(f"{owner}: parameter {param.name!r} is a selector key")
    known = _PARAMS.get(param.name)
    if known is not None and known != param:
        raise ValueError(
            f"{owner}: parameter {param.name!r} is already declared differently by another method; to share it, "
            "list the same Param object"
        )
    taken = {flag: p.name for p in _PARAMS.values() for flag in p.cli_flags} | {s.flag: s.key for s in SELECTORS}
    for flag in param.cli_flags:
        if taken.get(flag, param.name) != param.name:
            raise ValueError(f"{owner}: flag {flag} of parameter {param.name!r} already belongs to {taken[flag]!r}")


# ---- lookups --------------------------------------------------------------------------------------------------------
def methods(selector_key: str) -> tuple[Method, ...]:
    """Registered methods of one selector, 'none' last."""
    registered = _METHODS[selector(selector_key).key].values()
    return tuple(sorted(registered, key=lambda m: m.name == NONE))


def names(selector_key: str) -> tuple[str, ...]:
    return tuple(m.name for m in methods(selector_key))


def get(selector_key: str, name: str) -> Method:
    registered = _METHODS[selector(selector_key).key]
    if name not in registered:
        raise PruningConfigError(f"unknown {selector_key} {name!r}; choose one of {', '.join(names(selector_key))}")
    return registered[name]


def parameters() -> dict[str, Param]:
    """Every registered parameter by name, selector by selector."""
    return {p.name: p for sel in SELECTORS for p in _params_of(sel.key)}


def defaults() -> dict[str, Any]:
    """The config with nothing chosen: every selector 'none', every parameter at its default."""
    values: dict[str, Any] = {}
    for sel in SELECTORS:
        values[sel.key] = NONE
        for param in _params_of(sel.key):
            values[param.name] = param.default
    return values


def _params_of(selector_key: str) -> list[Param]:
    seen: dict[str, Param] = {}
    for method in methods(selector_key):
        for param in method.params:
            seen.setdefault(param.name, param)
    return list(seen.values())


def users(param_name: str) -> list[Method]:
    return [m for sel in SELECTORS for m in methods(sel.key) if any(p.name == param_name for p in m.params)]


def validate(values: dict[str, Any]) -> None:
    """Selectors name registered methods and every parameter passes its own check (``check_chosen`` adds the chosen
    methods' cross-parameter rules)."""
    for sel in SELECTORS:
        get(sel.key, values[sel.key])
    for name, param in _PARAMS.items():
        param.validate(values[name])


def check_chosen(config: Any) -> None:
    for sel in SELECTORS:
        method = get(sel.key, getattr(config, sel.key))
        if method.check is not None:
            method.check(config)


# ---- command line -------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Per selector: a group with the selector flag, then per method a group with its description and its own
    flags; flags several methods read get a group of their own, before the first of them. Every flag defaults to
    None, meaning "keep what the checkpoint's config.json says"."""
    for family, title in FAMILIES.items():
        for sel in (s for s in SELECTORS if s.family == family):
            group = parser.add_argument_group(
                f"{sel.flag}: {title}", "default: the checkpoint's config.json 'pruning' section, else 'none'"
            )
            group.add_argument(sel.flag, dest=sel.key, default=None, choices=names(sel.key), help=sel.help)
            readers = {p.name: [m.name for m in users(p.name) if m.selector == sel.key] for p in _params_of(sel.key)}
            introduced: set[str] = set()
            for method in methods(sel.key):
                shared = [p for p in method.params if len(readers[p.name]) > 1 and p.cli_flag]
                new_shared = [p for p in shared if p.name not in introduced]
                for names_ in dict.fromkeys(tuple(readers[p.name]) for p in new_shared):
                    params = [p for p in new_shared if tuple(readers[p.name]) == names_]
                    shared_group = parser.add_argument_group(f"{sel.flag} {', '.join(names_)}", "shared flags")
                    for param in params:
                        shared_group.add_argument(
                            *param.cli_flags, dest=param.name, default=None, **_argparse_kwargs(param)
                        )
                introduced.update(p.name for p in method.params)
                text = method.description
                if shared:
                    text += f" Also reads: {', '.join(p.cli_flag for p in shared)}."
                method_group = parser.add_argument_group(f"{sel.flag} {method.name}", text)
                for param in method.params:
                    if param.cli_flag and param not in shared:
                        method_group.add_argument(
                            *param.cli_flags, dest=param.name, default=None, **_argparse_kwargs(param)
                        )
    return parser


def _argparse_kwargs(param: Param) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"help": f"{param.help} (default {param.describe_default()})"}
    if param.choices is not None:
        kwargs["choices"] = param.choices
    kwargs["type"] = _parse_bool if param.type is bool else param.type
    if param.type is bool:
        kwargs["metavar"] = "{true,false}"
    return kwargs


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The pruning flags the user actually set (their config keys)."""
    keys = [sel.key for sel in SELECTORS] + [name for name, p in _PARAMS.items() if p.cli_flag]
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}


# ---- documentation ------------------------------------------------------------------------------------------------
def markdown_tables() -> str:
    """The method table and the parameter table of docs/method.md, exactly as ``python -m pruning.method_table``
    prints them."""
    lines = ["| family | selector | method | what it does | parameters |", "|---|---|---|---|---|"]
    for sel in SELECTORS:
        for method in methods(sel.key):
            flags = ", ".join(f"`{p.cli_flag or p.name}`" for p in method.params) or "-"
            lines.append(f"| {sel.family} | `{sel.flag}` | `{method.name}` | {method.description} | {flags} |")
    lines += ["", "| flag | config key | type | default | used by | meaning |", "|---|---|---|---|---|---|"]
    for param in (p for sel in SELECTORS for p in _params_of(sel.key)):
        name = param.name
        flag = ", ".join(f"`{f}`" for f in param.cli_flags) or "(config only)"
        kind = param.type.__name__ + (" or unset" if param.optional else "")
        if param.choices:
            kind = " / ".join(f"`{c}`" for c in param.choices)
        used_by = ", ".join(f"`{m.name}`" for m in users(name))
        lines.append(f"| {flag} | `{name}` | {kind} | {param.describe_default()} | {used_by} | {param.help} |")
    return "\n".join(lines) + "\n"
