"""Training data: label masks token by token, upstream's JSON records, lazy loading, collation, batch grouping."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest
import sentencepiece as spm
import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import tokenizer_image_token
from llava.tokenization import load_tokenizer
from llava.train import data as data_module
from llava.train.data import (
    DataError,
    LazySupervisedDataset,
    SupervisedCollator,
    preprocess,
    read_records,
    training_template,
)
from llava.train.llava_trainer import modality_grouped_indices, param_groups, split_evenly
from tests.helpers import LLAMA2_TOKENIZER, random_image

V1 = training_template("v1")

TEXT_MULTI_TURN = {
    "id": "sharegpt-1",
    "conversations": [
        {"from": "human", "value": "How many objects are there?"},
        {"from": "gpt", "value": "There are 3 objects:  a red circle, a blue square."},
        {"from": "human", "value": "Please answer yes or no.\nIs one red?"},
        {"from": "gpt", "value": "\nYes."},
    ],
}
IMAGE_ONE_TURN = {
    "id": "000000033471",
    "image": "a.png",
    "conversations": [
        {"from": "human", "value": "What is shown in the image?\n<image>"},
        {"from": "gpt", "value": "A cat sitting on a chair next to a window."},
    ],
}
IMAGE_MULTI_TURN = {
    "id": 42,
    "image": "b.png",
    "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image in detail."},
        {"from": "gpt", "value": "The picture shows a map."},
        {"from": "human", "value": "Which of these states is farthest north?"},
        {"from": "gpt", "value": "A. yes"},
        {"from": "human", "value": "Answer with the option's letter from the given choices directly."},
        {"from": "gpt", "value": "B"},
    ],
}
CONVERSATIONS = [TEXT_MULTI_TURN, IMAGE_ONE_TURN, IMAGE_MULTI_TURN]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_ckpt):
    return load_tokenizer(tiny_ckpt)


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory, tiny_ckpt):
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"real Llama-2 tokenizer not present at {LLAMA2_TOKENIZER}")
    folder = tmp_path_factory.mktemp("llama2-tok")
    shutil.copy(LLAMA2_TOKENIZER, folder / "tokenizer.model")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # legacy: false, as the released configs
        shutil.copy(tiny_ckpt / name, folder / name)
    return load_tokenizer(folder)


@pytest.fixture(params=["tiny", "llama"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


def sp_ids(tokenizer, text: str) -> list[int]:
    """What sentencepiece itself encodes, independent of the transformers wrapper."""
    processor = spm.SentencePieceProcessor(model_file=tokenizer.vocab_file)
    return processor.encode(text)


def supervised_runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


# ---- label masks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("record", CONVERSATIONS, ids=lambda r: str(r["id"]))
def test_v1_supervises_exactly_the_replies_and_their_eos(tokenizer, record):
    sample = preprocess(record, tokenizer, V1, has_image="image" in record)
    ids, labels = sample.input_ids, sample.labels
    replies = [turn["value"] for turn in record["conversations"][1::2]]
    runs = supervised_runs(labels)
    assert len(runs) == len(replies)
    for (start, end), reply in zip(runs, replies):
        assert ids[start:end] == sp_ids(tokenizer, reply) + [tokenizer.eos_token_id]
        assert labels[start:end] == ids[start:end]
        prefix = tokenizer.decode([i for i in ids[:start] if i >= 0])
        assert prefix.endswith("ASSISTANT:")
    assert ids.count(tokenizer.eos_token_id) == len(replies)
    assert ids.count(IMAGE_TOKEN_INDEX) == (1 if "image" in record else 0)


def v1_prompt(record) -> str:
    """The prompt upstream built: <image> moved to the front of its turn, then the vicuna_v1 template."""
    conversation = V1.copy()
    for index, turn in enumerate(record["conversations"]):
        value = turn["value"]
        if "<image>" in value:
            value = "<image>\n" + value.replace("<image>", "").strip()
        conversation.append_message(V1.roles[index % 2], value)
    return conversation.get_prompt()


@pytest.mark.parametrize("record", CONVERSATIONS, ids=lambda r: str(r["id"]))
def test_v1_ids_are_the_whole_prompt_with_the_image_first(tokenizer, record):
    sample = preprocess(record, tokenizer, V1, has_image="image" in record)
    assert sample.input_ids == tokenizer_image_token(v1_prompt(record), tokenizer)


def upstream_v1_labels(prompt: str, tokenizer, has_image: bool) -> list[int]:
    """Upstream's preprocess_v1 length arithmetic (tokenizers >= 0.14, legacy=False), as a reference."""

    def count(text: str) -> int:
        return len(tokenizer_image_token(text, tokenizer)) if has_image else len(tokenizer(text).input_ids)

    ids = tokenizer_image_token(prompt, tokenizer)
    target = list(ids)
    sep = V1.sep + V1.roles[1] + ": "
    cur = 1
    target[:cur] = [IGNORE_INDEX]
    for i, rou in enumerate(prompt.split(V1.sep2)):
        if rou == "":
            break
        parts = rou.split(sep)
        parts[0] += sep
        round_len, instruction_len = count(rou), count(parts[0]) - 2
        if i != 0:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        target[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    assert cur == len(ids), "upstream would have reported a tokenization mismatch"
    return target


@pytest.mark.parametrize("record", CONVERSATIONS, ids=lambda r: str(r["id"]))
def test_v1_labels_equal_upstream_preprocess_on_the_real_tokenizer(llama_tokenizer, record):
    has_image = "image" in record
    sample = preprocess(record, llama_tokenizer, V1, has_image=has_image)
    assert sample.labels == upstream_v1_labels(v1_prompt(record), llama_tokenizer, has_image)


def test_plain_supervises_the_caption_and_newline(tokenizer):
    record = {"id": "blip-1", "image": "a.png", "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": "a cat on a chair"},
    ]}  # fmt: skip
    sample = preprocess(record, tokenizer, training_template("plain"), has_image=True)
    assert sample.input_ids[:2] == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]
    assert sample.labels[:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert sample.labels[2:] == sample.input_ids[2:]
    assert sample.input_ids[2:] == tokenizer("a cat on a chair\n").input_ids[1:]


def test_truncation_keeps_labels_aligned_and_rejects_an_unsupervised_remainder(tiny_tokenizer):
    full = preprocess(TEXT_MULTI_TURN, tiny_tokenizer, V1, has_image=False)
    start, _ = supervised_runs(full.labels)[0]
    cut = preprocess(TEXT_MULTI_TURN, tiny_tokenizer, V1, has_image=False, max_length=start + 2)
    assert cut.input_ids == full.input_ids[: start + 2] and cut.labels == full.labels[: start + 2]
    with pytest.raises(ValueError, match="no supervised token left after truncation to 10"):
        preprocess(TEXT_MULTI_TURN, tiny_tokenizer, V1, has_image=False, max_length=10)


class ColonSpaceTokenizer:
    """One token per character, except ': ' which is a single token: the reply boundary falls inside it."""

    bos_token_id = 1

    def __call__(self, text: str):
        pieces = re.findall(r": |.", text, flags=re.S)
        return type(
            "Encoding", (), {"input_ids": [1] + [1000 + ord(p[0]) + (5000 if len(p) > 1 else 0) for p in pieces]}
        )


def test_a_reply_boundary_inside_a_token_is_an_error_naming_the_sample(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([TEXT_MULTI_TURN]))
    dataset = LazySupervisedDataset(data, ColonSpaceTokenizer(), V1)
    with pytest.raises(DataError, match=r"sample 'sharegpt-1' \(record 0 of .*data.json\).*token boundary"):
        dataset[0]


# ---- records and their errors ---------------------------------------------------------------------------------
BAD_RECORDS = [
    ({"id": "a", "image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
     "exactly one <image>"),
    ({"id": "b", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]},
     "no 'image'"),
    ({"id": "c", "conversations": [{"from": "human", "value": "hi"}, {"from": "human", "value": "x"}]},
     "turn 1 is from 'human'"),
    ({"id": "d", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]},
     "turn 1 is empty"),
    ({"id": "e", "conversations": [{"from": "human", "value": "hi"}]}, "no assistant turn"),
    ({"id": "f", "conversations": [{"from": "human", "value": "hi"}, {"value": "x"}]}, "'from'"),
]  # fmt: skip


