"""Analytic FLOPs of the language model under visual-token exit plans.

The convention is the one in docs/methods.md §11 ("FLOPs model"), chosen so that the
numbers reproduce the published ShortV / VTW / FastV tables for LLaVA-1.5-7B:

* Only the decoder layers are counted. The vision tower, the projector, norms,
  RoPE, softmax and activations are left out; they are small, and the papers
  leave them out too. The ``lm_head`` is optional and off by default.
* One decoder layer with ``n`` tokens costs, in multiply-adds (MACs),
  ``MAC(n) = 4·n·d² + 2·n²·d + 3·n·d·m`` with a SwiGLU FFN (three matrices).
  FLOPs are ``2 · MAC``. The attention term is the full ``n²``, not halved for
  causality, because that is what the published ratios use.
* Grouped-query attention replaces ``4·n·d²`` with ``2·n·d² + 2·n·d·d_kv``,
  ``d_kv = num_kv_heads · head_dim``.

Every method changes only how many query rows and key columns a layer sees, so
the single primitive is :func:`layer_macs` with separate query and key counts:
``MAC(n) = layer_macs(n, n)`` and ShortV's frozen layer
``MAC_f = 2nd² + 2n_t·d² + 2n_t·n·d + 3n_t·d·m = layer_macs(n_t, n)``.
When ``num_heads · head_dim`` differs from ``hidden_size`` the Q/O projections
and the attention products use the attention width, so the formula stays exact
for such models and reduces to §11 for the usual ones.

Decode is stated separately from prefill (§11), by
:func:`decode_flops_per_token`; see its docstring for what it counts.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "DecoderDims",
    "ExitPlan",
    "batch_prefill_flops",
    "decode_flops_per_token",
    "exit_flops_ratios",
    "flops_ratio",
    "token_counts",
    "layer_macs",
    "prefill_flops",
    "visual_tokens_per_layer",
]


def _as_int(value: Any, name: str) -> int:
    """Coerce integer-like values (numpy/torch scalars) while refusing floats and bools.

    A float token count is almost always a bug upstream (e.g. a mean taken too early),
    so it is rejected rather than silently truncated.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def _non_negative(value: Any, name: str) -> int:
    out = _as_int(value, name)
    if out < 0:
        raise ValueError(f"{name} must be >= 0, got {out}")
    return out


def _positive(value: Any, name: str) -> int:
    out = _as_int(value, name)
    if out <= 0:
        raise ValueError(f"{name} must be >= 1, got {out}")
    return out


@dataclass(frozen=True)
class DecoderDims:
    """The few decoder sizes the FLOPs model needs, independent of the model family."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 0

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            object.__setattr__(self, name, _positive(getattr(self, name), name))
        object.__setattr__(self, "vocab_size", _non_negative(self.vocab_size, "vocab_size"))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def attn_dim(self) -> int:
        """Width of the concatenated query heads (= hidden_size for LLaMA/Qwen2)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V); smaller than attn_dim under GQA."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config: Any) -> DecoderDims:
        """Read the language model's sizes from a HF config.

        Multimodal configs (Llava, LlavaNext, Qwen2-VL, Qwen2.5-VL) nest the decoder
        in ``text_config``; ``get_text_config(decoder=True)`` finds it for all of them
        and returns a bare text config unchanged. ``num_key_value_heads`` and
        ``head_dim`` are optional in several families (Qwen2-VL stores ``None``), so
        they fall back to MHA and ``hidden_size // num_attention_heads``.
        """
        text = _text_config(config)
        hidden = _positive(_required(text, "hidden_size"), "hidden_size")
        heads = _positive(_required(text, "num_attention_heads"), "num_attention_heads")
        kv_heads = getattr(text, "num_key_value_heads", None)
        head_dim = getattr(text, "head_dim", None)
        if head_dim is None:
            if hidden % heads:
                raise ValueError(
                    f"config has no head_dim and hidden_size ({hidden}) is not divisible by "
                    f"num_attention_heads ({heads})"
                )
            head_dim = hidden // heads
        return cls(
            num_layers=_required(text, "num_hidden_layers"),
            hidden_size=hidden,
            intermediate_size=_required(text, "intermediate_size"),
            num_heads=heads,
            num_kv_heads=heads if kv_heads is None else kv_heads,
            head_dim=head_dim,
            vocab_size=getattr(text, "vocab_size", None) or 0,
        )


