"""LLM-side baselines (pruning/llm_methods, ``--llm-pruning``): FastV, PyramidDrop, DART.

Each against a batch-1 reference transcribed from its official code's selection rule: the decoder run layer by
layer with attention computed by hand (eager softmax, repeat_kv), the tokens chosen with the official indexing
(contiguous image slice, Python sets for DART), positions as the official code sets them, greedy decoding on
per-layer caches. Identical kept indices at every pruning layer and logits within 1e-5 (fp32) on a tiny LLaVA with
six decoder layers and grouped-query attention; a batch of four equals four single runs; with stage 1 and with
stage 2; errors name their flag; a runner per method writes per-sample counts per layer; LLaVA-1.6 once.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eval.common import INPUT_ERROR_STATUS
from llava.eval import model_vqa_loader
from llava.inference import build_prompt, generate_answers
from llava.lmms.options import parse_model_args
from llava.model.builder import load_pretrained_model
from llava.testing.tiny_llava import TinySpec, write_tiny_llava_next
from pruning import PruningConfig, PruningConfigError, registry
from tests.helpers import DEEP_LAYERS, MIXED_QUESTIONS, MIXED_SIZES, batch_inputs

LAYERS = DEEP_LAYERS
NEW_TOKENS = 4
SIZES, QUESTIONS = MIXED_SIZES, MIXED_QUESTIONS


# ---- the reference: one sample, the decoder by hand, the official selection rules ---------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class HandDecoder:
    """The LLaMA decoder of ``model`` on one unpadded sequence, attention computed explicitly (eager), with a KV
    cache per layer; ``step`` runs one layer and returns its output, attention probabilities and rotated keys."""

    def __init__(self, model):
        self.inner, self.head = model.get_model(), model.lm_head
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.dim = config.hidden_size // self.heads
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def step(self, index: int, hidden: torch.Tensor, positions: torch.Tensor):
        layer = self.inner.layers[index]
        attn = layer.self_attn
        length = hidden.shape[1]
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(1, length, self.heads, self.dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, length, self.kv_heads, self.dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, length, self.kv_heads, self.dim).transpose(1, 2)
        cos, sin = self.inner.rotary_emb(hidden, positions[None])
        q = q * cos[:, None] + rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        past_k, past_v = self.cache.get(index, (k[:, :, :0], v[:, :, :0]))
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.cache[index] = (keys, values)
        groups = self.heads // self.kv_heads
        keys_r, values_r = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        logits = q @ keys_r.transpose(-1, -2) / math.sqrt(self.dim)
        past = keys.shape[2] - length
        causal = torch.arange(keys.shape[2])[None, :] <= (past + torch.arange(length))[:, None]
        probs = torch.softmax(logits.masked_fill(~causal, -math.inf).float(), dim=-1)
        out = (probs @ values_r).transpose(1, 2).reshape(1, length, -1)
        hidden = hidden + attn.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, probs, keys_r

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner.norm(hidden[:, -1]))[0]


def official_fastv(config, n, start, state):
    """pkunlp-icler/FastV modeling_llama.py, in-place branch (with the llava-hf port's rank = round(N (1 - R)))."""
    rank = config.llm_tokens if config.llm_tokens is not None else round(n * (1 - config.fastv_ratio))
    attention = torch.mean(state["probs"][config.fastv_k - 1], dim=1)[0]  # [T, T], mean over heads
    if config.fastv_query == "last":
        image = attention[-1][start : start + n]
    else:  # the paper: the attention each image token receives from all tokens
        image = attention.sum(dim=0)[start : start + n] / attention.shape[0]
    top = image.topk(rank).indices + start
    length = attention.shape[0]
    return torch.cat((torch.arange(start), top, torch.arange(start + n, length))).sort().values


def official_dart(config, n, start, state, model):
    """ZichenWen1/DART modeling_llama_self.py, get_retained_image_token."""
    pivot_image, pivot_text = config.dart_pivot_image, config.dart_pivot_text
    token_topk = math.ceil(config.llm_tokens // (pivot_image + pivot_text))
    last_layer_state = model.get_model().norm(state["hidden"])
    any_states = state["keys"][config.dart_k - 1]  # after RoPE and repeat_kv
    any_states = any_states.permute(0, 2, 1, 3).reshape(1, any_states.shape[2], -1)
    k_image = any_states[0][start : start + n, :]
    k_query = any_states[0][start + n :, :]
    image_indices = (torch.norm(k_image, p=1, dim=-1).topk(pivot_image).indices + start).tolist()
    query_indices = (torch.norm(k_query, p=1, dim=-1).topk(pivot_text).indices + start + n).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + n)) - set(image_indices)
    valid_indices_list = list(valid_indices)
    for item in list(indices_set):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -F.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(token_topk).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    retained = torch.tensor(list(indices_set))
    length = last_layer_state.shape[1]
    return torch.cat((torch.arange(start), retained, torch.arange(start + n, length))).sort().values


