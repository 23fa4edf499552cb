"""InternVL2-1B's tokenizer: transformers 5's Qwen2Tokenizer built from the release's slow-tokenizer files gives the
ids of transformers 4's slow `Qwen2Tokenizer` (what the official code used, `use_fast=False`).

`SlowQwen2` transcribes that class (transformers 4.37 `tokenization_qwen2.py` and the slow base class's handling of
added tokens): NFC on the whole text, split at the added special tokens, the Qwen2 regex, bytes mapped to unicode,
BPE by merge rank.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import regex

from llava.mm_utils import tokenizer_image_token
from llava.model.internvl.conversation import expand_image_tokens, hermes_2_prompt
from llava.model.internvl.tokenization import (
    QWEN2_SPLIT_REGEX,
    SPECIAL_TOKENS,
    load_internvl_tokenizer,
    write_bpe_tokenizer,
)
from llava.testing.tiny_internvl import tokenizer_corpus

TEXTS = [
    "Hello  world\n\n  foo",
    "I'll've THEY'RE don't",
    "<|im_start|>user\n你好，世界<|im_end|><|im_start|>assistant\n",
    "tab\there\r\nand   three spaces   ",
    "   leading spaces",
    "数字123 4567 89.5%",
    "cafe\u0301 vs café",  # NFC composes the first
    "emoji 🙂🙂 and ½",
    "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is this?",
    "A. yes\nB. no\nAnswer with the option's letter from the given choices directly.",
]


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


class SlowQwen2:
    def __init__(self, folder: Path):
        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = []
        for i, line in enumerate((folder / "merges.txt").read_text(encoding="utf-8").splitlines()):
            line = line.strip()
            if (i == 0 and line.startswith("#version:")) or not line:
                continue
            merges.append(tuple(line.split()))
        self.ranks = dict(zip(merges, range(len(merges))))
        self.added = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
        self.byte_encoder = bytes_to_unicode()
        self.pattern = regex.compile(QWEN2_SPLIT_REGEX)

    def bpe(self, token: str) -> list[str]:
        word = tuple(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            bigram = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if bigram not in self.ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
        return list(word)

    def encode(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        split = regex.compile("(" + "|".join(regex.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")")
        ids = []
        for chunk in split.split(text):
            if chunk in self.added:
                ids.append(self.added[chunk])
                continue
            for piece in self.pattern.findall(chunk):
                mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                ids.extend(self.encoder[token] for token in self.bpe(mapped))
        return ids


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen2_tokenizer")
    write_bpe_tokenizer(out, tokenizer_corpus(), vocab_size=400)
    return out


def test_ids_equal_the_slow_qwen2_tokenizer(folder):
    tokenizer = load_internvl_tokenizer(folder)
    slow = SlowQwen2(folder)
    for text in TEXTS:
        assert tokenizer(text).input_ids == slow.encode(text), text
        assert tokenizer.decode(tokenizer(text).input_ids) == unicodedata.normalize("NFC", text)


def test_special_tokens_follow_the_vocabulary_in_release_order(folder):
    tokenizer = load_internvl_tokenizer(folder)
    base = len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(base, base + 12))
    assert tokenizer.bos_token_id is None  # no BOS, as Qwen2
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"
    assert tokenizer.convert_ids_to_tokens(tokenizer.pad_token_id) == "<|endoftext|>"
    assert tokenizer.decode(tokenizer("<img></img>ok").input_ids, skip_special_tokens=True) == "ok"


def test_placeholder_prompt_is_the_official_expansion_with_one_slot(folder):
    """`<image>` -> IMAGE_TOKEN_INDEX chunk by chunk gives the official expanded ids with the `<img>` <IMG_CONTEXT>...
    `</img>` block as one slot (the model puts <img> and </img> back around the image's tokens)."""
    tokenizer = load_internvl_tokenizer(folder)
    prompt = hermes_2_prompt("What is in the image? Answer the question using a single word or phrase.")
    ours = tokenizer_image_token(prompt, tokenizer)
    official = tokenizer(expand_image_tokens(prompt, [3], 256)).input_ids
    start, end = tokenizer.convert_tokens_to_ids("<img>"), tokenizer.convert_tokens_to_ids("</img>")
    first, last = official.index(start), official.index(end)
    assert last - first - 1 == 3 * 256
    assert ours == official[:first] + [-200] + official[last + 1 :]


def test_missing_or_foreign_tokenizer_files_are_named(folder, tmp_path):
    from llava.model.internvl.tokenization import TokenizerFilesError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerFilesError, match="missing vocab.json, merges.txt"):
        load_internvl_tokenizer(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(TokenizerFilesError, match="has no <img>, </img>, <IMG_CONTEXT>, <\\|im_end\\|> token"):
        load_internvl_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(TokenizerFilesError, match="tokenizer_class 'LlamaTokenizer' is not InternVL2-1B's"):
        load_internvl_tokenizer(tmp_path)
