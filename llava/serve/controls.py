"""The web demo's pruning controls, read off the method registry (pruning/registry.py).

One control per selector (a method dropdown) and one per parameter that has a command-line flag, shown only while a
method that reads it is chosen. A method registered later (another paper's, or one of the user's own, imported
before the server starts) appears here with its parameters and nothing in the page changes. This module knows no
web framework: it says what to draw, and turns the values a page sends back into a checked ``PruningConfig``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pruning import PruningConfig, registry

# Parameters drawn as a slider instead of a number box: (low, high, step). The paper's alpha is the one people tune.
SLIDERS: dict[str, tuple[float, float, float]] = {"alpha": (0.01, 1.0, 0.01)}


@dataclass(frozen=True)
class Control:
    """What the page draws for one config key.

    ``kind``: "method" (a selector's dropdown), "slider", "number", "checkbox", "dropdown" (a parameter with
    choices) or "text". ``used_by``: (selector, method) pairs whose choice shows the control (empty for selectors).
    """

    key: str
    kind: str
    label: str
    info: str
    default: Any
    choices: tuple[str, ...] = ()
    used_by: tuple[tuple[str, str], ...] = ()
    integer: bool = False
    optional: bool = False
    bounds: tuple[float, float, float] | None = None

    @property
    def elem_id(self) -> str:
        """A stable id for the page element (and for tests): ``control-visual-pruning``, ``control-alpha``."""
        return "control-" + self.key.replace("_", "-")

    def visible_for(self, chosen: Mapping[str, str]) -> bool:
        """Whether the control is shown when ``chosen`` maps each selector key to its chosen method."""
        return not self.used_by or any(chosen.get(selector) == method for selector, method in self.used_by)


def selector_controls(initial: PruningConfig) -> list[Control]:
    """One method dropdown per selector, starting at ``initial``'s choice."""
    controls = []
    for sel in registry.SELECTORS:
        controls.append(
            Control(
                key=sel.key,
                kind="method",
                label=f"{sel.flag}",
                info=sel.help,
                default=getattr(initial, sel.key),
                choices=registry.names(sel.key),
            )
        )
    return controls


def parameter_controls(initial: PruningConfig) -> list[Control]:
    """One control per registered parameter that has a flag, in the registry's order, starting at ``initial``'s
    value. Config-only keys (``seed``) keep the checkpoint's value."""
    controls = []
    values = initial.to_dict()  # a method registered after ``initial`` was built starts at its default
    for name, param in registry.parameters().items():
        if param.cli_flag is None:
            continue
        used_by = tuple((m.selector, m.name) for m in registry.users(name))
        info = f"{param.help} (default {param.describe_default()}; used by {', '.join(m for _, m in used_by)})"
        if param.optional:
            info += "; empty = unset"
        kind = "number"
        if param.type is bool:
            kind = "checkbox"
        elif param.choices:
            kind = "dropdown"
        elif param.type is str:
            kind = "text"
        elif name in SLIDERS:
            kind = "slider"
        controls.append(
            Control(
                key=name,
                kind=kind,
                label=param.cli_flag,
                info=info,
                default=values.get(name, param.default),
                choices=tuple(param.choices or ()),
                used_by=used_by,
                integer=param.type is int,
                optional=param.optional,
                bounds=SLIDERS.get(name),
            )
        )
    return controls


def method_summary(selector_key: str, name: str) -> str:
    """One line for the page under a selector's dropdown: the chosen method's description."""
    return f"`{name}`: {registry.get(selector_key, name).description}"


def config_from_values(base: PruningConfig, controls: list[Control], values: list[Any]) -> PruningConfig:
    """The pruning config a page's control values ask for: ``base`` (the checkpoint's) with every selector set and
    the parameters of the chosen methods replaced; the parameters of methods not chosen keep ``base``'s values, so
    a value left in a hidden box cannot fail the run. Raises ``PruningConfigError`` naming the key and its flag."""
    if len(values) != len(controls):
        raise ValueError(f"got {len(values)} control values for {len(controls)} controls")
    given = {control.key: _normalise(control, value) for control, value in zip(controls, values)}
    chosen = {c.key: given[c.key] for c in controls if c.kind == "method"}
    settings = base.to_dict()
    settings.update(chosen)
    for control in controls:
        if control.kind != "method" and control.visible_for(chosen):
            settings[control.key] = given[control.key]
    return PruningConfig(**settings)  # not merged(): an emptied optional box means unset, not "keep"


def unpruned(config: PruningConfig) -> PruningConfig:
    """The same settings with every selector off: the comparison run."""
    return PruningConfig(**{**config.to_dict(), **{sel.key: registry.NONE for sel in registry.SELECTORS}})


def _normalise(control: Control, value: Any) -> Any:
    """Page values as the config wants them: number boxes send floats, text boxes strings (an optional number is
    typed into a text box: empty means unset)."""
    if isinstance(value, str) and control.kind in ("number", "slider"):
        value = value.strip() or None
        if value is not None:
            try:
                value = float(value)
            except ValueError:
                raise registry.PruningConfigError(
                    f"{control.key} must be a number, got {value!r} ({control.label})"
                ) from None
    if value is None or (isinstance(value, str) and not value.strip() and control.kind == "text"):
        return None
    if control.integer and isinstance(value, float):
        if not value.is_integer():
            raise registry.PruningConfigError(f"{control.key} must be an integer, got {value!r} ({control.label})")
        return int(value)
    return value
