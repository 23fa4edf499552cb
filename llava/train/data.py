"""Training data: upstream's conversation JSON, tokenised with exact label masks, loaded lazily, and collated.

A record looks like llava_v1_5_mix665k.json's::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the bus?"}, {"from": "gpt", "value": "A bus."}]}

Text-only records have no "image" key. Upstream computed the label mask from token counts of separately tokenised
rounds, with +-1 corrections that depend on the tokenizer version; when they were off it masked the whole sample
and printed a warning (the loss could then drift to 0). Here the prompt is built as pieces whose concatenation is
exactly the template's prompt, each piece boundary is located in the token ids by tokenising the text before it, and
the ids of that prefix are checked to be a prefix of the whole conversation's ids. A boundary that falls inside a
token is a ``DataError`` naming the sample, never a silently unsupervised sample.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava.conversation import Conversation, SeparatorStyle, get_conv_template
from llava.mm_utils import load_image, process_images, tokenizer_image_token

logger = logging.getLogger(__name__)

HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
BAD_SAMPLE_POLICIES = ("error", "skip")
Piece = tuple[str, bool]  # (text, supervised)


class DataError(ValueError):
    """A training record that cannot be used as it is; the message names the sample id and the file."""


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not supervised


# ---- prompt pieces --------------------------------------------------------------------------------------------
def training_template(version: str) -> Conversation:
    """The conversation template behind ``--version``; training supports the v1 (TWO) and plain styles."""
    template = get_conv_template(version)
    if template.sep_style not in (SeparatorStyle.TWO, SeparatorStyle.PLAIN):
        raise ValueError(
            f"--version {version!r} ({template.sep_style.name} separators) has no training preprocessing; "
            "use v1 (vicuna_v1, llava_v1) for instruction tuning or plain for projector pretraining"
        )
    return template


def move_image_to_front(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Put <image> at the start of its turn on a line of its own, as upstream's preprocess_multimodal did."""
    out = []
    for turn in turns:
        value = turn["value"]
        if DEFAULT_IMAGE_TOKEN in value:
            value = f"{DEFAULT_IMAGE_TOKEN}\n{value.replace(DEFAULT_IMAGE_TOKEN, '').strip()}".strip()
        out.append({**turn, "value": value})
    return out


def prompt_pieces(turns: list[dict[str, str]], template: Conversation) -> list[Piece]:
    """The prompt as (text, supervised) pieces: assistant replies with their separator are supervised.

    v1: ``system USER: q ASSISTANT:`` | `` a</s>`` | ``USER: q2 ASSISTANT:`` | `` a2</s>``. The space before a reply is
    supervised with it because the tokenizer glues it to the reply's first word (``▁a``).
    plain: ``<image>`` | ``caption\\n`` (the human text is replaced by the image alone, as upstream).
    """
    if template.sep_style == SeparatorStyle.PLAIN:
        if len(turns) != 2 or DEFAULT_IMAGE_TOKEN not in turns[0]["value"]:
            raise ValueError("plain (pretraining) samples need exactly 2 turns and an <image> in the first")
        return [(DEFAULT_IMAGE_TOKEN, False), (turns[1]["value"] + template.sep, True)]
    user, assistant = template.roles
    pieces: list[Piece] = [(template.system + template.sep, False)]
    for index, turn in enumerate(turns):
        if index % 2 == 0:
            pieces.append((f"{user}: {turn['value']}{template.sep}", False))
        else:
            pieces.append((f"{assistant}:", False))
            pieces.append((f" {turn['value']}{template.sep2}", True))
    conversation = template.copy()
    conversation.messages = []
    for index, turn in enumerate(turns):
        conversation.append_message(template.roles[index % 2], turn["value"])
    if "".join(text for text, _ in pieces) != conversation.get_prompt():  # guards against template drift
        raise ValueError(f"the {template.version!r} template builds a different prompt than the training pieces")
    return pieces