def _text_config(config: Any) -> Any:
    if hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return getattr(config, "text_config", None) or config


def _required(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    if value is None:
        raise ValueError(f"{type(config).__name__} has no {name!r}; cannot build DecoderDims from it")
    return value


@dataclass(frozen=True)
class ExitPlan:
    """How one prompt's visual tokens are reduced; the default is the full model.

    The fields compose per layer: VisPruner sets the count entering the LLM, FastV
    shrinks it from its layer on, and VTW removes what is left from ``exit_layer`` on.
    A FastV layer at or after ``exit_layer`` is legal and simply has no effect, so a
    learned gate that exits early can be combined with a fixed FastV layer (DyVTE +
    FastV, docs/methods.md §3.3). ShortV layers at or after ``exit_layer`` see no visual
    rows and cost the same as a plain text-only layer.
    """

    exit_layer: int | None = None
    kept_visual_tokens: int | None = None
    fastv: tuple[int, int] | None = None
    frozen_layers: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.exit_layer is not None:
            object.__setattr__(self, "exit_layer", _non_negative(self.exit_layer, "exit_layer"))
        if self.kept_visual_tokens is not None:
            kept = _non_negative(self.kept_visual_tokens, "kept_visual_tokens")
            object.__setattr__(self, "kept_visual_tokens", kept)
        if self.fastv is not None:
            object.__setattr__(self, "fastv", _check_fastv_shape(self.fastv))
        try:
            indices = list(self.frozen_layers)
        except TypeError:
            raise ValueError(
                f"frozen_layers must be a set of layer indices, got {self.frozen_layers!r}"
            ) from None
        frozen = frozenset(_non_negative(i, "frozen layer index") for i in indices)
        object.__setattr__(self, "frozen_layers", frozen)

    def validate(self, dims: DecoderDims, n_visual: int) -> None:
        """Check the bounds that depend on the model depth and the prompt's visual count."""
        n_layers = dims.num_layers
        if self.exit_layer is not None and self.exit_layer > n_layers:
            raise ValueError(f"exit_layer must be in [0, {n_layers}] (num_layers), got {self.exit_layer}")
        bad = sorted(i for i in self.frozen_layers if i >= n_layers)
        if bad:
            raise ValueError(f"frozen layer indices must be in [0, {n_layers - 1}], got {bad}")
        if self.kept_visual_tokens is not None and self.kept_visual_tokens > n_visual:
            raise ValueError(
                f"kept_visual_tokens must be in [0, n_visual={n_visual}], got {self.kept_visual_tokens}"
            )
        if self.fastv is not None:
            layer, kept = self.fastv
            if layer > n_layers:
                raise ValueError(f"FastV layer must be in [1, {n_layers}] (num_layers), got {layer}")
            entering = self.visual_entering(n_visual)
            if kept > entering:
                raise ValueError(
                    f"FastV kept tokens must be in [0, {entering}] (visual tokens entering the LLM), got {kept}"
                )

    def visual_entering(self, n_visual: int) -> int:
        """Visual tokens that reach layer 0 after pre-LLM pruning."""
        return n_visual if self.kept_visual_tokens is None else self.kept_visual_tokens


def _check_fastv_shape(fastv: Any) -> tuple[int, int]:
    try:
        layer, kept = fastv
    except (TypeError, ValueError):
        raise ValueError(f"fastv must be a (layer, kept_tokens) pair, got {fastv!r}") from None
    layer = _as_int(layer, "FastV layer")
    if layer < 1:
        # FastV ranks tokens with layer K-1's attention, so K=0 has nothing to rank with;
        # pruning before layer 0 is what kept_visual_tokens is for.
        raise ValueError(f"FastV layer must be >= 1 (it scores with layer K-1's attention), got {layer}")
    return layer, _non_negative(kept, "FastV kept tokens")


def _check_counts(n_text: Any, n_visual: Any) -> tuple[int, int]:
    return _non_negative(n_text, "n_text"), _non_negative(n_visual, "n_visual")


def layer_macs(dims: DecoderDims, n_query: int, n_kv: int, *, n_kv_projected: int | None = None) -> float:
    """Multiply-adds of one decoder layer with ``n_query`` rows attending to ``n_kv`` keys.

    Query rows pay the Q/O projections, the attention products and the FFN; key rows
    pay the K/V projections. Keeping the two counts apart is what lets one formula
    express a full layer (``n_query = n_kv = n``), a ShortV frozen layer (queries are
    the text rows only, keys are all rows) and a decode step.

    ``n_kv_projected`` is how many of the keys have their K/V computed in this call;
    it defaults to all of them (prefill). A decode step projects only the new token
    and reads the rest from the cache, so it passes 1.
    """
    n_query = _non_negative(n_query, "n_query")
    n_kv = _non_negative(n_kv, "n_kv")
    projected = n_kv if n_kv_projected is None else _non_negative(n_kv_projected, "n_kv_projected")
    if projected > n_kv:
        raise ValueError(f"n_kv_projected must be in [0, n_kv={n_kv}], got {projected}")
    d, a, kv = dims.hidden_size, dims.attn_dim, dims.kv_dim
    q_o_proj = 2 * n_query * d * a
    k_v_proj = 2 * projected * d * kv
    attention = 2 * n_query * n_kv * a  # Q·Kᵀ and A·V, full n_query × n_kv (not causal-halved)
    ffn = 3 * n_query * d * dims.intermediate_size
    return float(q_o_proj + k_v_proj + attention + ffn)


def visual_tokens_per_layer(dims: DecoderDims, n_visual: int, plan: ExitPlan = ExitPlan()) -> list[int]:
    """Visual tokens present in each layer's hidden states (and hence its KV cache).

    ShortV-frozen layers are not special here: their visual rows are still present and
    cached, they just receive no update.
    """
    n_visual = _non_negative(n_visual, "n_visual")
    plan.validate(dims, n_visual)
    counts = []
    current = plan.visual_entering(n_visual)
    for layer in range(dims.num_layers):
        if plan.fastv is not None and layer == plan.fastv[0]:
            current = min(current, plan.fastv[1])
        if plan.exit_layer is not None and layer >= plan.exit_layer:
            current = 0
        counts.append(current)
    return counts


def _lm_head_macs(dims: DecoderDims, rows: int) -> float:
    if dims.vocab_size <= 0:
        raise ValueError("include_lm_head=True needs DecoderDims.vocab_size > 0")
    return float(rows * dims.hidden_size * dims.vocab_size)


def prefill_flops(
    dims: DecoderDims,
    n_text: int,
    n_visual: int,
    plan: ExitPlan = ExitPlan(),
    include_lm_head: bool = False,
) -> float:
    """FLOPs of the prompt forward pass through the decoder under ``plan``.

    ``n_text`` counts every non-visual prompt token (system prefix, markers, question);
    ``n_visual`` counts the image/video placeholders before any pruning. The optional
    lm_head term covers one row, the last prompt position, because that is all
    ``generate`` asks for; teacher-forced scoring over all text rows is not counted.
    """
    n_text, n_visual = _check_counts(n_text, n_visual)
    macs = 0.0
    for layer, vis in enumerate(visual_tokens_per_layer(dims, n_visual, plan)):
        n = n_text + vis
        queries = n_text if layer in plan.frozen_layers else n
        macs += layer_macs(dims, queries, n)
    if include_lm_head:
        macs += _lm_head_macs(dims, 1)
    return 2.0 * macs


def decode_flops_per_token(
    dims: DecoderDims,
    n_text: int,
    n_visual: int,
    plan: ExitPlan = ExitPlan(),
    include_lm_head: bool = False,
    *,
    n_generated: int = 0,
) -> float:
    """FLOPs to generate one token after the prompt has been prefilled under ``plan``.

    Counted per layer: the new token's Q/K/V/O projections and FFN (one row) plus its
    attention over that layer's cache and itself. The cache length per layer follows
    §1.4: ``n_text + visual`` tokens below the exit layer, ``n_text`` from it on,
    ``n_text + kept`` after a FastV layer, ``n_text + T`` everywhere under VisPruner.
    ShortV layers count as normal layers, because freezing acts only in prefill and
    the visual K/V are cached in full. ``n_generated`` tokens produced earlier
    lengthen every layer's cache by the same amount. Decode is dominated by the
    weight terms, which is why withdrawal barely changes it; reporting it separately
    keeps prefill ratios comparable with the papers.
    """
    n_text, n_visual = _check_counts(n_text, n_visual)
    n_generated = _non_negative(n_generated, "n_generated")
    macs = 0.0
    for vis in visual_tokens_per_layer(dims, n_visual, plan):
        context = n_text + vis + n_generated + 1  # cached keys plus the new token itself
        macs += layer_macs(dims, 1, context, n_kv_projected=1)
    if include_lm_head:
        macs += _lm_head_macs(dims, 1)
    return 2.0 * macs


def flops_ratio(dims: DecoderDims, n_text: int, n_visual: int, plan: ExitPlan) -> float:
    """Prefill FLOPs of ``plan`` over the full model on the same, unpruned prompt (§11 ratios)."""
    full = prefill_flops(dims, n_text, n_visual, ExitPlan())
    if full == 0.0:
        raise ValueError("the prompt is empty (n_text + n_visual == 0); the ratio is undefined")
    return prefill_flops(dims, n_text, n_visual, plan) / full


def _as_int_list(values: Sequence[Any] | torch.Tensor, name: str) -> list[Any]:
    """Flatten a sequence or a 1-D tensor/array into a list without importing torch."""
    if hasattr(values, "tolist"):
        if getattr(values, "ndim", 1) != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
        return list(values.tolist())
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence or a 1-D tensor, got {type(values).__name__}")
    return list(values)


def batch_prefill_flops(
    dims: DecoderDims,
    n_text: Sequence[int] | torch.Tensor,
    n_visual: Sequence[int] | torch.Tensor,
    exit_layers: Sequence[int | None] | torch.Tensor,
    *,
    base_plan: ExitPlan = ExitPlan(),
    include_lm_head: bool = False,
) -> list[float]:
    """Per-sample prefill FLOPs when each sample withdraws at its own layer.

    This is the DyVTE statistic (§11): a gate that fires after layer ``e`` means
    ``exit_layer = e + 1``, and the caller does that conversion. A tensor cannot hold
    ``None``, so "never exited" is written as ``num_layers`` there, which costs the
    same. ``base_plan`` carries the parts shared by the batch (VisPruner T, FastV,
    ShortV layers); its ``exit_layer`` is replaced per sample.
    """
    texts = _as_int_list(n_text, "n_text")
    visuals = _as_int_list(n_visual, "n_visual")
    exits = _as_int_list(exit_layers, "exit_layers")
    if not len(texts) == len(visuals) == len(exits):
        raise ValueError(
            f"n_text, n_visual and exit_layers must have the same length, "
            f"got {len(texts)}, {len(visuals)} and {len(exits)}"
        )
    return [
        prefill_flops(dims, t, v, dataclasses.replace(base_plan, exit_layer=k), include_lm_head)
        for t, v, k in zip(texts, visuals, exits, strict=True)
    ]


def token_counts(visual: torch.Tensor, padding: torch.Tensor | None) -> tuple[list[int], list[int]]:
    """``(n_text, n_visual)`` per row of a prompt batch, padding excluded.

    ``visual``: ``[B, T]`` bool, True at visual positions; ``padding``: ``[B, T]`` with 1 at real
    tokens (None: no padding). These are the counts every FLOPs figure of a sample starts from.
    """
    real = visual.new_ones(visual.shape) if padding is None else padding.bool()
    n_visual = (visual & real).sum(1).tolist()
    n_text = (~visual & real).sum(1).tolist()
    return [int(n) for n in n_text], [int(n) for n in n_visual]


def exit_flops_ratios(
    config: Any, visual: torch.Tensor, padding: torch.Tensor | None, exit_layers: Sequence[int]
) -> torch.Tensor:
    """``[B, len(exit_layers)]`` prefill FLOPs ratio of exiting at each K, per sample (float32, on ``visual``'s device).

    ``config`` is the model's (or its text decoder's) HF config.
    """
    import torch

    dims = DecoderDims.from_config(config)
    n_text, n_visual = token_counts(visual, padding)
    rows = []
    for nt, nv in zip(n_text, n_visual, strict=True):
        full = prefill_flops(dims, nt, nv)
        rows.append([prefill_flops(dims, nt, nv, ExitPlan(exit_layer=k)) / full for k in exit_layers])
    return torch.tensor(rows, dtype=torch.float32, device=visual.device)