@pytest.mark.parametrize("record,message", BAD_RECORDS, ids=[r["id"] for r, _ in BAD_RECORDS])
def test_bad_records_are_named_by_id(tmp_path, tiny_ckpt, tiny_tokenizer, tiny_model, record, message):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([record]))
    (tmp_path / "a.png").write_bytes(b"")
    processor = tiny_model[2]
    dataset = LazySupervisedDataset(data, tiny_tokenizer, V1, image_folder=tmp_path, image_processor=processor)
    with pytest.raises(DataError, match=rf"sample '{record['id']}' \(record 0 of .*\): .*{re.escape(message)}"):
        dataset[0]


def test_files_that_are_not_record_lists(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data_path"):
        read_records(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        read_records(tmp_path / "broken.json")
    (tmp_path / "no_conv.json").write_text(json.dumps([{"id": 1, "conversations": []}, {"id": 2}]))
    with pytest.raises(DataError, match="record 1 has no 'conversations'"):
        read_records(tmp_path / "no_conv.json")
    (tmp_path / "lines.jsonl").write_text(json.dumps(TEXT_MULTI_TURN) + "\n\n" + json.dumps(IMAGE_ONE_TURN) + "\n")
    assert [r["id"] for r in read_records(tmp_path / "lines.jsonl")] == ["sharegpt-1", "000000033471"]


@pytest.fixture
def image_data(tmp_path):
    for name, seed in (("a.png", 1), ("b.png", 2)):
        random_image(seed).save(tmp_path / name)
    records = [TEXT_MULTI_TURN, IMAGE_ONE_TURN, {**IMAGE_MULTI_TURN, "image": "missing.png"}, IMAGE_MULTI_TURN]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def test_lazy_dataset_images_and_modality_lengths(image_data, tiny_tokenizer, tiny_model):
    processor = tiny_model[2]
    dataset = LazySupervisedDataset(
        image_data / "data.json", tiny_tokenizer, V1, image_folder=image_data, image_processor=processor
    )
    assert len(dataset) == 4
    assert dataset.modality_lengths == [-24, 17, 31, 31]  # word counts, negative for text-only
    text, image = dataset[0], dataset[1]
    assert text["image"] is None
    assert image["image"].shape == (3, 112, 112)
    assert image["input_ids"].tolist() == preprocess(IMAGE_ONE_TURN, tiny_tokenizer, V1, True).input_ids
    with pytest.raises(DataError, match=r"sample 42 \(record 2 .*missing.png"):
        dataset[2]


def test_skip_policy_logs_the_id_and_serves_the_next_record(image_data, tiny_tokenizer, tiny_model, caplog):
    dataset = LazySupervisedDataset(
        image_data / "data.json",
        tiny_tokenizer,
        V1,
        image_folder=image_data,
        image_processor=tiny_model[2],
        on_bad_sample="skip",
    )
    with caplog.at_level(logging.WARNING, logger="llava.train.data"):
        item = dataset[2]
    assert torch.equal(item["input_ids"], dataset[3]["input_ids"])
    assert "skipping sample 42 (record 2" in caplog.text


def test_keep_loaded_tokenizes_and_loads_each_record_once_and_serves_the_same_samples(
    image_data, tiny_tokenizer, tiny_model, monkeypatch
):
    kwargs = dict(image_folder=image_data, image_processor=tiny_model[2])
    lazy = LazySupervisedDataset(image_data / "data.json", tiny_tokenizer, V1, **kwargs)
    keeping = LazySupervisedDataset(image_data / "data.json", tiny_tokenizer, V1, keep_loaded=True, **kwargs)
    calls = []
    original = data_module.preprocess

    def counting_preprocess(record, *args, **kwargs):
        calls.append(record["id"])
        return original(record, *args, **kwargs)

    monkeypatch.setattr(data_module, "preprocess", counting_preprocess)
    images = []
    monkeypatch.setattr(keeping, "load_image", lambda name: images.append(name) or lazy.load_image(name))
    for _ in range(3):
        for index in (0, 1, 3):
            for key in ("input_ids", "labels", "image"):
                want, got = lazy[index][key], keeping[index][key]
                assert (got is None and want is None) or torch.equal(got, want), (index, key)
    assert calls.count(IMAGE_ONE_TURN["id"]) == 3 * 3 + 1  # the lazy dataset's 9 uses + the keeping one's first
    assert sorted(images) == ["a.png", "b.png"]
    assert sorted(keeping.kept) == [0, 1, 3]
    with pytest.raises(DataError, match=r"sample 42 \(record 2 .*missing.png"):
        keeping[2]  # errors still name the sample, every time
    assert lazy.kept is None


def test_images_without_a_vision_tower_are_refused(image_data, tiny_tokenizer):
    with pytest.raises(ValueError, match="3 records have an 'image' but the model has no vision tower"):
        LazySupervisedDataset(image_data / "data.json", tiny_tokenizer, V1)


def test_unsupported_templates_and_policies():
    with pytest.raises(ValueError, match="--version 'llama_2'.*no training preprocessing"):
        training_template("llama_2")
    with pytest.raises(KeyError, match="unknown conversation template 'v9'"):
        training_template("v9")


# ---- collation ------------------------------------------------------------------------------------------------
def test_collator_pads_right_masks_pads_and_fills_text_only_images():
    items = [
        {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6]), "image": torch.ones(3, 4, 4)},
        {"input_ids": torch.tensor([1, 0, 7, 8, 9]), "labels": torch.tensor([-100, -100, 7, 8, 9]), "image": None},
    ]
    batch = SupervisedCollator(pad_token_id=0, max_length=4, image_shape=(3, 4, 4))(items)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0], [1, 0, 7, 8]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100], [-100, -100, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]  # the in-text id 0 stays attended
    assert batch["images"].shape == (2, 3, 4, 4)
    assert batch["images"][0].eq(1).all() and batch["images"][1].eq(0).all()
    text_only = SupervisedCollator(pad_token_id=0)
    assert "images" not in text_only([items[1]])
    with pytest.raises(ValueError, match="text-only model"):
        text_only(items)


