"""The LLaVA tokenizer: upstream's slow sentencepiece LlamaTokenizer, rebuilt on transformers 5.

Upstream LLaVA-1.5 tokenised with the slow `LlamaTokenizer` (`legacy: false` in the released configs). transformers 5
maps `LlamaTokenizer` to a `tokenizers` BPE whose ids differ from sentencepiece on some inputs (runs of spaces, for
one), which silently changes prompts and shifts the training masks. `LlavaLlamaTokenizer` keeps the slow semantics:
special tokens written in the text become their ids and every other piece of text is what the checkpoint's own
`tokenizer.model` encodes.

Loading needs no protobuf module: transformers switches the model's dummy prefix off through sentencepiece's
generated `sentencepiece_model_pb2`, which refuses to import when the protobuf runtime is older than the protoc that
generated it (sentencepiece 0.2.3: gencode 7.36.1, so any protobuf 6.x, e.g. the one wandb 0.25 pins, fails with
`VersionError`). `without_dummy_prefix` makes the same one-field edit on the protobuf wire format itself.
"""

from __future__ import annotations

import importlib
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
        # legacy=True here keeps the parent away from the protobuf module; the dummy prefix is switched off below.
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            legacy=True,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            sp_model_kwargs=sp_model_kwargs or {},
            special_tokens_pattern=pattern,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            **kwargs,
        )
        self.legacy = legacy
        self.init_kwargs["legacy"] = legacy
        if not legacy:
            self.sp_model.LoadFromSerializedProto(without_dummy_prefix(self.sp_model.serialized_model_proto()))
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


# protobuf wire format: a tag is varint(field_number << 3 | wire_type)
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_NORMALIZER_SPEC = 3  # ModelProto.normalizer_spec (sentencepiece_model.proto)
_ADD_DUMMY_PREFIX = 3  # NormalizerSpec.add_dummy_prefix, a bool


def without_dummy_prefix(model_proto: bytes) -> bytes:
    """A serialized sentencepiece ModelProto with `normalizer_spec.add_dummy_prefix = false`, other fields as they were.

    What transformers does through the generated protobuf module (parse, set the field, serialize), done on the wire:
    every `add_dummy_prefix` inside `normalizer_spec` is dropped and one `false` appended (a message field that occurs
    twice is merged when parsed, and the last value of a scalar wins).
    """
    fields = _wire_fields(model_proto, "tokenizer.model")
    specs = [i for i, field in enumerate(fields) if field[0] == _NORMALIZER_SPEC]
    if not specs:
        fields.append((_NORMALIZER_SPEC, _LENGTH_DELIMITED, b""))
        specs = [len(fields) - 1]
    for index in specs:
        number, wire_type, payload = fields[index]
        if wire_type != _LENGTH_DELIMITED:
            raise ValueError(f"tokenizer.model: normalizer_spec has wire type {wire_type}, expected a message")
        inner = [f for f in _wire_fields(payload, "tokenizer.model normalizer_spec") if f[0] != _ADD_DUMMY_PREFIX]
        if index == specs[-1]:
            inner.append((_ADD_DUMMY_PREFIX, _VARINT, _varint(0)))
        fields[index] = (number, wire_type, b"".join(_encode_field(*f) for f in inner))
    return b"".join(_encode_field(*f) for f in fields)


def _wire_fields(data: bytes, what: str) -> list[tuple[int, int, bytes]]:
    """(field number, wire type, payload) in order; a varint's payload is its encoded bytes, a message's its body."""
    fields, position = [], 0
    while position < len(data):
        tag, position = _read_varint(data, position, what)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == _VARINT:
            _, end = _read_varint(data, position, what)
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _read_varint(data, position, what)
            end = position + length
        elif wire_type in (_FIXED64, _FIXED32):
            end = position + (8 if wire_type == _FIXED64 else 4)
        else:
            raise ValueError(f"{what}: unsupported protobuf wire type {wire_type} (field {number})")
        if end > len(data):
            raise ValueError(f"{what}: truncated protobuf data (field {number})")
        fields.append((number, wire_type, data[position:end]))
        position = end
    return fields


def _read_varint(data: bytes, position: int, what: str) -> tuple[int, int]:
    value = shift = 0
    while position < len(data):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    raise ValueError(f"{what}: truncated protobuf varint")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _encode_field(number: int, wire_type: int, payload: bytes) -> bytes:
    length = _varint(len(payload)) if wire_type == _LENGTH_DELIMITED else b""
    return _varint(number << 3 | wire_type) + length + payload


def load_tokenizer(
    path: str | os.PathLike,
    model_max_length: int | None = None,
    padding_side: str = "right",
    use_fast: bool | None = None,
) -> PreTrainedTokenizerBase:
    """Load a checkpoint's tokenizer with the ids upstream LLaVA trained and evaluated with.

    `use_fast=True` returns transformers' own `tokenizers`-backed LlamaTokenizer instead; its ids can differ from
    upstream's (see the module docstring), so it is only there for comparison. Unlike the default, it needs a
    protobuf runtime that can import sentencepiece's generated module (transformers converts the model with it). The pad token is whatever the
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

        _check_converter_protobuf(folder)
        return LlamaTokenizer.from_pretrained(str(folder), **overrides)
    config = _read_json(folder / TOKENIZER_CONFIG)
    if "legacy" not in config:
        logger.warning(
            "%s has no 'legacy' key: tokenizing with legacy=True, as upstream's slow LlamaTokenizer did",
            folder / TOKENIZER_CONFIG,
        )
    return LlavaLlamaTokenizer.from_pretrained(str(folder), **overrides)


def _check_converter_protobuf(folder: Path) -> None:
    """transformers' converter reads tokenizer.model through sentencepiece's generated protobuf module; when that
    module cannot load, transformers falls through to an unrelated tiktoken error, so say what is wrong here."""
    try:
        importlib.import_module("sentencepiece.sentencepiece_model_pb2")
    except Exception as err:  # ImportError, or protobuf's VersionError for a runtime older than the gencode
        raise ImportError(
            f"load_tokenizer({str(folder)!r}, use_fast=True) needs sentencepiece's protobuf module, which does not "
            f"load here: {err}. The default tokenizer (use_fast=False) needs no protobuf; or install a protobuf "
            "runtime at least as new as the one sentencepiece was generated with"
        ) from err


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
