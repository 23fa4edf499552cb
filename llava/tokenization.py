"""The LLaVA tokenizer: upstream's slow sentencepiece LlamaTokenizer, rebuilt on transformers 5.

Upstream LLaVA-1.5 tokenised with the slow `LlamaTokenizer` (`legacy: false` in the released configs). transformers 5
maps `LlamaTokenizer` to a `tokenizers` BPE whose ids differ from sentencepiece on some inputs (runs of spaces, for
one), which silently changes prompts and shifts the training masks. `LlavaLlamaTokenizer` keeps the slow semantics:
special tokens written in the text become their ids and every other piece of text is what the checkpoint's own
`tokenizer.model` encodes.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizerBase
from transformers.tokenization_utils_base import AddedToken
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

logger = logging.getLogger(__name__)

SPIECE_UNDERLINE = "▁"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
DEFAULT_MODEL_MAX_LENGTH = 2048


class LlavaLlamaTokenizer(SentencePieceBackend):
    """Slow-LlamaTokenizer semantics over the checkpoint's sentencepiece model.

    With `legacy=False` a chunk of text gets one dummy-prefix space at its start (as sentencepiece itself adds),
    and text that follows a special token gets none: with Llama-2, `"</s>USER"` is `[</s>, USER]`, not
    `[</s>, ▁US, ER]`.
    `legacy=True` (what upstream did when a config had no `legacy` key) encodes every piece with a dummy prefix.
    """

    vocab_files_names = {"vocab_file": TOKENIZER_MODEL}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str | AddedToken = "<unk>",
        bos_token: str | AddedToken = "<s>",
        eos_token: str | AddedToken = "</s>",
        pad_token: str | AddedToken | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: bool = True,
        clean_up_tokenization_spaces: bool = False,
        sp_model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        pattern = {(True, False): "bos", (False, True): "eos", (True, True): "bos_eos"}.get(
            (add_bos_token, add_eos_token), "none"
        )
        kwargs.pop("special_tokens_pattern", None)
        kwargs.pop("add_prefix_space", None)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            legacy=legacy,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            sp_model_kwargs=sp_model_kwargs or {},
            special_tokens_pattern=pattern,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            **kwargs,
        )
        self._unk_piece_count = len(self.sp_model.encode(str(self.unk_token)))

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        # The dummy prefix goes on the whole chunk, before special tokens split it, so only its first piece gets it.
        tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp_model.encode(text, out_type=str)
        # sentencepiece may drop leading whitespace of its input; an unk prefix pins it, whatever the version.
        tokens = self.sp_model.encode(self.unk_token + text, out_type=str)
        return tokens[self._unk_piece_count :]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Decode through sentencepiece so byte-fallback pieces become characters again."""
        if not tokens:
            return ""
        tokens = list(tokens)
        if not self.legacy and tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]  # the dummy prefix tokenize() added
        special = set(self.all_special_tokens)
        out, run = [], []
        for token in tokens:
            if token in special:
                out.append(self.sp_model.decode_pieces(run) + token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode_pieces(run))
        return "".join(out)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        """Write the released-checkpoint layout so upstream LLaVA and `load_tokenizer` both read it back."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_path = Path(save_directory) / TOKENIZER_CONFIG
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for load_time_only in ("backend", "is_local", "local_files_only"):
            config.pop(load_time_only, None)
        config.update(
            tokenizer_class="LlamaTokenizer",
            add_bos_token=self.add_bos_token,
            add_eos_token=self.add_eos_token,
            legacy=self.legacy,
        )
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _write_special_tokens_map(Path(save_directory), pad_token=self.pad_token)
        return tuple(files)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["_sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        proto = state.pop("_sp_model_proto")
        self.__dict__.update(state)
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.LoadFromSerializedProto(proto)


def load_tokenizer(
    path: str | os.PathLike,
    model_max_length: int | None = None,
    padding_side: str = "right",
    use_fast: bool | None = None,
) -> PreTrainedTokenizerBase:
    """Load a checkpoint's tokenizer with the ids upstream LLaVA trained and evaluated with.

    `use_fast=True` returns transformers' own `tokenizers`-backed LlamaTokenizer instead; its ids can differ from
    upstream's (see the module docstring), so it is only there for comparison. The pad token is whatever the
    checkpoint's files say (none for the released LLaVA-1.5 configs); callers that batch set it (upstream: unk).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist (expected a checkpoint directory)")
    if not (folder / TOKENIZER_MODEL).is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(
            f"no {TOKENIZER_MODEL} in {str(folder)!r}: LLaVA checkpoints carry the sentencepiece model there "
            f"(found: {', '.join(found) or 'nothing'})"
        )
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    overrides: dict[str, Any] = {"padding_side": padding_side, "local_files_only": True}
    if model_max_length is not None:
        overrides["model_max_length"] = model_max_length
    if use_fast:
        from transformers import LlamaTokenizer

        return LlamaTokenizer.from_pretrained(str(folder), **overrides)
    config = _read_json(folder / TOKENIZER_CONFIG)
    if "legacy" not in config:
        logger.warning(
            "%s has no 'legacy' key: tokenizing with legacy=True, as upstream's slow LlamaTokenizer did",
            folder / TOKENIZER_CONFIG,
        )
    return LlavaLlamaTokenizer.from_pretrained(str(folder), **overrides)


def train_sentencepiece(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 1000,
    model_type: str = "bpe",
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    seed: int = 0,
) -> Path:
    """Train a tiny Llama-like sentencepiece model and write it as a released LLaVA checkpoint's tokenizer files.

    Tests use it in place of the real Llama tokenizer: same special ids (unk 0, bos 1, eos 2), byte fallback for any
    character, dummy prefix, whitespace kept as is. `vocab_size` is an upper bound on a small corpus; read the real
    size from the loaded tokenizer. Returns `out_dir`.
    """
    sentences = [t for t in texts if t.strip()]
    if not sentences:
        raise ValueError("train_sentencepiece needs at least one non-blank text")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    (out / TOKENIZER_MODEL).write_bytes(model.getvalue())
    _write_tokenizer_config(out, model_max_length)
    _write_special_tokens_map(out, pad_token=None)
    return out


def _added_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _write_tokenizer_config(out: Path, model_max_length: int) -> None:
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", **_added_token("<s>")},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", **_added_token("</s>")},
        "legacy": False,
        "model_max_length": model_max_length,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": {"__type": "AddedToken", **_added_token("<unk>")},
    }
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _write_special_tokens_map(out: Path, pad_token: str | None) -> None:
    tokens: dict[str, Any] = {name: _added_token(text) for name, text in [("bos_token", "<s>"), ("eos_token", "</s>")]}
    tokens["unk_token"] = _added_token("<unk>")
    if pad_token is not None:
        tokens["pad_token"] = pad_token
    (out / SPECIAL_TOKENS_MAP).write_text(json.dumps(tokens, indent=2) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