def official_pdrop_stage(config, stage, n0, start, current, state, model, positions):
    """Cooperx521/PyramidDrop modeling_llama_pdrop.py, pdrop_rank_drop (inference branch): the last instruction
    token's attention at layers[rank_layer] on its normed input, mean over heads, top int(n0 * ratio)."""
    ratios = [1.0] + [float(r) for r in config.pdrop_ratios.split(",")]
    keep_length = int(n0 * ratios[stage + 1])
    if config.llm_tokens is not None:  # our budget form: the same pyramid scaled to llm_tokens after the first cut
        keep_length = int(config.llm_tokens * ratios[stage + 1] / ratios[1])
    layer = model.get_model().layers[int(config.pdrop_layers.split(",")[stage])]
    attn = layer.self_attn
    hidden = layer.input_layernorm(state["hidden"])
    length, heads, kv_heads = hidden.shape[1], model.config.num_attention_heads, model.config.num_key_value_heads
    dim = model.config.hidden_size // heads
    q = attn.q_proj(hidden).view(1, length, heads, dim).transpose(1, 2)
    k = attn.k_proj(hidden).view(1, length, kv_heads, dim).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    cos, sin = model.get_model().rotary_emb(hidden, positions[None])
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    text_query = q[0][:, length - 1, :].unsqueeze(1)
    weights = torch.matmul(text_query, k[0].transpose(1, 2)) / math.sqrt(dim)
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32)
    attention_avg_text = torch.mean(weights, dim=0)[:, start : start + current].mean(dim=0)
    top = (attention_avg_text.topk(keep_length).indices + start).sort().values
    return torch.cat((torch.arange(start), top, torch.arange(start + current, length)))


