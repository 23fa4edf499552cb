"""Token ids must be what upstream's slow sentencepiece tokenizer produced (design.md, "Tokenizer fidelity").

The reference is built with the `sentencepiece` package alone: split the prompt on `<image>`, split each chunk on
the special tokens written in it, encode the first piece of a chunk with the model's dummy-prefix space and the
pieces after a special token without it, BOS once, -200 between chunks. The model without its dummy prefix is made
with a two-field protobuf schema built at run time (`ModelProto`), so this file imports, and passes, under any protobuf
runtime: `.ci/run` runs it with protobuf 7 and with protobuf 6 (issue #28).
"""

import functools
import importlib
import json
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import tokenizer_image_token
from llava.tokenization import LlavaLlamaTokenizer, load_tokenizer, train_sentencepiece, without_dummy_prefix

LLAMA2_MODEL = Path(__file__).resolve().parents[1].parent / "shared/assets/llama2-tokenizer.model"
SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2}

# The released llava-v1.5 tokenizer_config.json, as the upstream training run saved it.
RELEASED_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False},
    "clean_up_tokenization_spaces": False,
    "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False},
    "legacy": False,
    "model_max_length": 2048,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False},
}  # fmt: skip

WORDS = (
    "cat dog image picture describe what color red blue green the a an of in on is are there many two three "
    "person table chair window answer question single word phrase option letter choices directly"
).split()


def corpus() -> list[str]:
    system = conv_templates["vicuna_v1"].system
    lines = [system, conv_templates["llava_v1"].system]
    for i, word in enumerate(WORDS * 6):
        other = WORDS[(i * 7) % len(WORDS)]
        lines.append(f"USER: {word} {other}?\nAnswer the question using a single word or phrase. ASSISTANT: {word}s")
        lines.append(f"{other}  and  {word} {i} café naïve")
    return lines


def vicuna(*turns: object) -> str:
    conv = conv_templates["vicuna_v1"].copy()
    for i, message in enumerate(turns):
        conv.append_message(conv.roles[i % 2], message)
    return conv.get_prompt()


PROMPTS = [
    vicuna("<image>\nWhat is the color of the cat?\nAnswer the question using a single word or phrase.", None),
    vicuna("Describe this picture <image> in detail.", None),
    vicuna("What is 12 + 345? Answer with digits.", None),
    vicuna("<image>\nWhat is this?", "A cat.", "And the table?", "It is red.", "Where?", None),
    vicuna("这是什么？<image>\n请直接回答选项字母。", "猫", "Café, naïve, résumé, 😀🐱!", None),
    vicuna("Runs  of   spaces    here", "ok  ", "   leading", None),
    vicuna("tabs\tand\nnew\n\nlines\n", None),
    conv_templates["plain"].copy().get_prompt() + "<image>\n",
    "<image>",
    "<image><image>two images",
    "text then </s> after and <s> inside and <unk> too",
    "</s>starts with eos",
    "ends with a space ",
    " ",
    "",
]


def model_proto_class():
    """sentencepiece's ModelProto reduced to normalizer_spec.add_dummy_prefix; other fields survive as unknown fields.

    Built from a descriptor at run time, so no generated module (and no gencode/runtime version check) is involved.
    """
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="llava_test_sp.proto", package="llava_test_sp", syntax="proto2")
    file.message_type.add(name="NormalizerSpec").field.add(
        name="add_dummy_prefix", number=3, type=field.TYPE_BOOL, label=field.LABEL_OPTIONAL
    )
    file.message_type.add(name="ModelProto").field.add(
        name="normalizer_spec",
        number=3,
        type=field.TYPE_MESSAGE,
        type_name=".llava_test_sp.NormalizerSpec",
        label=field.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("llava_test_sp.ModelProto"))


ModelProto = model_proto_class()


