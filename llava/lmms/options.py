"""``--model_args`` of the lmms-eval plugin, checked before the model loads.

lmms-eval turns ``--model_args pretrained=P,alpha=0.24,kv_pruning=h2o`` into keyword arguments (``"0.24"`` becomes a
float, ``"true"`` a bool) and adds ``batch_size`` and ``device`` from its own flags. The keys are of two kinds:

- the loader's options (``LOADER_KEYS``: checkpoint, base, template, batch, device, dtype, ...);
- every pruning flag of ``pruning.add_pruning_args``, by its config key (``--visual-pruning`` is ``visual_pruning``).
  The values go through those flags' own parsing, so a method registered later is accepted here with no change.

Anything else is an error naming the key; a pruning value is then checked against the checkpoint's ``pruning``
section by the same check the command-line tools run (``llava.utils.check_before_loading``).
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from pruning import PruningConfig, PruningConfigError, add_pruning_args, pruning_overrides

LOADER_KEYS: dict[str, str] = {
    "pretrained": "checkpoint folder or Hugging Face hub id (required)",
    "model_base": "base LLM of a LoRA or projector-only checkpoint",
    "conv_mode": "conversation template (default: the one upstream evaluated the checkpoint's family with)",
    "batch_size": "requests per generate call, left-padded (lmms-eval's --batch_size; default 1)",
    "device": "cuda, cuda:1, cpu, ... (lmms-eval's --device; default cuda when available, else cpu)",
    "dtype": "float16, bfloat16, float32 or auto (default auto: float16 on a GPU, float32 on the CPU)",
    "vision_tower": "local CLIP folder that replaces the checkpoint's mm_vision_tower (offline machines)",
    "use_flash_attn": "true: flash-attention 2 (the [flash] extra); default false: SDPA",
    "load_8bit": "true: 8-bit weights (bitsandbytes)",
    "load_4bit": "true: 4-bit weights (bitsandbytes)",
    "apply_until": "true: cut each answer at the task's 'until' strings; default false, as lmms-eval's LLaVA wrapper",
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "auto": None}
BOOL_KEYS = ("use_flash_attn", "load_8bit", "load_4bit", "apply_until")


class ModelArgsError(ValueError):
    """A bad ``--model_args`` entry; the message names the key."""

    def __init__(self, message: str) -> None:
        super().__init__(f"--model_args {message}")


@dataclass(frozen=True)
class ModelOptions:
    pretrained: str
    model_base: str | None = None
    conv_mode: str | None = None
    batch_size: int = 1
    device: str = "cpu"
    dtype: torch.dtype | None = None
    vision_tower: str | None = None
    use_flash_attn: bool = False
    load_8bit: bool = False
    load_4bit: bool = False
    apply_until: bool = False
    pruning: dict[str, Any] = field(default_factory=dict)  # only the keys given: the rest is the checkpoint's


class _RaisingParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting (lmms-eval runs us inside its own process)."""

    def error(self, message: str):
        raise ModelArgsError(message)


def pruning_parser() -> argparse.ArgumentParser:
    return add_pruning_args(_RaisingParser(add_help=False, exit_on_error=False))