@torch.no_grad()
def reference(model, embeds: torch.Tensor, visual: torch.Tensor, config: PruningConfig):
    """(kept visual positions per pruning layer, greedy tokens, logits per step) for one unpadded sample."""
    decoder = HandDecoder(model)
    start = int(visual.nonzero()[0, 0])
    n = int(visual.sum())
    hidden, held = embeds[None], torch.arange(embeds.shape[0])  # held: original index of each current token
    positions = held.clone()
    state = {"probs": {}, "keys": {}}
    kept, shift = {}, {}  # per layer: positions subtracted while decoding (PyramidDrop renumbers)
    current, dropped = n, 0
    pdrop_layers = [int(x) for x in config.pdrop_layers.split(",")] if config.llm_pruning == "pdrop" else []
    for index in range(len(model.get_model().layers)):
        state["hidden"] = hidden
        order = None
        if config.llm_pruning == "fastv" and index == config.fastv_k:
            order = official_fastv(config, n, start, state)
        elif config.llm_pruning == "dart" and index == config.dart_k:
            order = official_dart(config, n, start, state, model)
        elif index in pdrop_layers:
            stage = pdrop_layers.index(index)
            order = official_pdrop_stage(config, stage, n, start, current, state, model, positions)
        if order is not None:
            hidden, held = hidden[:, order], held[order]
            new_current = int(((held >= start) & (held < start + n)).sum())
            dropped += current - new_current
            current = new_current
            kept[index] = [int(p) for p in held if start <= p < start + n]
            # FastV / DART keep the original positions; PyramidDrop numbers the sequence 0..L'-1
            positions = torch.arange(len(held)) if config.llm_pruning == "pdrop" else held.clone()
        shift[index] = dropped if config.llm_pruning == "pdrop" else 0
        hidden, probs, keys = decoder.step(index, hidden, positions)
        state["probs"][index], state["keys"][index] = probs, keys
    eos = model.generation_config.eos_token_id  # generate runs with min_new_tokens: EOS is never chosen

    def greedy(scores: torch.Tensor) -> int:
        return int(scores.masked_fill(torch.arange(len(scores)) == eos, -math.inf).argmax())

    logits = [decoder.logits(hidden)]
    tokens = [greedy(logits[-1])]
    for step in range(NEW_TOKENS - 1):
        hidden = model.get_model().embed_tokens(torch.tensor([[tokens[-1]]]))
        for index in range(len(model.get_model().layers)):
            position = torch.tensor([embeds.shape[0] + step - shift[index]])
            hidden = decoder.step(index, hidden, position)[0]
        logits.append(decoder.logits(hidden))
        tokens.append(greedy(logits[-1]))
    return kept, tokens, torch.stack(logits)


# ---- running our implementation, with the kept tokens recorded ----------------------------------------------------
def recording(monkeypatch, name: str) -> dict[int, list[list[int]]]:
    """Swap the registered class for a subclass that records, per layer, each row's kept visual prompt indices."""
    method = registry.get("llm_pruning", name)
    record: dict[int, list[list[int]]] = {}

    class Recorder(method.implementation):
        def keep(self, view):
            mask = super().keep(view)
            if mask is not None:
                kept = mask & view.visual
                record[view.index] = [view.prompt_index[r][kept[r]].tolist() for r in range(mask.shape[0])]
            return mask

    monkeypatch.setitem(registry._METHODS["llm_pruning"], name, dataclasses.replace(method, implementation=Recorder))
    return record


REFERENCE_CASES = {
    "fastv": {"llm_pruning": "fastv"},  # the official defaults: K = 2, R = 50 %
    "fastv-tokens-k3": {"llm_pruning": "fastv", "fastv_k": 3, "llm_tokens": 9},
    "fastv-paper-query": {"llm_pruning": "fastv", "fastv_query": "all", "fastv_ratio": 0.75},
    "pdrop": {"llm_pruning": "pdrop", "pdrop_layers": "1,3,5"},  # the official ratios 0.5, 0.25, 0.125
    "pdrop-tokens": {"llm_pruning": "pdrop", "pdrop_layers": "2,4", "pdrop_ratios": "0.6,0.3", "llm_tokens": 20},
    "dart": {"llm_pruning": "dart", "llm_tokens": 24},  # 24 // 8 = 3 tokens per pivot
    "dart-k3": {"llm_pruning": "dart", "dart_k": 3, "llm_tokens": 16, "dart_pivot_image": 2, "dart_pivot_text": 2},
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES), ids=list(REFERENCE_CASES))
def test_each_method_equals_its_official_rule(deep, images, monkeypatch, case) -> None:
    tokenizer, model, processor = deep
    config = PruningConfig(**REFERENCE_CASES[case])
    record = recording(monkeypatch, config.llm_pruning)
    input_ids, mask, pixels, sizes = batch_inputs(model, tokenizer, processor, images[:1], QUESTIONS[1:2])
    with torch.no_grad():
        merged = model.merge_multimodal(input_ids, mask, None, pixels, sizes, "left", config)
        out = model.generate(
            input_ids, attention_mask=mask, images=pixels, image_sizes=sizes, pruning=config, do_sample=False,
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, return_dict_in_generate=True, output_logits=True,
            return_stats=True,
        )  # fmt: skip
    kept, tokens, logits = reference(model, merged.inputs_embeds[0], merged.visual_mask[0], config)
    assert record and {layer: rows[0] for layer, rows in record.items()} == kept
    assert out.sequences[0].tolist() == tokens
    torch.testing.assert_close(torch.stack(out.raw.logits, dim=1)[0], logits, atol=1e-5, rtol=1e-5)
    per_layer = out.token_stats[0]["visual_per_layer"]
    held = [64] * LAYERS
    for layer, positions in kept.items():
        held[layer:] = [len(positions)] * (LAYERS - layer)
    assert per_layer == held