@functools.cache
def processors(model_file: Path) -> tuple[spm.SentencePieceProcessor, spm.SentencePieceProcessor]:
    """The model as shipped (dummy prefix on) and the same model with the dummy prefix off."""
    with_prefix = spm.SentencePieceProcessor(model_file=str(model_file))
    proto = ModelProto.FromString(with_prefix.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    without_prefix = spm.SentencePieceProcessor()
    without_prefix.LoadFromSerializedProto(proto.SerializeToString())
    return with_prefix, without_prefix


def sentencepiece_reference(prompt: str, model_file: Path) -> list[int]:
    with_prefix, without_prefix = processors(model_file)
    ids = [SPECIAL_IDS["<s>"]]
    for index, chunk in enumerate(prompt.split("<image>")):
        if index:
            ids.append(IMAGE_TOKEN_INDEX)
        for position, piece in enumerate(re.split("(<unk>|<s>|</s>)", chunk)):
            if piece in SPECIAL_IDS:
                ids.append(SPECIAL_IDS[piece])
            elif piece:
                ids.extend((with_prefix if position == 0 else without_prefix).encode(piece))
    return ids


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    return train_sentencepiece(corpus(), tmp_path_factory.mktemp("tok"), vocab_size=800)


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory) -> Path:
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"real Llama-2 tokenizer not available at {LLAMA2_MODEL}")
    folder = tmp_path_factory.mktemp("llama2")
    shutil.copy(LLAMA2_MODEL, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(RELEASED_CONFIG))
    return folder


@pytest.fixture(params=["trained", "llama2"])
def tokenizer_dir(request) -> Path:
    return request.getfixturevalue(f"{request.param}_dir")


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_tokenizer_image_token_matches_sentencepiece(tokenizer_dir, prompt):
    tokenizer = load_tokenizer(tokenizer_dir)
    assert tokenizer_image_token(prompt, tokenizer) == sentencepiece_reference(
        prompt, tokenizer_dir / "tokenizer.model"
    )


def test_random_strings_match_sentencepiece(tokenizer_dir):
    """Seeded mixtures of words, whitespace runs, special tokens, image tags, non-ASCII and a literal `▁`."""
    atoms = ["cat", " ", "  ", "\n", "\t", "<image>", "</s>", "<s>", "<unk>", "USER:", " ASSISTANT:", "中文", "é",
             "😀", "123", "3.14", "▁", "x", "<", "s>", "</", "  \n ", "\r\n", "...", "'s", "ñ"]  # fmt: skip
    rng = random.Random(0)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = tokenizer_dir / "tokenizer.model"
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        assert tokenizer_image_token(text, tokenizer) == sentencepiece_reference(text, model), repr(text)


def test_known_llama2_ids_around_the_image(llama2_dir):
    """The `▁` (29871) on both sides of the image slot and `<0x0A>` (13) are what LLaVA-1.5 was trained with."""
    tokenizer = load_tokenizer(llama2_dir)
    ids = tokenizer_image_token(vicuna("<image>\nWhat is this?", None), tokenizer)
    slot = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[0] == 1 and ids.count(1) == 1
    assert ids[slot - 4 : slot + 4] == [3148, 1001, 29901, 29871, IMAGE_TOKEN_INDEX, 29871, 13, 5618]
    assert ids[-5:] == [319, 1799, 9047, 13566, 29901]  # " ASSISTANT:"
    # After </s> there is no dummy-prefix space: "USER" is 11889, not "▁US" "ER" (3148, 1001). This is why
    # upstream's preprocess_v1 subtracts one token per later round when legacy is False.
    assert tokenizer("USER: a</s>USER: b").input_ids == [1, 3148, 1001, 29901, 263, 2, 11889, 29901, 289]


def test_return_tensors_pt(trained_dir):
    tokenizer = load_tokenizer(trained_dir)
    ids = tokenizer_image_token("a <image> b", tokenizer, return_tensors="pt")
    assert ids.dtype == torch.long and ids.tolist() == tokenizer_image_token("a <image> b", tokenizer)
    assert ids.tolist().count(IMAGE_TOKEN_INDEX) == 1
    with pytest.raises(ValueError, match="return_tensors"):
        tokenizer_image_token("a", tokenizer, return_tensors="np")


def sentencepiece_protobuf_error() -> str | None:
    """Why sentencepiece's generated protobuf module does not import here (protobuf 6 vs its 7.x gencode), or None."""
    try:
        importlib.import_module("sentencepiece.sentencepiece_model_pb2")
    except Exception as err:  # protobuf's VersionError
        return str(err)
    return None