# ---- batch grouping and optimizer groups ----------------------------------------------------------------------
def test_each_optimizer_step_sees_one_modality_except_the_last_mixed_one():
    lengths = [5 + i for i in range(23)] + [-(3 + i) for i in range(17)]  # 23 image, 17 text-only samples
    order = modality_grouped_indices(lengths, batch_size=2, replicas=3, generator=torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(40))
    steps = [order[i : i + 6] for i in range(0, 40, 6)]
    full_megabatches = 23 // 6 + 17 // 6
    assert all(len({lengths[i] > 0 for i in step}) == 1 for step in steps[:full_megabatches])
    leftovers = [lengths[i] > 0 for step in steps[full_megabatches:] for i in step]
    assert leftovers.count(True) == 23 % 6 and leftovers.count(False) == 17 % 6
    again = modality_grouped_indices(lengths, 2, 3, torch.Generator().manual_seed(0))
    other = modality_grouped_indices(lengths, 2, 3, torch.Generator().manual_seed(1))
    assert again == order and other != order


def test_split_evenly_balances_lengths_across_ranks():
    lengths = [100, 90, 10, 5, 50, 45]
    groups = split_evenly(range(6), lengths, parts=2)
    assert sorted(len(g) for g in groups) == [3, 3]
    totals = sorted(sum(lengths[i] for i in g) for g in groups)
    assert totals == [150, 150]
    with pytest.raises(ValueError, match="5 indices cannot be split into 2"):
        split_evenly(range(5), lengths, parts=2)