def test_the_references_drop_what_the_official_defaults_say(deep, images, monkeypatch) -> None:
    """The counts the defaults give on 64 visual tokens: FastV 32 from layer 2; PDrop int(64 * 0.5^s); DART keeps
    its 4 image pivots plus 8 pivots x (budget // 8)."""
    tokenizer, model, processor = deep
    expected = {
        "fastv": [64, 64, 32, 32, 32, 32],
        "pdrop-3-4-5": [64, 64, 64, 32, 16, 8],
        "dart-16": [64, 64, 20, 20, 20, 20],
        "dart-default": [64, 64, 60, 60, 60, 60],  # min(128, 64 - 4) // 8 = 7 per pivot: 4 + 56
    }
    configs = {
        "fastv": {"llm_pruning": "fastv"},
        "pdrop-3-4-5": {"llm_pruning": "pdrop", "pdrop_layers": "3,4,5"},
        "dart-16": {"llm_pruning": "dart", "llm_tokens": 16},
        "dart-default": {"llm_pruning": "dart"},
    }
    prompts = [build_prompt(QUESTIONS[0], "vicuna_v1", model_config=model.config)]
    for name, config in configs.items():
        answer = generate_answers(model, tokenizer, processor, prompts, images[:1], pruning=config, max_new_tokens=2)
        assert answer[0].token_stats["visual_per_layer"] == expected[name], name


# ---- batches, stage 1, stage 2 ----------------------------------------------------------------------------------
BATCH_CASES = {
    "fastv": {"llm_pruning": "fastv", "fastv_k": 3, "fastv_ratio": 0.7},
    "pdrop": {"llm_pruning": "pdrop", "pdrop_layers": "1,3,5"},
    "dart": {"llm_pruning": "dart", "llm_tokens": 24},
    "fastv+stage1": {"llm_pruning": "fastv", "visual_pruning": "longtail", "alpha": 0.5, "visual_layer": 2},
    "pdrop+stage1": {
        **{"llm_pruning": "pdrop", "pdrop_layers": "2,4", "pdrop_ratios": "0.5,0.25"},
        **{"visual_pruning": "topk", "visual_topk": 40, "visual_layer": 2},
    },
    "dart+stage1": {"llm_pruning": "dart", "visual_pruning": "longtail", "alpha": 0.4, "visual_layer": 2},
}


def answers(model, tokenizer, processor, images, config, questions=QUESTIONS):
    prompts = [build_prompt(q, "vicuna_v1", model_config=model.config) for q in questions]
    return generate_answers(model, tokenizer, processor, prompts, images, pruning=config, max_new_tokens=3)