def test_transformers_default_llama_tokenizer_differs_on_space_runs(tokenizer_dir):
    """transformers 5's `tokenizers` LlamaTokenizer (use_fast=True) drifts from sentencepiece; ours does not."""
    if error := sentencepiece_protobuf_error():
        pytest.skip(f"transformers' converter cannot run with this protobuf runtime: {error}")
    ours = load_tokenizer(tokenizer_dir)
    fast = load_tokenizer(tokenizer_dir, use_fast=True)
    model = tokenizer_dir / "tokenizer.model"
    texts = ["   leading", "x  y   z", "a    b", "USER: a</s>  USER: b", " two"]
    for text in texts:
        assert ours(text).input_ids == sentencepiece_reference(text, model), text
    differing = [t for t in texts if fast(t).input_ids != sentencepiece_reference(t, model)]
    assert differing, "expected transformers' fast LlamaTokenizer to differ from sentencepiece on a run of spaces"


def test_loaded_tokenizer_settings(trained_dir):
    tokenizer = load_tokenizer(trained_dir, model_max_length=77, padding_side="left")
    assert isinstance(tokenizer, LlavaLlamaTokenizer)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.pad_token is None
    assert tokenizer.legacy is False
    assert tokenizer.model_max_length == 77 and tokenizer.padding_side == "left"
    assert load_tokenizer(trained_dir).padding_side == "right"
    assert load_tokenizer(trained_dir).model_max_length == 2048
    assert (
        len(tokenizer)
        == tokenizer.vocab_size
        == spm.SentencePieceProcessor(model_file=str(trained_dir / "tokenizer.model")).get_piece_size()
    )
    ids = tokenizer("a cat").input_ids
    assert ids[0] == 1 and ids[-1] != 2


