"""Log-likelihood of a given reply, measured the way the model would produce it: through ``generate``.

A multiple-choice task asks how likely each option is as the assistant's reply. A single forward pass over prompt +
reply would skip what pruning does while generating (stage 2 evicts keys after the prompt; an LLM-side method may
act per step), so the reply is *forced* through ``generate`` instead: a logits processor records the log-probability
of each reply token and then allows only that token, and the end-of-sequence token after the last one. Stage 1,
stage 2 and any registered method therefore act exactly as in ``generate_until``, batched with the same left
padding, and the per-sample token statistics come for free.

The recorded scores are those ``generate`` hands its logits processors: the model's logits, after any processor of
the checkpoint's generation_config that acts in greedy decoding (e.g. a repetition penalty); none of the LLaVA
releases sets one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.inference import generate_answers
from llava.mm_utils import tokenizer_image_token


@dataclass
class ReplyScore:
    logprob: float  # sum over the reply's tokens of log p(token | prompt, earlier reply tokens)
    tokens: int  # reply tokens scored
    greedy: bool  # greedy decoding would have produced exactly these tokens
    token_stats: dict[str, Any]  # as for generated answers: the reply plus its end-of-sequence token count as generated

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per reply token: what lmms-eval's LLaVA wrappers return as 'loglikelihood'."""
        return -self.logprob / self.tokens


class ForcedReply(LogitsProcessor):
    """Record the log-probability of each row's next target token, then force it; end each row with ``eos_id``."""

    def __init__(self, targets: list[list[int]], eos_id: int):
        self.targets = targets
        self.eos_id = eos_id
        self.step = 0
        self.logprobs: list[list[float]] = [[] for _ in targets]
        self.greedy = [True] * len(targets)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step, self.step = self.step, self.step + 1
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        best = scores.argmax(dim=-1).tolist()
        forced = []
        for row, target in enumerate(self.targets):
            token = target[step] if step < len(target) else self.eos_id
            if step < len(target):
                self.logprobs[row].append(float(logprobs[row, token]))
                self.greedy[row] = self.greedy[row] and best[row] == token
            forced.append(token)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(forced), device=scores.device), torch.tensor(forced, device=scores.device)] = 0.0
        return out


def reply_text(conv_mode: str, reply: str) -> str:
    """What the template writes after the assistant's role tag for ``reply``, without the end-of-turn separator:
    ``' A'`` for vicuna_v1 (``'ASSISTANT: A</s>'``), ``'A'`` for chatml templates."""
    template = conv_templates[conv_mode]
    open_turn, closed_turn = template.copy(), template.copy()
    for conv, answer in ((open_turn, None), (closed_turn, reply)):
        conv.append_message(conv.roles[0], "Q")
        conv.append_message(conv.roles[1], answer)
    prefix, full = open_turn.get_prompt(), closed_turn.get_prompt()
    if not full.startswith(prefix) or reply not in full[len(prefix) :]:
        raise ValueError(f"conv_mode {conv_mode!r}: cannot place a reply after the open assistant turn")
    tail = full[len(prefix) :]
    return tail[: tail.index(reply) + len(reply)]


def reply_tokens(tokenizer, prompt: str, full: str) -> list[int]:
    """The token ids ``full`` adds to ``prompt``; the prompt's own ids must be a prefix of the full text's."""
    prompt_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)
    full_ids = tokenizer_image_token(full, tokenizer, IMAGE_TOKEN_INDEX)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"the reply changes how the prompt's last tokens are tokenized: {full[len(prompt) - 20 :]!r}")
    return full_ids[len(prompt_ids) :]


def score_replies(
    model,
    tokenizer,
    image_processor,
    prompts: list[str],
    replies: list[str],
    images: list[Image.Image | list[Image.Image] | None],
    conv_mode: str,
) -> list[ReplyScore]:
    """Score each reply as the assistant's answer to its prompt (a full prompt from ``build_prompt``, open turn)."""
    if not (len(prompts) == len(replies) == len(images)):
        raise ValueError(f"got {len(prompts)} prompts, {len(replies)} replies and {len(images)} image entries")
    targets = []
    for prompt, reply in zip(prompts, replies):
        tokens = reply_tokens(tokenizer, prompt, prompt + reply_text(conv_mode, reply))
        if not tokens:
            raise ValueError(f"empty reply {reply!r}: nothing to score")
        targets.append(tokens)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token to end the forced replies with")
    forced = ForcedReply(targets, tokenizer.eos_token_id)
    answers = generate_answers(
        model,
        tokenizer,
        image_processor,
        prompts,
        images,
        max_new_tokens=max(len(t) for t in targets) + 1,
        # every row stops at the token forced after its reply, whatever the model's own stop tokens are
        generate_kwargs={"logits_processor": LogitsProcessorList([forced]), "eos_token_id": tokenizer.eos_token_id},
    )
    return [
        ReplyScore(sum(forced.logprobs[row]), len(targets[row]), forced.greedy[row], answer.token_stats)
        for row, answer in enumerate(answers)
    ]