def tokenize_pieces(pieces: Sequence[Piece], tokenizer: PreTrainedTokenizerBase) -> TokenizedSample:
    """Ids of the whole prompt (upstream's tokenizer_image_token) and labels copied on the supervised pieces."""
    merged: list[Piece] = []
    for piece, supervised in pieces:  # only the edges of supervised spans need to be token boundaries
        if merged and merged[-1][1] == supervised:
            merged[-1] = (merged[-1][0] + piece, supervised)
        else:
            merged.append((piece, supervised))
    text = "".join(piece for piece, _ in merged)
    input_ids = tokenizer_image_token(text, tokenizer)
    labels = [IGNORE_INDEX] * len(input_ids)
    start_char = start_token = 0
    for index, (piece, supervised) in enumerate(merged):
        end_char = start_char + len(piece)
        if end_char == len(text):
            end_token = len(input_ids)
        else:
            prefix = tokenizer_image_token(text[:end_char], tokenizer)
            if input_ids[: len(prefix)] != prefix:
                raise ValueError(
                    f"piece {index} ({piece[-30:]!r}) does not end on a token boundary: the text before it "
                    "tokenises differently alone than inside the conversation"
                )
            end_token = len(prefix)
        if supervised:
            labels[start_token:end_token] = input_ids[start_token:end_token]
        start_char, start_token = end_char, end_token
    return TokenizedSample(input_ids, labels)