def test_projector_gets_its_own_learning_rate_and_no_decay_on_biases():
    named = [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", torch.nn.Parameter(torch.ones(1))),
        ("base_model.model.model.mm_projector.0.weight", torch.nn.Parameter(torch.ones(1))),
        ("base_model.model.model.mm_projector.0.bias", torch.nn.Parameter(torch.ones(1))),
        ("base_model.model.model.norm.weight", torch.nn.Parameter(torch.ones(1), requires_grad=False)),
    ]
    decay = {named[0][0], named[1][0]}
    groups = param_groups(named, decay, weight_decay=0.1, projector_lr=2e-5)
    as_sets = [({id(p) for p in g["params"]}, g["weight_decay"], g.get("lr")) for g in groups]
    assert ({id(named[0][1])}, 0.1, None) in as_sets
    assert ({id(named[1][1])}, 0.1, 2e-5) in as_sets
    assert ({id(named[2][1])}, 0.0, 2e-5) in as_sets
    assert len(groups) == 3  # the frozen norm is in no group
    assert len(param_groups(named, decay, 0.1, projector_lr=None)) == 2
    named_groups = {(g["name"], g["weight_decay"]) for g in groups}
    assert named_groups == {("main", 0.1), ("projector", 0.1), ("projector", 0.0)}  # logged by these names