@pytest.mark.parametrize("case", list(BATCH_CASES), ids=list(BATCH_CASES))
def test_a_batch_of_four_equals_four_single_runs(deep, images, case) -> None:
    tokenizer, model, processor = deep
    config = BATCH_CASES[case]
    batch = answers(model, tokenizer, processor, images, config)
    for row, (image, question) in enumerate(zip(images, QUESTIONS)):
        single = answers(model, tokenizer, processor, [image], config, [question])[0]
        assert batch[row].text == single.text
        assert batch[row].token_stats == single.token_stats
    stats = [answer.token_stats for answer in batch]
    if "visual_pruning" in config:  # the LLM-side method starts from each sample's stage-1 count
        assert len({s["visual_after"] for s in stats}) > 1 or config["visual_pruning"] == "topk"
        assert all(s["visual_per_layer"][0] == s["visual_after"] < s["visual_before"] for s in stats)
    if config["llm_pruning"] == "fastv" and "visual_pruning" in config:
        assert all(s["visual_per_layer"][2] == round(s["visual_after"] * 0.5) for s in stats)


@pytest.mark.parametrize("name", ["fastv", "pdrop", "dart"])
def test_a_text_only_row_keeps_everything_and_batches(deep, images, name) -> None:
    tokenizer, model, processor = deep
    prompts = [
        build_prompt(QUESTIONS[1], "vicuna_v1", model_config=model.config),
        build_prompt("Tell me a story about a cat.", "vicuna_v1", num_images=0, model_config=model.config),
    ]
    config = BATCH_CASES[name]
    batch = generate_answers(model, tokenizer, processor, prompts, [images[0], None], pruning=config, max_new_tokens=4)
    for row, image in enumerate([images[0], None]):
        single = generate_answers(model, tokenizer, processor, prompts[row : row + 1], [image], pruning=config,
                                  max_new_tokens=4)[0]  # fmt: skip
        assert batch[row].text == single.text and batch[row].token_stats == single.token_stats
    assert batch[1].token_stats["visual_per_layer"] == [0] * LAYERS


@pytest.mark.parametrize("name", ["fastv", "pdrop", "dart"])
def test_with_stage_2_each_layer_evicts_within_its_own_prompt(deep, images, name) -> None:
    """--kv-pruning h2o on top: each decoder layer's KV budget comes from the tokens that layer saw (its cache holds
    min(P_l + G - 1, floor(0.4 P_l)) keys), and a batch of four equals four single runs."""
    tokenizer, model, processor = deep
    config = PruningConfig(**BATCH_CASES[name], kv_pruning="h2o", heavy_ratio=0.2, recent_ratio=0.2)
    batch = answers(model, tokenizer, processor, images, config)
    for row, (image, question) in enumerate(zip(images, QUESTIONS)):
        single = answers(model, tokenizer, processor, [image], config, [question])[0]
        assert batch[row].text == single.text and batch[row].token_stats == single.token_stats
    plain = answers(model, tokenizer, processor, images, PruningConfig(**BATCH_CASES[name]))
    assert [a.token_stats["visual_per_layer"] for a in batch] == [a.token_stats["visual_per_layer"] for a in plain]
    for answer in batch:
        prompt = answer.token_stats["prompt"]
        assert answer.token_stats["kv_final"] == min(prompt + answer.token_stats["generated"], math.floor(0.4 * prompt))

    input_ids, mask, pixels, sizes = batch_inputs(model, tokenizer, processor, images[:2], QUESTIONS[:2])
    with torch.no_grad():
        out = model.generate(
            input_ids, attention_mask=mask, images=pixels, image_sizes=sizes, pruning=config, do_sample=False,
            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, return_dict_in_generate=True, return_stats=True,
        )  # fmt: skip
    cache = out.raw.past_key_values
    for row, stats in enumerate(out.token_stats):
        for layer, visual in enumerate(stats["visual_per_layer"]):
            seen = stats["prompt"] - (stats["visual_per_layer"][0] - visual)  # the prompt tokens this layer saw
            assert cache.layers[layer].counts[row] == min(seen + NEW_TOKENS - 1, math.floor(0.4 * seen))


