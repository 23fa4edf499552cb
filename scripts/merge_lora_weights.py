"""Merge a LoRA checkpoint (final folder or any checkpoint-N) into its base: a full LLaVA checkpoint folder.

    python scripts/merge_lora_weights.py --model-path ./checkpoints/llava-v1.5-7b-lora-longtail \\
        --model-base lmsys/vicuna-7b-v1.5 --save-model-path ./checkpoints/llava-v1.5-7b-longtail-merged

The merged folder loads without --model-base and keeps the pruning section it was trained with in config.json. Its
vision tower: when the LoRA run trained it (--unfreeze_mm_vision_tower True) or the base had a tuned one (LLaVA-1.6,
the demo checkpoint), the folder holds those weights under model.vision_tower.* and config.json says
unfreeze_mm_vision_tower: true, so the loader uses them; otherwise (like LLaVA-1.5's releases) it holds none and the
tower is loaded from mm_vision_tower.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llava.model.builder import load_pretrained_model

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def merge(model_path: str, model_base: str, save_path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Load ``model_path`` on top of ``model_base`` (merging the adapter) and save the result to ``save_path``."""
    tokenizer, model, _, _ = load_pretrained_model(model_path, model_base, device="cpu", dtype=dtype)
    out = Path(save_path)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--save-model-path {out} exists and is not empty")
    tuned_tower = bool(getattr(model.config, "unfreeze_mm_vision_tower", False))  # set by the loader
    state = {k: v for k, v in model.state_dict().items() if tuned_tower or ".vision_tower." not in k}
    model.config.use_cache = True
    model.save_pretrained(out, state_dict=state)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="LoRA folder (adapter + non_lora_trainables.bin)")
    parser.add_argument("--model-base", required=True, help="the base LLM it was trained on")
    parser.add_argument("--save-model-path", required=True, help="where to write the merged checkpoint")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="weights' dtype (released: fp16)")
    args = parser.parse_args(argv)
    out = merge(args.model_path, args.model_base, args.save_model_path, DTYPES[args.dtype])
    print(f"merged checkpoint written to {out}")


if __name__ == "__main__":
    main()
