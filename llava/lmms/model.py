"""``llava_longtail``: our checkpoints as an lmms-eval model, batched, with every pruning method.

``lmms-eval --model llava_longtail --model_args pretrained=liuhaotian/llava-v1.5-7b,visual_pruning=longtail`` loads
the checkpoint through ``llava.model.builder.load_pretrained_model`` (any family it loads), builds each prompt with
``llava.inference.build_prompt`` and answers through ``generate_answers``: left-padded batches whose greedy answers
equal batch-size-1 answers. See docs/lmms_eval.md.

- ``generate_until``: requests grouped by their generation settings, ``batch_size`` at a time. A task's ``until``
  strings are ignored unless ``apply_until=true`` (lmms-eval's own LLaVA wrapper ignores them too; the model stops
  at its end-of-sequence token).
- ``loglikelihood`` (multiple-choice tasks): ``(mean negative log-likelihood per reply token, is greedy)``, the
  convention of lmms-eval's LLaVA wrappers, whose multiple-choice scorer takes the smallest; measured through
  ``generate`` (``llava.lmms.scoring``), so both pruning stages act as when answering.
- every request's token counts (visual tokens before / after stage 1, prompt, generated, final KV length) go to
  lmms-eval's per-sample log (``token_counts``); their means over each call go to the results' ``throughput``
  section (``avg_visual_before``, ``avg_visual_after``, ``avg_kv_final``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger as eval_logger
from PIL import Image
from tqdm import tqdm

from llava.inference import build_prompt, generate_answers
from llava.lmms.manifest import MODEL_ID
from llava.lmms.options import GenerationSettings, check_model_args, parse_model_args
from llava.lmms.scoring import score_replies
from llava.mm_utils import get_model_name_from_path
from llava.model.builder import load_pretrained_model
from llava.utils import default_conv_mode

MEAN_STATS = ("visual_before", "visual_after", "kv_final")  # averaged into the results' throughput section


@dataclass
class PrunedTokenCounts(TokenCounts):
    """lmms-eval's counters (input = the prompt the LLM read, visual tokens included; output = generated) plus the
    token statistics of ``generate``; ``to_dict`` is what the per-sample log shows."""

    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> PrunedTokenCounts:
        return cls(input_tokens=stats.get("prompt"), output_tokens=stats.get("generated"), stats=dict(stats))

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), **self.stats}


class LongTailLMM(lmms):
    is_simple = True

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(
                f"{MODEL_ID} runs in one process (no accelerate / torchrun data parallelism yet); "
                "start one lmms-eval process per GPU with --limit / --offset slices instead"
            )
        self.options = parse_model_args(model_args)
        check_model_args(self.options)
        name = get_model_name_from_path(self.options.pretrained)
        self.tokenizer, self.model, self.image_processor, _ = load_pretrained_model(
            self.options.pretrained,
            self.options.model_base,
            name,
            load_8bit=self.options.load_8bit,
            load_4bit=self.options.load_4bit,
            device=self.options.device,
            use_flash_attn=self.options.use_flash_attn,
            dtype=self.options.dtype,
            vision_tower=self.options.vision_tower,
            pruning=self.options.pruning or None,
        )
        self.conv_mode = self.options.conv_mode or default_conv_mode(name, self.model.config, purpose="eval")
        self.batch_size = self.options.batch_size
        eval_logger.info(
            f"{MODEL_ID}: {self.options.pretrained}, conv_mode {self.conv_mode}, batch size {self.batch_size}, "
            f"pruning: {self.model.pruning_config.describe()}"
        )

    # ---- requests ---------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        stats, start = [], time.perf_counter()
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{MODEL_ID} answering")
        for indices in groups.values():
            settings = GenerationSettings.from_kwargs(requests[indices[0]].args[1])
            for begin in range(0, len(indices), self.batch_size):
                batch = indices[begin : begin + self.batch_size]
                prompts, images = self._prompts_and_images([requests[i] for i in batch])
                answers = generate_answers(
                    self.model,
                    self.tokenizer,
                    self.image_processor,
                    prompts,
                    images,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    num_beams=settings.num_beams,
                    max_new_tokens=settings.max_new_tokens,
                )
                for index, answer in zip(batch, answers, strict=True):
                    text = settings.cut(answer.text) if self.options.apply_until else answer.text
                    results[index] = GenerationResult(text, PrunedTokenCounts.from_stats(answer.token_stats))
                    stats.append(answer.token_stats)
                bar.update(len(batch))
        bar.close()
        self._log_means(stats, time.perf_counter() - start)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        # The (score, is_greedy) pair travels as GenerationResult.text: lmms-eval 0.7.3's evaluator turns any other
        # non-string result into str(result) (api/instance.py, unwrap_generation_output), which its multiple-choice
        # scorer cannot read.
        results: list[GenerationResult] = []
        stats, start = [], time.perf_counter()
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{MODEL_ID} scoring")
        for begin in range(0, len(requests), self.batch_size):
            batch = requests[begin : begin + self.batch_size]
            prompts, images = self._prompts_and_images(batch)
            replies = [self._continuation(request).lstrip() for request in batch]
            scores = score_replies(
                self.model, self.tokenizer, self.image_processor, prompts, replies, images, self.conv_mode
            )
            for score in scores:
                results.append(
                    GenerationResult((score.mean_nll, score.greedy), PrunedTokenCounts.from_stats(score.token_stats))
                )
                stats.append(score.token_stats)
            bar.update(len(batch))
        bar.close()
        self._log_means(stats, time.perf_counter() - start)
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{MODEL_ID} answers one turn per request; multi-round tasks are not supported")

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _doc(self, request: Instance) -> dict[str, Any]:
        _, _, _, doc_id, task, split = request.args
        return self.task_dict[task][split][doc_id]

    def _continuation(self, request: Instance) -> str:
        continuation = request.args[1]
        return continuation if isinstance(continuation, str) else continuation(self._doc(request))

    def _prompts_and_images(self, batch: list[Instance]) -> tuple[list[str], list[Any]]:
        prompts, images = [], []
        for request in batch:
            context, _, doc_to_visual, _, task, _ = request.args
            visuals = doc_to_visual(self._doc(request)) if doc_to_visual is not None else None
            visuals = [v for v in (visuals or []) if v is not None]
            for visual in visuals:
                if not isinstance(visual, Image.Image):
                    raise TypeError(f"task {task!r} gives a {type(visual).__name__} visual; {MODEL_ID} takes images")
            visuals = [v.convert("RGB") for v in visuals]
            prompts.append(build_prompt(context, self.conv_mode, len(visuals), model_config=self.model.config))
            images.append(None if not visuals else visuals[0] if len(visuals) == 1 else visuals)
        return prompts, images

    def _log_means(self, stats: list[dict[str, Any]], elapsed: float) -> None:
        """One entry in lmms-eval's throughput log per call: the results show their means (``avg_<name>``)."""
        if not stats:
            return
        generated = sum(int(s.get("generated", 0)) for s in stats)
        means = {key: fmean(s[key] for s in stats) for key in MEAN_STATS if all(key in s for s in stats)}
        log_metrics(
            total_elapsed_time=elapsed,
            total_gen_tokens=generated,
            avg_speed=generated / elapsed if elapsed > 0 else 0.0,
            additional_metrics={**means, "total_requests": len(stats)},
        )