# ---- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"llm_pruning": "fastv", "fastv_k": 0}, r"fastv_k must be >= 1, got 0 \(--fastv-k\)"),
        ({"llm_pruning": "fastv", "fastv_ratio": 1.5}, r"fastv_ratio must be in \[0, 1\], got 1\.5 \(--fastv-ratio\)"),
        ({"llm_pruning": "fastv", "llm_tokens": 0}, r"llm_tokens must be >= 1, got 0 \(--llm-tokens\)"),
        (
            {"llm_pruning": "fastv", "fastv_query": "first"},
            r"fastv_query must be one of last, all, got 'first' \(--fastv-query\)",
        ),
        ({"llm_pruning": "pdrop", "pdrop_layers": "8,4"}, r"pdrop_layers must be comma-separated increasing .*"),
        ({"llm_pruning": "pdrop", "pdrop_layers": "0,4"}, r"\(--pdrop-layers\)"),
        ({"llm_pruning": "pdrop", "pdrop_ratios": "0.5,0.7"}, r"pdrop_ratios must be .*non-increasing.*"),
        ({"llm_pruning": "pdrop", "pdrop_ratios": "0.5,0.25"}, r"one ratio per layer.*--pdrop-layers, --pdrop-ratios"),
        ({"llm_pruning": "dart", "dart_pivot_image": 0, "dart_pivot_text": 0}, r"at least one pivot.*--dart-pivot"),
        ({"llm_pruning": "dart", "dart_k": -1}, r"dart_k must be >= 1, got -1 \(--dart-k\)"),
    ],
)
def test_bad_settings_name_their_flag(config, message) -> None:
    with pytest.raises(PruningConfigError, match=message):
        PruningConfig.from_dict(config, source="cfg.json")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"llm_pruning": "fastv", "fastv_k": 6},
            r"fastv_k 6 is not a decoder layer of this model, which has 6 \(0\.\.5\) ",
        ),
        ({"llm_pruning": "pdrop"}, r"pdrop_layers 24 is not a decoder layer .*\(--pdrop-layers\)"),
        ({"llm_pruning": "dart", "dart_k": 9}, r"dart_k 9 is not a decoder layer .*\(--dart-k\)"),
        ({"llm_pruning": "fastv", "llm_tokens": 65}, r"llm_tokens 65 is above the 64 visual tokens .*\(--llm-tokens\)"),
    ],
)
def test_settings_the_model_cannot_meet_name_their_flag(deep, images, config, message) -> None:
    tokenizer, model, processor = deep
    with pytest.raises(PruningConfigError, match=message):
        answers(model, tokenizer, processor, images[:1], config, QUESTIONS[:1])


# ---- entry points --------------------------------------------------------------------------------------------------
RUNNER_FLAGS = {
    "fastv": ["--fastv-k", "2", "--fastv-ratio", "0.75"],
    "pdrop": ["--pdrop-layers", "1,3", "--pdrop-ratios", "0.5,0.25"],
    "dart": ["--llm-tokens", "16"],
}
RUNNER_COUNTS = {
    "fastv": [64, 64, 16, 16, 16, 16],
    "pdrop": [64, 32, 32, 16, 16, 16],
    "dart": [64, 64, 20, 20, 20, 20],
}


def run_loader(ckpt: Path, images, tmp_path: Path, *flags: str) -> Path:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"img_{i}.png")
    rows = [{"question_id": i, "image": f"img_{i}.png", "text": q} for i, q in enumerate(QUESTIONS)]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    answers_file = tmp_path / "answers.jsonl"
    argv = ["--model-path", str(ckpt), "--question-file", str(questions), "--image-folder", str(folder)]
    argv += ["--answers-file", str(answers_file), "--temperature", "0", "--max_new_tokens", "3", "--no-progress"]
    assert model_vqa_loader.main([*argv, "--batch-size", "4", *flags]) == len(rows)
    return answers_file


