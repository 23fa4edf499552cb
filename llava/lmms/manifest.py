"""The ``lmms_eval.models`` entry point (pyproject.toml): lmms-eval calls ``model_manifests`` when it starts.

One model id serves every family ``llava.model.builder.load_pretrained_model`` loads (LLaVA-1.5, LLaVA-1.6, and any
family added to the loader later), so the id names the project, not an architecture. This module must stay cheap to
import: lmms-eval loads every entry point on every run, whatever model it evaluates.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "llava_longtail"


def model_manifests() -> list[ModelManifest]:
    return [ModelManifest(model_id=MODEL_ID, simple_class_path="llava.lmms.model.LongTailLMM")]