def check_turns(record: dict[str, Any], has_image: bool) -> list[dict[str, str]]:
    """Validated human/assistant turns (a leading assistant turn is dropped, as upstream)."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise ValueError(f"turn {index} must be an object with 'from' and a string 'value'")
    if turns[0]["from"] not in HUMAN_ROLES:
        turns = turns[1:]
    for index, turn in enumerate(turns):
        expected = HUMAN_ROLES if index % 2 == 0 else ASSISTANT_ROLES
        if turn["from"] not in expected:
            raise ValueError(f"turn {index} is from {turn['from']!r}; expected one of {expected} (turns alternate)")
        if not turn["value"].strip():
            raise ValueError(f"turn {index} is empty")
    if not any(turn["from"] in ASSISTANT_ROLES for turn in turns):
        raise ValueError("no assistant turn to learn from")
    tags = sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in turns)
    if has_image and tags != 1:
        raise ValueError(f"a sample with an image needs exactly one {DEFAULT_IMAGE_TOKEN} in its turns, found {tags}")
    if not has_image and tags:
        raise ValueError(f"{DEFAULT_IMAGE_TOKEN} in the text but the sample has no 'image'")
    if any(DEFAULT_IMAGE_TOKEN in turn["value"] for turn in turns[1::2]):
        raise ValueError(f"{DEFAULT_IMAGE_TOKEN} in an assistant turn")
    return turns


def preprocess(
    record: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    template: Conversation,
    has_image: bool,
    max_length: int | None = None,
) -> TokenizedSample:
    """One record -> ids and labels, truncated to ``max_length``. Errors are plain ValueErrors (callers add the id)."""
    turns = check_turns(record, has_image)
    if has_image:
        turns = move_image_to_front(turns)
    sample = tokenize_pieces(prompt_pieces(turns, template), tokenizer)
    if max_length is not None and len(sample.input_ids) > max_length:
        sample = TokenizedSample(sample.input_ids[:max_length], sample.labels[:max_length])
    if all(label == IGNORE_INDEX for label in sample.labels):
        raise ValueError(f"no supervised token left after truncation to {max_length} tokens")
    return sample


# ---- dataset --------------------------------------------------------------------------------------------------
def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A JSON list (upstream) or JSON lines; every record must be an object with 'conversations'."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--data_path {str(file)!r} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{file}: not valid JSON ({err.msg}, line {err.lineno}, column {err.colno})") from None
    if not isinstance(records, list):
        raise DataError(f"{file}: expected a list of records, found {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise DataError(f"{file}: record {index} has no 'conversations' list")
    return records


def word_count(record: dict[str, Any]) -> int:
    return sum(len(turn.get("value", "").split()) for turn in record["conversations"] if isinstance(turn, dict))


class LazySupervisedDataset(Dataset):
    """Records are tokenised and their images loaded when asked for, so start-up stays fast on 665k samples.

    ``keep_loaded=True`` (``--lazy_preprocess False``) keeps each record's token ids and image tensor after its
    first use, so later epochs skip the tokenizer and the image processor: worth it for many epochs over a small
    set (the demo model), not for 665k records seen once (a 336 px image is 1.35 MB as a float32 tensor).

    ``on_bad_sample="skip"`` logs the sample's id and reason at warning level and serves the next good record
    instead; the default raises, naming the id.
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase,
        template: Conversation,
        image_folder: str | os.PathLike | None = None,
        image_processor: Any = None,
        image_aspect_ratio: str | None = "pad",
        max_length: int | None = None,
        on_bad_sample: str = "error",
        keep_loaded: bool = False,
    ) -> None:
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
        if image_aspect_ratio == "anyres":
            raise ValueError("image_aspect_ratio 'anyres' (LLaVA-1.6) has no training support; use 'pad'")
        self.path = str(data_path)
        self.records = read_records(data_path)
        self.tokenizer = tokenizer
        self.template = template
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.image_processor = image_processor
        self.image_aspect_ratio = image_aspect_ratio
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.kept: dict[int, dict[str, Any]] | None = {} if keep_loaded else None
        with_images = sum("image" in record for record in self.records)
        if with_images and (image_processor is None or self.image_folder is None):
            raise ValueError(
                f"{self.path}: {with_images} records have an 'image' but the model has no vision tower "
                "or --image_folder is not set"
            )

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Word counts, negative for text-only records: what the modality-grouped sampler splits on."""
        return [max(1, word_count(r)) * (1 if "image" in r else -1) for r in self.records]

    def sample_name(self, index: int) -> str:
        return f"sample {self.records[index].get('id', '<no id>')!r} (record {index} of {self.path})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.records)):
            current = (index + offset) % len(self.records)
            try:
                return self.load(current)
            except DataError as err:
                if self.on_bad_sample == "error":
                    raise
                logger.warning("skipping %s", err)
        raise DataError(f"{self.path}: no usable record")

    def load(self, index: int) -> dict[str, Any]:
        if self.kept is not None and index in self.kept:
            return self.kept[index]
        record = self.records[index]
        has_image = "image" in record
        try:
            sample = preprocess(record, self.tokenizer, self.template, has_image, self.max_length)
            image = self.load_image(record["image"]) if has_image else None
        except (ValueError, OSError) as err:
            raise DataError(f"{self.sample_name(index)}: {err}") from err
        item = {
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
            "labels": torch.tensor(sample.labels, dtype=torch.long),
            "image": image,
        }
        if self.kept is not None:
            self.kept[index] = item
        return item

    def load_image(self, relative: str) -> torch.Tensor:
        image = load_image(self.image_folder / relative)
        return process_images([image], self.image_processor, {"image_aspect_ratio": self.image_aspect_ratio})[0]


# ---- collator -------------------------------------------------------------------------------------------------
@dataclass
class SupervisedCollator:
    """Right-pads ids and labels; gives every sample an image row (zeros for text-only samples).

    Every sample carrying an image keeps the tower and projector in every step's graph on every rank, which ZeRO-3
    needs (a rank that skipped the projector would leave the others waiting on its parameter gather); the merge
    recognises the zero rows of text-only samples and drops their features. ``image_shape`` None means a text-only
    model: no images at all.
    """

    pad_token_id: int
    max_length: int | None = None
    image_shape: tuple[int, int, int] | None = None

    def __call__(self, instances: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [item["input_ids"][: self.max_length] for item in instances]
        labels = [item["labels"][: self.max_length] for item in instances]
        longest = max(len(x) for x in ids)
        batch = len(instances)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        padded_labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, (seq, lab) in enumerate(zip(ids, labels)):
            input_ids[row, : len(seq)] = seq
            padded_labels[row, : len(lab)] = lab
            attention_mask[row, : len(seq)] = 1
        out = {"input_ids": input_ids, "labels": padded_labels, "attention_mask": attention_mask}
        if self.image_shape is not None:
            out["images"] = torch.stack(
                [item["image"] if item["image"] is not None else torch.zeros(self.image_shape) for item in instances]
            )
        elif any(item["image"] is not None for item in instances):
            raise ValueError("a batch has images but the collator was built for a text-only model")
        return out