def pruning_flags(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """{config key: flag} for every pruning flag, e.g. {'visual_pruning': '--visual-pruning', ...}."""
    parser = parser or pruning_parser()
    return {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}


def known_keys() -> list[str]:
    return [*LOADER_KEYS, *pruning_flags()]


def parse_model_args(values: Mapping[str, Any]) -> ModelOptions:
    """Check every key and value; raise ModelArgsError naming the first bad key."""
    parser = pruning_parser()
    flags = pruning_flags(parser)
    unknown = [key for key in values if key not in LOADER_KEYS and key not in flags]
    if unknown:
        raise ModelArgsError(_unknown_message(unknown[0], [*LOADER_KEYS, *flags]))
    if values.get("max_batch_size") is not None:
        raise ModelArgsError("max_batch_size: only batch_size=auto uses it, and this model takes a number")
    if values.get("pretrained") in (None, ""):
        raise ModelArgsError("pretrained: missing; give the checkpoint, e.g. pretrained=liuhaotian/llava-v1.5-7b")
    loader = {key: value for key, value in values.items() if key in LOADER_KEYS}
    options: dict[str, Any] = {}
    for key in ("pretrained", "model_base", "conv_mode", "vision_tower"):
        if loader.get(key) is not None:
            options[key] = _text(key, loader[key])
    for key in BOOL_KEYS:
        if key in loader:
            options[key] = _flag(key, loader[key])
    options["batch_size"] = _batch_size(loader.get("batch_size", 1))
    options["device"] = _device(loader.get("device"))
    options["dtype"] = _dtype(loader.get("dtype", "auto"))
    namespace = argparse.Namespace()
    for key, value in values.items():
        if key in flags:
            try:
                parser.parse_args([flags[key], _flag_text(value)], namespace=namespace)
            except (argparse.ArgumentError, ModelArgsError) as err:
                raise ModelArgsError(f"{key}={value!r}: {err}") from None
    options["pruning"] = pruning_overrides(namespace)
    return ModelOptions(**options)


def check_model_args(options: ModelOptions) -> PruningConfig:
    """What can be checked before loading: the template, the checkpoint's config, the pruning settings resolved
    against it (the same check as run_llava's). Returns the resolved pruning config."""
    from llava.conversation import conv_templates
    from llava.utils import check_before_loading, user_errors

    if options.conv_mode is not None and options.conv_mode not in conv_templates:
        raise ModelArgsError(f"conv_mode={options.conv_mode!r}: unknown; choose one of {', '.join(conv_templates)}")
    args = SimpleNamespace(model_path=options.pretrained, vision_tower=options.vision_tower)
    try:
        return check_before_loading(args, options.pruning)
    except PruningConfigError as err:
        message = str(err)
        named = [key for key, flag in pruning_flags().items() if flag in message and key not in message]
        keys = f" (key {', '.join(named)})" if named else ""
        raise ModelArgsError(f"pruning, with {options.pretrained}'s config.json: {message}{keys}") from None
    except user_errors() as err:
        raise ModelArgsError(f"pretrained={options.pretrained}: {err}") from None


def _unknown_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{key}: unknown key{hint}; the keys are {', '.join(known)}"


def _text(key: str, value: Any) -> str:
    if isinstance(value, bool):
        raise ModelArgsError(f"{key}={value!r}: expected a name or a path")
    return str(value)  # lmms-eval turned e.g. a folder called 7 into the number 7


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ModelArgsError(f"{key}={value!r}: expected true or false")
    return value


def _flag_text(value: Any) -> str:
    """A value lmms-eval already converted, written back as the command line would have it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _batch_size(value: Any) -> int:
    text = str(value)
    if text.startswith("auto"):
        raise ModelArgsError(f"batch_size={text}: automatic batch sizes are not supported; give a number, e.g. 8")
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ModelArgsError(f"batch_size={value!r}: expected an integer >= 1")
    return int(text)


def _device(value: Any) -> str:
    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return str(torch.device(str(value)))
    except RuntimeError as err:
        raise ModelArgsError(f"device={value!r}: {err}") from None


def _dtype(value: Any) -> torch.dtype | None:
    if value not in DTYPES:
        raise ModelArgsError(f"dtype={value!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[value]


@dataclass(frozen=True)
class GenerationSettings:
    """A task's ``generation_kwargs`` as lmms-eval's LLaVA wrapper reads them, with ``do_sample`` honoured."""

    max_new_tokens: int = 1024  # lmms-eval's LLaVA wrapper's default
    temperature: float = 0.0  # > 0 samples (generate_answers' rule)
    top_p: float | None = None
    num_beams: int = 1
    until: tuple[str, ...] = ()

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> GenerationSettings:
        temperature = float(kwargs.get("temperature") or 0.0)
        if kwargs.get("do_sample") is False:
            temperature = 0.0  # e.g. mmvet: temperature 0.2 with do_sample false is greedy
        elif kwargs.get("do_sample") is True and temperature <= 0:
            temperature = 1.0
        until = kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        return cls(
            max_new_tokens=int(kwargs.get("max_new_tokens", cls.max_new_tokens)),
            temperature=temperature,
            top_p=kwargs.get("top_p"),
            num_beams=int(kwargs.get("num_beams", 1)),
            until=until,
        )

    def cut(self, text: str) -> str:
        """The text before the first of the ``until`` strings."""
        for stop in self.until:
            if stop:
                text = text.split(stop)[0]
        return text