@pytest.mark.parametrize("name", list(RUNNER_FLAGS))
def test_each_method_runs_through_a_runner_flag(deep_ckpt, images, tmp_path, name) -> None:
    answers_file = run_loader(deep_ckpt, images, tmp_path, "--llm-pruning", name, *RUNNER_FLAGS[name])
    lines = [json.loads(line) for line in answers_file.read_text(encoding="utf-8").splitlines()]
    assert [line["tokens"]["visual_per_layer"] for line in lines] == [RUNNER_COUNTS[name]] * len(QUESTIONS)
    record = json.loads(answers_file.with_name("answers.run.json").read_text(encoding="utf-8"))
    assert record["pruning"]["llm_pruning"] == name


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--llm-tokens", "65"], r"error: .*llm_tokens 65 is above the 64 visual tokens .*\(--llm-tokens\)"),
        (["--fastv-k", "9"], r"error: .*fastv_k 9 is not a decoder layer of this model, which has 6 .*\(--fastv-k\)"),
    ],
)
def test_settings_the_model_cannot_meet_stop_the_runner_before_writing(deep_ckpt, images, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message) as stop:
        run_loader(deep_ckpt, images, tmp_path, "--llm-pruning", "fastv", *flags)
    assert stop.value.code == INPUT_ERROR_STATUS  # one error line, no traceback
    answers_file = tmp_path / "answers.jsonl"
    assert not answers_file.exists() or answers_file.read_text(encoding="utf-8") == ""


def test_every_entry_point_takes_the_flags() -> None:
    """Every command line that loads a model builds its pruning flags from the registry (pruning.add_pruning_args)."""
    from llava.eval import run_llava
    from llava.serve import cli

    flags = ["--llm-pruning", "pdrop", "--pdrop-layers", "2,4", "--pdrop-ratios", "0.5,0.2", "--llm-tokens", "64"]
    common = ["--model-path", "m", "--image-file", "i.png"]
    for args in (run_llava.parse_args([*common, "--query", "q", *flags]), cli.parse_args([*common, *flags])):
        assert (args.llm_pruning, args.pdrop_layers, args.pdrop_ratios, args.llm_tokens) == (
            "pdrop",
            "2,4",
            "0.5,0.2",
            64,
        )
    options = parse_model_args({"pretrained": "m", "llm_pruning": "dart", "dart_k": 3, "llm_tokens": 64})  # lmms-eval
    assert options.pruning == {"llm_pruning": "dart", "dart_k": 3, "llm_tokens": 64}


def test_llava16_drops_over_all_crops(tmp_path_factory, images) -> None:
    spec = TinySpec(layers=4)
    ckpt = write_tiny_llava_next(tmp_path_factory.mktemp("llm16") / "llava-v1.6-vicuna-tiny", spec, seed=1)
    tokenizer, model, processor, _ = load_pretrained_model(str(ckpt), None, None, device="cpu")
    pdrop = {"llm_pruning": "pdrop", "pdrop_layers": "1,2", "pdrop_ratios": "0.5,0.25"}
    pair, questions = images[1:3], QUESTIONS[1:3]  # a tall image and a square one: different crop counts
    for config in ({"llm_pruning": "fastv"}, pdrop, {"llm_pruning": "dart"}):
        batch = answers(model, tokenizer, processor, pair, config, questions)
        for row, (image, question) in enumerate(zip(pair, questions)):
            single = answers(model, tokenizer, processor, [image], config, [question])[0]
            assert batch[row].text == single.text and batch[row].token_stats == single.token_stats
        assert batch[0].token_stats["visual_after"] != batch[1].token_stats["visual_after"]
        for answer in batch:
            per_layer, n = answer.token_stats["visual_per_layer"], answer.token_stats["visual_after"]
            assert per_layer[0] == n > 64  # every crop's tokens and the row separators reach the LLM
            if config["llm_pruning"] == "fastv":
                assert per_layer[2:] == [round(n / 2)] * 2
            elif config["llm_pruning"] == "pdrop":
                assert per_layer[1:] == [n // 2, n // 4, n // 4]
            else:
                assert per_layer[2:] == [4 + 8 * (min(128, n - 4) // 8)] * 2
