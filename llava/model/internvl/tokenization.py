"""InternVL2-1B's tokenizer: Qwen2's byte-level BPE from the release's slow-tokenizer files, its special tokens.

The release ships the files of transformers 4's slow ``Qwen2Tokenizer`` (``vocab.json``, ``merges.txt``,
``added_tokens.json``, ``tokenizer_config.json``). transformers 5's ``Qwen2Tokenizer`` builds the same BPE from
them (NFC, the Qwen2 split regex, byte-level alphabet, the merges in rank order) with the special tokens at the
release's ids, and encodes like the slow class (tests/test_internvl2_tokenizer.py compares both on tricky text).

``write_bpe_tokenizer`` writes such files for tiny test checkpoints: a byte-level BPE trained on the spot, the
release's 12 special tokens after the vocabulary in the release's order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerBase, Qwen2Tokenizer

from llava.model.internvl.configuration_internvl_chat import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

# InternVL2-1B's added tokens, in id order from 151643 (<|endoftext|>) to 151654 (</box>)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    IMG_START_TOKEN,
    IMG_END_TOKEN,
    IMG_CONTEXT_TOKEN,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)
# Qwen2's pre-tokenizer split (tokenization_qwen2.py, slow and fast)
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
VOCAB_FILES = ("vocab.json", "merges.txt")


class TokenizerFilesError(OSError):
    """The checkpoint's tokenizer files are missing or lack InternVL's image tokens; the message names them."""


def load_internvl_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's Qwen2 tokenizer; its files and the image tokens are checked first, naming what is missing."""
    missing = [name for name in VOCAB_FILES if not (folder / name).is_file()]
    if missing and not (folder / "tokenizer.json").is_file():
        raise TokenizerFilesError(
            f"InternVL checkpoint {folder} has no tokenizer: missing {', '.join(missing)} (or tokenizer.json)"
        )
    config_file = folder / "tokenizer_config.json"
    declared = (
        json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class") if config_file.is_file() else None
    )
    if declared not in (None, "Qwen2Tokenizer", "Qwen2TokenizerFast"):
        raise TokenizerFilesError(f"{config_file}: tokenizer_class {declared!r} is not InternVL2-1B's Qwen2Tokenizer")
    # the class itself, not AutoTokenizer: that would read config.json's auto_map and ask to run remote code
    tokenizer = Qwen2Tokenizer.from_pretrained(str(folder))
    unknown = [
        t for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, "<|im_end|>") if t not in tokenizer.get_vocab()
    ]
    if unknown:
        raise TokenizerFilesError(
            f"{folder}: the tokenizer has no {', '.join(unknown)} token(s); InternVL2's tokenizer adds them in "
            "added_tokens.json / tokenizer_config.json"
        )
    return tokenizer


def write_bpe_tokenizer(out: Path, corpus: Iterable[str], vocab_size: int = 400, model_max_length: int = 8192) -> int:
    """Train a byte-level BPE with Qwen2's pre-tokenizer on ``corpus`` and write the release's slow-tokenizer files
    into ``out``. Returns the total number of tokens (vocabulary + special tokens), the LM's vocab_size."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(list(corpus), trainer)
    out.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(out))  # vocab.json + merges.txt
    base = len(json.loads((out / "vocab.json").read_text(encoding="utf-8")))
    added = {token: base + i for i, token in enumerate(SPECIAL_TOKENS)}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": token, **entry} for token, i in added.items()},
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return base + len(SPECIAL_TOKENS)
