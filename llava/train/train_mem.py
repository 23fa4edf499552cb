"""``train`` with FlashAttention-2 (the GPU entry point of the shell scripts, as upstream's train_mem.py)."""

from importlib.util import find_spec

from llava.train.train import run_training


def main() -> None:
    if find_spec("flash_attn") is None:
        raise SystemExit(
            "train_mem.py uses FlashAttention-2: pip install flash-attn --no-build-isolation "
            "(or run llava/train/train.py, which uses PyTorch SDPA attention)"
        )
    run_training(attn_implementation="flash_attention_2")


if __name__ == "__main__":
    main()
