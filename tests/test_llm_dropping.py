"""The --llm-pruning engine (pruning.llm.drop_tokens): dropping tokens between decoder layers at prefill, in a
left-padded batch, gives what a plain layer-by-layer run of each sample on its kept tokens gives, decode steps
included (positions of the full prompt, each layer's own KV cache)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from pruning import LayerDropper, LayerView, PruningConfig, drop_tokens

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    return model


class FixedDrops(LayerDropper):
    """Before each layer in ``plan``, keep the tokens whose prompt index is in that row's set."""

    def __init__(self, plan: dict[int, list[set[int]]]):
        super().__init__(PruningConfig())
        self.plan = plan
        self.seen: list[int] = []

    def keep(self, view: LayerView) -> torch.Tensor | None:
        self.seen.append(view.index)
        if view.index not in self.plan:
            return None
        wanted = torch.zeros_like(view.valid)
        for row, kept in enumerate(self.plan[view.index]):
            wanted[row] = torch.isin(view.prompt_index[row], torch.tensor(sorted(kept), dtype=torch.long))
        return wanted & view.valid


def prompts(model: LlamaForCausalLM, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Left-padded inputs_embeds [B, L, D] and attention mask [B, L] for prompts of these lengths."""
    generator = torch.Generator().manual_seed(1)
    rows = [model.model.embed_tokens(torch.randint(1, 64, (n,), generator=generator)).detach() for n in lengths]
    longest = max(lengths)
    embeds = torch.zeros(len(rows), longest, rows[0].shape[-1])
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for b, row in enumerate(rows):
        embeds[b, longest - len(row) :] = row
        mask[b, longest - len(row) :] = 1
    return embeds, mask, rows


@torch.no_grad()
def reference(model: LlamaForCausalLM, embeds: torch.Tensor, drops: dict[int, set[int]]) -> tuple[list, torch.Tensor]:
    """One sample, no padding, the decoder layers called one by one; before layer i the tokens outside drops[i] go."""
    inner, cache = model.model, DynamicCache(config=model.config)
    hidden, held = embeds[None], torch.arange(embeds.shape[0])
    cos, sin = inner.rotary_emb(hidden, position_ids=held[None])
    for index, layer in enumerate(inner.layers):
        if index in drops:
            keep = torch.tensor([int(p) in drops[index] for p in held])
            hidden, held, cos, sin = hidden[:, keep], held[keep], cos[:, keep], sin[:, keep]
        hidden = layer(
            hidden, attention_mask=None, position_embeddings=(cos, sin), past_key_values=cache, use_cache=True
        )
    logits = [model.lm_head(inner.norm(hidden[:, -1]))[0]]
    tokens = [int(logits[-1].argmax())]
    for step in range(NEW_TOKENS - 1):
        hidden = inner.embed_tokens(torch.tensor([[tokens[-1]]]))
        cos, sin = inner.rotary_emb(hidden, position_ids=torch.tensor([[embeds.shape[0] + step]]))
        for layer in inner.layers:
            hidden = layer(
                hidden, attention_mask=None, position_embeddings=(cos, sin), past_key_values=cache, use_cache=True
            )
        logits.append(model.lm_head(inner.norm(hidden[:, -1]))[0])
        tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)


@torch.no_grad()
def generate(model, embeds, mask, dropper, visual):
    with drop_tokens(model.model.layers, dropper, mask, visual) as state:
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    return out.sequences, torch.stack(out.logits, dim=1), state


@pytest.mark.parametrize(
    "layers",
    [{0: "half"}, {1: "half"}, {2: "half"}, {1: "half", 2: "quarter"}],
    ids=["before layer 0", "before layer 1", "before the last layer", "twice (pyramid)"],
)
def test_padded_batch_equals_per_sample_layer_by_layer_runs(llama, layers) -> None:
    lengths = [11, 7, 9]
    embeds, mask, rows = prompts(llama, lengths)
    visual = torch.zeros_like(mask, dtype=torch.bool)
    visual[:, -6:-1] = True  # the five tokens before the last one of each row
    plan: dict[int, list[set[int]]] = {}
    for layer, amount in layers.items():
        step = 2 if amount == "half" else 4
        pad = [embeds.shape[1] - n for n in lengths]
        # prompt indices of the padded batch; the last token always goes on
        plan[layer] = [{pad[b] + j for j in range(0, n, step)} | {pad[b] + n - 1} for b, n in enumerate(lengths)]
    for later in sorted(plan)[1:]:  # a later drop keeps a subset of what the earlier one kept
        earlier = max(layer for layer in plan if layer < later)
        plan[later] = [kept & plan[earlier][b] for b, kept in enumerate(plan[later])]
    dropper = FixedDrops(plan)
    sequences, logits, state = generate(llama, embeds, mask, dropper, visual)
    assert dropper.seen == [0, 1, 2]  # asked before every layer of the prefill, never during decoding
    for b, n in enumerate(lengths):
        pad = embeds.shape[1] - n
        drops = {layer: {p - pad for p in kept[b]} for layer, kept in plan.items()}
        tokens, expected = reference(llama, rows[b], drops)
        assert sequences[b].tolist() == tokens
        torch.testing.assert_close(logits[b], expected, atol=1e-5, rtol=1e-5)
    counts = state.visual_per_layer()
    for b, n in enumerate(lengths):
        pad = embeds.shape[1] - n
        visual_positions = set(range(pad + n - 6, pad + n - 1))
        held = set(range(pad, pad + n))
        for layer in range(3):
            if layer in plan:
                held &= plan[layer][b]
            assert counts[b][layer] == len(held & visual_positions)


def test_dropping_nothing_equals_the_plain_model(llama) -> None:
    embeds, mask, _ = prompts(llama, [5, 9])
    visual = mask.bool()
    plain = llama.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    sequences, _, state = generate(llama, embeds, mask, FixedDrops({}), visual)
    assert torch.equal(sequences, plain)
    assert state.visual_per_layer() == [[5, 5, 5], [9, 9, 9]]
    for layer in llama.model.layers:  # the hooks are gone after the call
        assert not layer._forward_pre_hooks


def test_bad_drops_are_refused(llama) -> None:
    embeds, mask, _ = prompts(llama, [6, 4])
    visual = mask.bool()

    class DropsLast(LayerDropper):
        def keep(self, view):  # noqa: ANN001, ANN202
            keep = view.valid.clone()
            keep[:, -1] = False
            return keep

    class WrongShape(LayerDropper):
        def keep(self, view):  # noqa: ANN001, ANN202
            return view.valid[:, 1:]

    with pytest.raises(ValueError, match="dropped a row's last token"):
        generate(llama, embeds, mask, DropsLast(PruningConfig()), visual)
    with pytest.raises(
        ValueError, match=r"WrongShape.keep returned torch.bool \(2, 5\); expected a bool mask \(2, 6\)"
    ):
        generate(llama, embeds, mask, WrongShape(PruningConfig()), visual)
    with pytest.raises(ValueError, match="masks given to drop_tokens are"):
        generate(llama, embeds, mask[:, 1:], FixedDrops({}), visual[:, 1:])
    llama.config._attn_implementation = "eager"
    try:
        with pytest.raises(ValueError, match="needs SDPA attention, found 'eager'"):
            generate(llama, embeds, mask, FixedDrops({}), visual)
    finally:
        llama.config._attn_implementation = "sdpa"