def test_padding_with_unk_as_pad(trained_dir):
    tokenizer = load_tokenizer(trained_dir, padding_side="left")
    tokenizer.pad_token = tokenizer.unk_token
    batch = tokenizer(["a cat", "the red table is there"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0].item() == 0 and batch.attention_mask[0, 0].item() == 0
    assert batch.attention_mask[1].all()


def test_decode_roundtrip(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    text = "Café, naïve 😀 中文\n  two  spaces"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids + [2], skip_special_tokens=False) == "<s>" + " " + text + "</s>"
    answer = tokenizer("The cat.", add_special_tokens=False).input_ids + [2]
    assert tokenizer.batch_decode([answer], skip_special_tokens=True) == ["The cat."]


def test_train_sentencepiece_layout_and_determinism(tmp_path):
    first = train_sentencepiece(corpus(), tmp_path / "a", vocab_size=500)
    second = train_sentencepiece(corpus(), tmp_path / "b", vocab_size=500)
    assert (first / "tokenizer.model").read_bytes() == (second / "tokenizer.model").read_bytes()
    config = json.loads((first / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer"
    assert (config["legacy"], config["add_bos_token"], config["add_eos_token"]) == (False, True, False)
    assert config["model_max_length"] == 2048
    special = json.loads((first / "special_tokens_map.json").read_text())
    assert {k: v["content"] for k, v in special.items()} == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    sp = spm.SentencePieceProcessor(model_file=str(first / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.piece_to_id("<0x0A>") != 0  # byte fallback: any character encodes without <unk>
    assert 0 not in sp.encode("😀 中文")


def test_train_sentencepiece_rejects_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="non-blank"):
        train_sentencepiece(["", "  "], tmp_path)


def test_load_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"no tokenizer.model in '{re.escape(str(tmp_path))}'.*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_missing_legacy_key_means_legacy_as_upstream(tmp_path, trained_dir):
    """Without `legacy` in the config, upstream's slow tokenizer fell back to legacy=True: text after a special
    token gets a dummy-prefix space too."""
    shutil.copy(trained_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.legacy is True
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert tokenizer("a</s>USER").input_ids == [1, *sp.encode("a"), 2, *sp.encode("USER")]


def test_save_pretrained_keeps_released_layout_and_ids(tmp_path, trained_dir):
    tokenizer = load_tokenizer(trained_dir)
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["legacy"] is False
    assert config["add_bos_token"] is True and "local_files_only" not in config
    reloaded = load_tokenizer(tmp_path / "saved")
    prompt = PROMPTS[4]
    assert tokenizer_image_token(prompt, reloaded) == tokenizer_image_token(prompt, tokenizer)
    assert reloaded.pad_token == "<unk>"


def test_pickle_roundtrip(trained_dir):
    tokenizer = load_tokenizer(trained_dir)
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone(PROMPTS[3]).input_ids == tokenizer(PROMPTS[3]).input_ids


def test_upstream_round_length_arithmetic_holds_for_llama2(llama2_dir):
    """preprocess_v1 masks by tokenising each `</s>`-separated round alone and subtracting one per later round
    (legacy=False: alone, "USER" is "▁US" "ER"; after `</s>` it is the single piece "USER"). That sum must land
    exactly on the whole conversation's length, or upstream masks the sample out with 'tokenization mismatch'.
    The -1 is a fact of the Llama vocabulary, not of the tokenizer: a small trained vocabulary with a "▁USER"
    piece breaks it, so training code must not rely on it for test tokenizers."""
    tokenizer = load_tokenizer(llama2_dir)
    conv = conv_templates["vicuna_v1"].copy()
    for i, text in enumerate(["<image>\nWhat is it?", "A cat  sitting.", "Color? 中文", "Red 😀.", "And?", "No."]):
        conv.append_message(conv.roles[i % 2], text)
    prompt = conv.get_prompt()
    total = 1  # BOS
    for i, round_text in enumerate(prompt.split(conv.sep2)):
        if not round_text:
            break
        total += len(tokenizer_image_token(round_text, tokenizer)) - (1 if i > 0 else 0)
    assert total == len(tokenizer_image_token(prompt, tokenizer))


def test_tokenizer_without_bos_gets_no_bos(trained_dir):
    tokenizer = LlavaLlamaTokenizer.from_pretrained(str(trained_dir), add_bos_token=False)
    prompt = "USER: <image>\nWhat? ASSISTANT:"
    with_bos = tokenizer_image_token(prompt, load_tokenizer(trained_dir))
    assert tokenizer_image_token(prompt, tokenizer) == with_bos[1:]


def test_without_dummy_prefix_is_the_protobuf_edit(tokenizer_dir):
    """The wire-format edit loads as the same model as protobuf's parse-set-serialize (sentencepiece re-serialises
    both canonically)."""
    original = (tokenizer_dir / "tokenizer.model").read_bytes()
    ours = spm.SentencePieceProcessor(model_proto=without_dummy_prefix(original))
    _, reference = processors(tokenizer_dir / "tokenizer.model")
    assert ours.serialized_model_proto() == reference.serialized_model_proto()
    assert ModelProto.FromString(without_dummy_prefix(original)).normalizer_spec.add_dummy_prefix is False


def test_without_dummy_prefix_edge_cases():
    spec = ModelProto()
    assert ModelProto.FromString(without_dummy_prefix(b"")).normalizer_spec.HasField("add_dummy_prefix")
    assert without_dummy_prefix(b"") == b"\x1a\x02\x18\x00"  # normalizer_spec { add_dummy_prefix: false }
    spec.normalizer_spec.add_dummy_prefix = True
    twice = spec.SerializeToString() * 2  # a repeated message field is merged when parsed
    edited = ModelProto.FromString(without_dummy_prefix(twice))
    assert edited.normalizer_spec.add_dummy_prefix is False
    with pytest.raises(ValueError, match="truncated"):
        without_dummy_prefix(b"\x1a\x05\x18")
    with pytest.raises(ValueError, match="wire type 0, expected a message"):
        without_dummy_prefix(b"\x18\x01")


def test_loading_needs_no_protobuf(monkeypatch, tokenizer_dir):
    """With protobuf unimportable (what an incompatible runtime amounts to), the tokenizer loads and keeps its ids."""
    import sentencepiece

    for module in ("google.protobuf", "sentencepiece.sentencepiece_model_pb2"):
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delattr(sentencepiece, "sentencepiece_model_pb2", raising=False)
    with pytest.raises(ImportError):
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401
    tokenizer = load_tokenizer(tokenizer_dir)
    for prompt in PROMPTS:
        assert tokenizer_image_token(prompt, tokenizer) == sentencepiece_reference(
            prompt, tokenizer_dir / "tokenizer.model"
        )


def test_use_fast_with_unloadable_protobuf_module_says_why(monkeypatch, trained_dir):
    """transformers itself would fall through to 'tiktoken is required'; the error names the real cause."""
    import sentencepiece

    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)
    monkeypatch.delattr(sentencepiece, "sentencepiece_model_pb2", raising=False)
    with pytest.raises(ImportError, match="use_fast=True\\) needs sentencepiece's protobuf module"):
        load_tokenizer(trained_dir, use_fast=True)
    assert load_tokenizer(trained_dir)("a b").input_ids[0] == SPECIAL_IDS["<s>"]
