"""What produced an answers file: the run record written next to it before the first answer.

``answers/ckpt.jsonl`` gets ``answers/ckpt.run.json``: the model (path as given, resolved folder, a fingerprint of
its config and weight files), the base, the vision tower, the resolved pruning config (every parameter, the
checkpoint's defaults applied), the conversation template, the decoding settings, the benchmark's own options and
the code version. A run that resumes an answers file must have the same settings (code version aside, see
``COMPARED``); otherwise it stops and names the differences, and ``--overwrite`` starts afresh. Scorers copy the
record into their result JSON, which is what ``eval.tables`` matches its ``model`` / ``config`` keys against.

The record is a plain JSON file: scorers (``eval/``) read it without importing this module. Its name comes from
``eval.common.run_record_path``, the one definition both sides use.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from eval.common import run_record_path

# Settings that change the answers. The code version and the batch size are recorded but not compared: resuming
# after a bug fix or with another batch size is allowed (greedy answers do not depend on the batch size).
COMPARED = (
    "benchmark",
    "model",
    "model_fingerprint",
    "model_base",
    "vision_tower",
    "conv_mode",
    "generation",
    "pruning",
    "options",
)
# Files whose names and sizes make up a checkpoint's fingerprint (with config.json's bytes).
_FINGERPRINT_SUFFIXES = (".bin", ".safetensors", ".json", ".model")


class RunRecordError(ValueError):
    """An answers file whose run record is missing, unreadable or different from this run's settings."""


def resolved_location(path: str | None) -> str | None:
    """An absolute path for a local folder (so a run from another directory compares equal); hub ids as given."""
    if path is None:
        return None
    expanded = Path(os.path.expanduser(path))
    return str(expanded.resolve()) if expanded.exists() else path


def folder_fingerprint(path: str | None) -> str | None:
    """sha256 over config.json's bytes and the names and sizes of the weight, tokenizer and config files: a
    checkpoint retrained in place gets a new fingerprint. None for a hub id (its revision is pinned by the hub)."""
    if path is None:
        return None
    folder = Path(os.path.expanduser(path))
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.suffix in _FINGERPRINT_SUFFIXES:
            digest.update(f"{file.name}:{file.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def code_version() -> str:
    """The package version, plus ``git describe --always --dirty`` when run from a git checkout."""
    try:
        text = version("llava-longtail")
    except PackageNotFoundError:
        text = "unknown"
    repo = Path(__file__).resolve().parents[2]
    if (repo / ".git").exists():
        described = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        )
        if described.returncode == 0 and described.stdout.strip():
            text += f"+git.{described.stdout.strip()}"
    return text


def build_record(
    *,
    benchmark: str,
    model_path: str,
    model_base: str | None,
    vision_tower: str | None,
    conv_mode: str,
    generation: dict[str, Any],
    pruning: dict[str, Any],
    options: dict[str, Any],
    question_file: str,
    batch_size: int,
) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "model_path": model_path,
        "model": resolved_location(model_path),
        "model_fingerprint": folder_fingerprint(model_path),
        "model_base": resolved_location(model_base),
        "vision_tower": resolved_location(vision_tower),
        "conv_mode": conv_mode,
        "generation": dict(generation),
        "pruning": dict(pruning),
        "options": dict(options),
        "question_file": question_file,
        "batch_size": batch_size,
        "code_version": code_version(),
    }


def read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunRecordError(
            f"{path}: the run record is not readable JSON ({err}); delete it or pass --overwrite"
        ) from None
    if not isinstance(record, dict):
        raise RunRecordError(f"{path}: the run record is not a JSON object; delete it or pass --overwrite")
    return record


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Written whole (temporary file, then rename), so a crash never leaves half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def with_pruning_defaults(pruning: Any) -> Any:
    """A recorded pruning config with every parameter registered since filled in at its default, so a record written
    before a method or parameter existed (e.g. ``llm_pruning``) still matches a run that leaves it at its default."""
    from pruning import PruningConfig, PruningConfigError

    if not isinstance(pruning, dict):
        return pruning
    try:
        return PruningConfig.from_dict(pruning, source="run record").to_dict()
    except PruningConfigError:
        return pruning  # a parameter since removed: compared as written


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``name: old -> new`` for every compared setting that differs (nested mappings key by key)."""
    found = []
    for key in COMPARED:
        before, after = old.get(key), new.get(key)
        if key == "pruning" and before != after:  # equal as written: equal with defaults (and no import of torch)
            before, after = with_pruning_defaults(before), with_pruning_defaults(after)
        if isinstance(before, dict) and isinstance(after, dict):
            for sub in sorted(set(before) | set(after)):
                if before.get(sub) != after.get(sub):
                    found.append(f"{key}.{sub}: {before.get(sub)!r} -> {after.get(sub)!r}")
        elif before != after:
            found.append(f"{key}: {before!r} -> {after!r}")
    return found


def check_resume(answers_file: Path, record: dict[str, Any]) -> None:
    """Refuse to add answers under other settings to an answers file that already holds answers."""
    path = run_record_path(answers_file)
    old = read_record(path)
    if old is None:
        raise RunRecordError(
            f"{answers_file} holds answers but no run record ({path.name}), so its settings are unknown (written by "
            "an older version or copied without it): pass --overwrite to answer afresh, or use another --answers-file"
        )
    changed = differences(old, record)
    if changed:
        raise RunRecordError(
            f"{answers_file} was written with other settings ({path}); resuming would mix two runs. "
            f"Differences (recorded -> now): {'; '.join(changed)}. Pass --overwrite to answer afresh with the new "
            "settings, or choose another --answers-file (e.g. another CKPT name)"
        )


def merge_records(records: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """One record for answers merged from chunks: the chunks' compared settings must agree."""
    if not records:
        raise RunRecordError("no chunk run records to merge")
    first_path, first = records[0]
    for path, record in records[1:]:
        changed = differences(first, record)
        if changed:
            raise RunRecordError(
                f"chunks {first_path} and {path} were answered with different settings: {'; '.join(changed)}"
            )
    merged = dict(first)
    merged["chunks"] = len(records)
    versions = sorted({str(record.get("code_version")) for _, record in records})
    merged["code_version"] = versions[0] if len(versions) == 1 else versions
    return merged
