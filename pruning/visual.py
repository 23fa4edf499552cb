"""The vision-side family: methods that decide which visual features reach the projector.

A vision-side method is a function ``reduce(context: VisionContext) -> ReducedPatches`` registered with
``register_vision_method``. The context runs the CLIP tower lazily, so a method reads what it needs and the tower
runs only as far as that: ``hidden_states(i)`` (any layer, e.g. to score or to match keys), ``features()`` (what
LLaVA feeds the projector, hidden_states[select_layer]), ``run_layers`` (to act inside the tower, as ToMe or the
'inside' mode do), the patch grid, the generator of random methods and, when the caller passes it, the question.
The method returns the patches to keep or merged patch features, per image, with the grid position each output
token is laid out at; ``select_visual_tokens`` checks the result and adds CLS when the checkpoint asks for it.
Today's CLS-score keep rules (pruning/strategies.py) are the simple case on top of this contract.

Layer convention (HF indexing): hidden_states[0] is the pre-layer-normed embedding, hidden_states[i] the output of
encoder.layers[i-1]. Only the layers some method asked for are run; upstream ran all 24 and threw the last one away.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch
from torch import nn

from pruning import registry
from pruning.config import PruningConfig
from pruning.packing import PACK_MULTIPLE, PackedLayout, attention_configs, packed_attention, packed_backend
from pruning.registry import Param

SELECT_FEATURES = ("patch", "cls_patch")


@dataclass
class ReducedPatches:
    """What a vision-side method returns for a batch of B images; rows are padded at the end.

    ``features`` [B, t, C]: kept (or merged) patch features, CLS excluded, zero on padding. ``mask`` [B, t]: True on
    real tokens, a prefix of every row; its row sums are the per-image counts. ``indices`` [B, t]: the patch (0..n-1)
    each token is laid out at on the grid (merged tokens: a representative patch), -1 on padding; LLaVA-1.6 places
    tokens on the image grid by it. Optional: ``cls`` [B, 1, C] when the method changed CLS (else CLS is taken from
    the select layer), ``inflection`` [B] (i* when the method computes one) and ``scores`` [B, n] (what ranked the
    patches), which token accounting and the figures read.
    """

    features: torch.Tensor
    mask: torch.Tensor
    indices: torch.Tensor
    cls: torch.Tensor | None = None
    inflection: torch.Tensor | None = None
    scores: torch.Tensor | None = None


@dataclass
class VisualSelection:
    """Kept visual tokens of a batch, one row per image, padded at the end.

    ``features`` [B, t, C] and ``mask`` [B, t] cover the output tokens: the kept patches (t = k_max), preceded by CLS
    when select_feature is "cls_patch" (t = 1 + k_max). ``indices`` [B, k_max] are the kept patch indices (0..n-1),
    -1 on padding. ``n`` and ``kept`` are [B] int64; ``inflection`` [B] int64 and ``scores`` [B, n] fp32 are what
    the method reported (None when it computes no i* / no scores).
    """

    features: torch.Tensor
    mask: torch.Tensor
    indices: torch.Tensor
    n: torch.Tensor
    inflection: torch.Tensor | None
    kept: torch.Tensor
    scores: torch.Tensor | None


class TextTower(Protocol):
    """The text side of the vision tower's model (CLIP's text tower and both projections), for text-guided methods.
    The caller loads it on the first call, so a run whose method never calls it never loads it."""

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[B, P] embeddings of the texts in the joint image-text space."""
        ...

    def project_patches(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vision tokens [B, t, D] (a tower layer's output) -> [B, t, P], the same space."""
        ...


@dataclass
class VisionContext:
    """One batch of images in the tower, for a vision-side method. Hidden states are computed on first use."""

    tower: nn.Module  # the CLIP vision transformer: embeddings, pre_layrnorm, encoder.layers
    pixel_values: torch.Tensor  # [B, 3, H, W]
    config: PruningConfig
    select_index: int  # hidden_states index of the features LLaVA feeds the projector (0..num_layers)
    generator: torch.Generator | None = None  # held by the caller across batches, for methods that draw
    text: Sequence[str] | None = None  # the question per image, when the caller passes it (None otherwise)
    select_feature: str = "patch"  # "cls_patch": select_visual_tokens puts the select layer's CLS first
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None  # [.., C] -> LLM space, when the caller passes it
    text_tower: TextTower | None = None  # CLIP's text side, when the caller passes it (text-guided methods)
    _states: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.tower.encoder.layers

    @property
    def num_patches(self) -> int:
        return self.hidden_states(0).shape[1] - 1

    @property
    def grid_side(self) -> int:
        """Patches per side of the square patch grid (patch j sits at row j // side, column j % side)."""
        config = self.tower.config
        return config.image_size // config.patch_size

    def hidden_states(self, index: int) -> torch.Tensor:
        """hidden_states[index], [B, 1 + n, D] with CLS first; runs only the layers not yet run.

        The select layer's output is kept whenever the tower passes it, so ``features()`` never reruns the tower.
        """
        if not 0 <= index <= len(self.layers):
            raise ValueError(f"hidden_states[{index}] does not exist in a tower with {len(self.layers)} layers")
        if 0 not in self._states:
            self._states[0] = self.tower.pre_layrnorm(self.tower.embeddings(self.pixel_values))
        start = max(i for i in self._states if i <= index)
        hidden = self._states[start]
        for position, layer in enumerate(self.layers[start:index], start=start + 1):
            hidden = layer(hidden, None)
            if position == self.select_index:
                self._states[position] = hidden
        self._states[index] = hidden
        return hidden

    def features(self) -> torch.Tensor:
        """The select layer's tokens [B, 1 + n, C], CLS first: what LLaVA projects with nothing pruned."""
        return self.hidden_states(self.select_index)

    def run_layers(
        self, tokens: torch.Tensor, start: int, stop: int, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """encoder.layers[start:stop] on any token set [B, t, D] (e.g. CLS + kept patches), with an optional
        additive [B, 1, t, t] mask; ``run_rows`` runs rows of different lengths."""
        if attention_mask is not None:
            check_mask_support(self.layers[start], attention_mask)
        for layer in self.layers[start:stop]:
            tokens = layer(tokens, attention_mask)
        return tokens

    def run_rows(self, tokens: torch.Tensor, start: int, stop: int, valid: torch.Tensor) -> torch.Tensor:
        """encoder.layers[start:stop] on rows of different lengths: ``tokens`` [B, t, D], ``valid`` [B, t] True on
        real tokens. The real tokens of all rows run packed in one sequence, each row attending to itself only
        (``pruning.packing``), so the layers do the work of the real tokens only; returns [B, t, D], zeros on
        padding. Rows of one length run as a batch; an attention without a packed variant (eager) runs padded with
        the padded keys masked out."""
        if bool(valid.all()):
            return self.run_layers(tokens, start, stop)
        layers = self.layers[start:stop]
        configs = attention_configs(layers)
        if any(packed_backend(config._attn_implementation) is None for config in configs):
            return self.run_layers(tokens, start, stop, key_padding_mask(valid, tokens.dtype))
        layout = PackedLayout.from_mask(valid, PACK_MULTIPLE)
        packed = layout.pack(tokens)[None]
        with packed_attention(configs):
            for layer in layers:
                packed = layer(packed, None, **layout.attention_kwargs())
        return layout.unpack(packed[0])


VisionReducer = Callable[[VisionContext], ReducedPatches]


def register_vision_method(
    name: str,
    *,
    params: Sequence[Param] = (),
    description: str,
    check: Callable[[PruningConfig], None] | None = None,
    detail: Callable[[PruningConfig], str] | None = None,
    reads_text: bool = True,
) -> Callable[[VisionReducer], VisionReducer]:
    """Decorator: register ``reduce(context) -> ReducedPatches`` as ``--visual-pruning NAME``.

    A method decides for each image on its own (a batch gives what single images give). ``reads_text=False`` says it
    never reads ``context.text``: then a batch's repeated images go through the tower once (several questions about
    one image); a method that reads the question keeps the default, and a repeated image with another question runs
    again.
    """
    return registry.method_decorator(
        "visual_pruning",
        name,
        params=params,
        description=description,
        check=check,
        detail=detail,
        reads_text=reads_text,
    )


def select_visual_tokens(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    config: PruningConfig,
    select_layer: int = -2,
    select_feature: str = "patch",
    generator: torch.Generator | None = None,
    text: Sequence[str] | None = None,
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
    text_tower: TextTower | None = None,
) -> VisualSelection:
    """Run the CLIP vision tower on pixel_values [B, 3, H, W] with the configured vision-side method.

    ``vision_model`` is duck-typed: transformers' ``CLIPVisionModel`` (5.x: embeddings, pre_layrnorm, encoder.layers
    on the model itself) or anything with a ``.vision_model`` that has them. ``generator`` feeds methods that draw
    (see ``pruning.strategies.apply_strategy``); ``projector`` (the model's multimodal projector) feeds methods that
    compare tokens in the LLM's input space (DivPrune); ``text`` (the question per image) and ``text_tower``
    feed text-guided methods (Recoverable Compression). Gradients flow into the kept features (a gather); wrap the call
    in ``torch.no_grad()`` for a frozen tower. Without gradients, a repeated image (and question, for a method that
    reads it) goes through the tower once, unless the method draws (``generator``); its rows get the same selection.
    """
    if select_feature not in SELECT_FEATURES:
        raise ValueError(f"unknown select_feature {select_feature!r}; choose one of {', '.join(SELECT_FEATURES)}")
    method = config.method("visual_pruning")
    if pixel_values.shape[0] > 1 and generator is None and not torch.is_grad_enabled():
        first, where = distinct_rows(pixel_values, text if method.reads_text else None)
        if len(first) < pixel_values.shape[0]:
            once = select_visual_tokens(
                vision_model,
                pixel_values[first],
                config,
                select_layer,
                select_feature,
                text=None if text is None else [text[i] for i in first],
                projector=projector,
                text_tower=text_tower,
            )
            return repeat_rows(once, where)
    tower = getattr(vision_model, "vision_model", vision_model)
    select_index = resolve_select_layer(select_layer, len(tower.encoder.layers))
    context = VisionContext(
        tower, pixel_values, config, select_index, generator, text, select_feature, projector, text_tower
    )
    reduced = method.implementation(context)
    kept = _check_reduced(reduced, method.name, pixel_values.shape[0], context.num_patches)

    patches = _zero_padding(reduced.features, reduced.mask)
    if select_feature == "cls_patch":
        cls = reduced.cls if reduced.cls is not None else context.features()[:, :1]
        features = torch.cat([cls, patches], dim=1)
        mask = with_cls(reduced.mask)
    else:
        features, mask = patches, reduced.mask
    batch = pixel_values.shape[0]
    return VisualSelection(
        features=features,
        mask=mask,
        indices=reduced.indices,
        n=torch.full((batch,), context.num_patches, dtype=torch.long, device=kept.device),
        inflection=reduced.inflection,
        kept=kept,
        scores=reduced.scores,
    )


def distinct_rows(pixel_values: torch.Tensor, text: Sequence[str] | None) -> tuple[list[int], torch.Tensor]:
    """The first row of each distinct (image, question) of a batch, and for every row the position of its own in that
    list: a benchmark asks several questions about one image (POPE: 6 per image and category, next to each other),
    and the tower needs to see it once. Rows are compared exactly, after a fingerprint (the sum of their bit patterns:
    integer, so the same for equal rows wherever they sit). Questions that do not pair up with the rows: no sharing."""
    rows = pixel_values.shape[0]
    if text is not None and len(text) != rows:  # the method reports it
        return list(range(rows)), torch.arange(rows, device=pixel_values.device)
    flat = pixel_values.flatten(1)
    fingerprints = flat.float().view(torch.int32).sum(dim=1, dtype=torch.int64).tolist()
    first: list[int] = []
    where: list[int] = []
    slots: dict[tuple[int, str | None], list[int]] = {}  # (fingerprint, question) -> positions in ``first``
    for row, fingerprint in enumerate(fingerprints):
        candidates = slots.setdefault((fingerprint, None if text is None else text[row]), [])
        same = next((slot for slot in candidates if torch.equal(flat[first[slot]], flat[row])), None)
        if same is None:
            same = len(first)
            first.append(row)
            candidates.append(same)
        where.append(same)
    return first, torch.tensor(where, dtype=torch.long, device=pixel_values.device)


def repeat_rows(selection: VisualSelection, where: torch.Tensor) -> VisualSelection:
    """The selection of the distinct rows, laid out again as the batch had them (row b is row ``where[b]``)."""

    def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.index_select(0, where.to(tensor.device))

    return VisualSelection(*(take(getattr(selection, f.name)) for f in fields(VisualSelection)))


def _check_reduced(reduced: ReducedPatches, name: str, batch: int, n: int) -> torch.Tensor:
    """The per-image counts [B] int64, after checking the shapes and invariants a method must keep."""
    where = f"visual_pruning {name!r}"
    if not isinstance(reduced, ReducedPatches):
        raise TypeError(f"{where} must return ReducedPatches, got {type(reduced).__name__}")
    t = reduced.mask.shape[-1] if reduced.mask.dim() == 2 else -1
    if reduced.features.dim() != 3 or reduced.features.shape[:2] != (batch, t) or reduced.mask.shape[0] != batch:
        raise ValueError(
            f"{where} returned features {tuple(reduced.features.shape)} and mask {tuple(reduced.mask.shape)}; "
            f"expected [{batch}, t, C] and [{batch}, t]"
        )
    if reduced.indices.shape != reduced.mask.shape:
        raise ValueError(
            f"{where} returned indices {tuple(reduced.indices.shape)}, expected {tuple(reduced.mask.shape)}"
        )
    kept = reduced.mask.sum(dim=1).long()
    prefix = torch.arange(t, device=kept.device)[None, :] < kept[:, None]
    if not torch.equal(prefix, reduced.mask.bool()):
        raise ValueError(f"{where} returned a mask that is not a prefix of each row (pad at the end)")
    if bool((kept < 1).any()) or bool((kept > n).any()):
        raise ValueError(f"{where} kept {kept.tolist()} tokens; every image keeps between 1 and n = {n}")
    return kept


# ---- helpers for methods ----------------------------------------------------------------------------------------------
def raster_order_indices(ranking: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep[b]`` best-ranked patch indices of each row, in raster order: (indices [B, k_max] with -1 padding,
    mask [B, k_max]). Equal ranks go to the earlier patch, so the choice is deterministic."""
    batch, n = ranking.shape
    order = torch.sort(ranking, dim=-1, descending=True, stable=True).indices  # [B, n] best first
    positions = torch.arange(n, device=ranking.device)
    chosen = torch.zeros_like(order, dtype=torch.bool).scatter_(1, order, positions < keep.unsqueeze(1))  # [B, n]
    # Kept patches sort first, each group by raster index.
    raster_first = torch.sort(torch.where(chosen, positions, positions + n), dim=-1).values
    k_max = int(keep.max())
    mask = positions[:k_max] < keep.unsqueeze(1)  # [B, k_max]
    indices = torch.where(mask, raster_first[:, :k_max], -1)
    return indices, mask


def gather_patches(patches: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """patches [B, n, D] -> [B, k_max, D] at ``indices``, zeros on padding."""
    gathered = torch.gather(patches, 1, indices.clamp(min=0).unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    return _zero_padding(gathered, mask)


def with_cls(mask: torch.Tensor) -> torch.Tensor:
    """[B, t] mask of kept patches -> [B, 1 + t]: CLS first, always real."""
    return torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)


def _zero_padding(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.unsqueeze(-1), tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))


def key_padding_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive [B, 1, t, t] mask hiding the keys that are not ``valid`` [B, t] (padding); None when none is."""
    if bool(valid.all()):
        return None
    blocked = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, torch.finfo(dtype).min)
    length = valid.shape[1]
    return blocked[:, None, None, :].expand(-1, 1, length, length)


def check_mask_support(layer: nn.Module, attention_mask: torch.Tensor | None) -> None:
    """Kernels other than eager / SDPA take no additive 4D mask; padded keys would silently be attended to."""
    implementation = getattr(getattr(layer.self_attn, "config", None), "_attn_implementation", None) or "eager"
    if attention_mask is not None and implementation not in ("eager", "sdpa"):
        raise ValueError(
            f"visual_mode 'inside' with samples keeping different counts needs 'sdpa' or 'flash_attention_*' (packed "
            f"rows) or 'eager' attention (padded rows, masked) in the vision tower, found {implementation!r}; load the "
            "tower with attn_implementation='sdpa' or use batch 1"
        )


def resolve_select_layer(select_layer: int, num_layers: int) -> int:
    """hidden_states index in 0..num_layers (-2 -> num_layers - 1, as upstream's hidden_states[-2])."""
    index = select_layer + num_layers + 1 if select_layer < 0 else select_layer
    if not 0 <= index <= num_layers:
        raise ValueError(
            f"select_layer {select_layer} is out of range for a tower with {num_layers} layers "
            f"(hidden_states has {num_layers + 1} entries)"
        )
    return index
