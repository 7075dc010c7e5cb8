"""Tests for vtw_train.flops against docs/methods.md §11 and hand-computed cases."""

from __future__ import annotations

from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch
import transformers

from vtw_train.flops import (
    DecoderDims,
    ExitPlan,
    batch_prefill_flops,
    decode_flops_per_token,
    flops_ratio,
    layer_macs,
    prefill_flops,
    visual_tokens_per_layer,
)

# LLaVA-1.5-7B worked example of docs/methods.md §11: n ≈ 636 with V = 576.
N_TEXT, N_VIS = 60, 576
SHORTV_7B = (31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19)  # §6.3, N=19


def _llava_7b_config() -> transformers.LlavaConfig:
    text = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
    )
    return transformers.LlavaConfig(text_config=text)


@pytest.fixture(scope="module")
def llava7b() -> DecoderDims:
    return DecoderDims.from_config(_llava_7b_config())


@pytest.fixture
def tiny() -> DecoderDims:
    # d=4, m=8, MHA. With n=5: MAC(5) = 4·5·16 + 2·25·4 + 3·5·4·8 = 320 + 200 + 480 = 1000.
    return DecoderDims(
        num_layers=2,
        hidden_size=4,
        intermediate_size=8,
        num_heads=2,
        num_kv_heads=2,
        head_dim=2,
        vocab_size=10,
    )


def _tflops(x: float) -> float:
    return x / 1e12


# --- from_config -----------------------------------------------------------------------------


def test_from_llava_config(llava7b: DecoderDims) -> None:
    assert llava7b == DecoderDims(32, 4096, 11008, 32, 32, 128, 32064)


def test_from_bare_text_config_equals_nested() -> None:
    cfg = _llava_7b_config()
    assert DecoderDims.from_config(cfg.text_config) == DecoderDims.from_config(cfg)


def test_from_qwen2vl_config_is_gqa() -> None:
    # Qwen2-VL-7B sizes; its text config stores head_dim=None, so it must be derived.
    text = dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    )
    dims = DecoderDims.from_config(transformers.Qwen2VLConfig(text_config=text))
    assert dims == DecoderDims(28, 3584, 18944, 28, 4, 128, 152064)
    assert dims.kv_dim == 512 and dims.attn_dim == 3584


def test_from_llava_next_and_qwen25_defaults() -> None:
    for cfg in (transformers.LlavaNextConfig(), transformers.Qwen2_5_VLConfig()):
        text = cfg.get_text_config()
        dims = DecoderDims.from_config(cfg)
        assert dims.num_layers == text.num_hidden_layers
        assert dims.hidden_size == text.hidden_size
        assert dims.num_kv_heads == text.num_key_value_heads


def test_from_duck_typed_config_and_missing_field() -> None:
    # Objects without get_text_config (e.g. a parsed JSON) work through .text_config or directly.
    text = SimpleNamespace(
        num_hidden_layers=2, hidden_size=8, intermediate_size=16, num_attention_heads=2, vocab_size=5
    )
    assert DecoderDims.from_config(SimpleNamespace(text_config=text)) == DecoderDims(2, 8, 16, 2, 2, 4, 5)
    del text.intermediate_size
    with pytest.raises(ValueError, match="no 'intermediate_size'"):
        DecoderDims.from_config(text)


# --- published worked example (§11), table precision -------------------------------------------


def test_vanilla_tflops(llava7b: DecoderDims) -> None:
    assert layer_macs(llava7b, 636, 636) / 1e12 == pytest.approx(0.132, abs=5e-4)
    assert layer_macs(llava7b, 60, 60) / 1e12 == pytest.approx(0.012, abs=5e-4)
    assert _tflops(prefill_flops(llava7b, N_TEXT, N_VIS)) == pytest.approx(8.45, abs=0.005)


def test_vtw_k16(llava7b: DecoderDims) -> None:
    plan = ExitPlan(exit_layer=16)
    assert _tflops(prefill_flops(llava7b, N_TEXT, N_VIS, plan)) == pytest.approx(4.61, abs=0.005)
    assert flops_ratio(llava7b, N_TEXT, N_VIS, plan) == pytest.approx(0.55, abs=0.005)


def test_vtw_ratio_depends_on_text_length(llava7b: DecoderDims) -> None:
    # §11: "with n ≈ 670, VTW K=16 comes to ≈57%".
    assert flops_ratio(llava7b, 670 - N_VIS, N_VIS, ExitPlan(exit_layer=16)) == pytest.approx(0.57, abs=0.005)


def test_fastv_k2_keep_half(llava7b: DecoderDims) -> None:
    plan = ExitPlan(fastv=(2, 288))
    assert _tflops(prefill_flops(llava7b, N_TEXT, N_VIS, plan)) == pytest.approx(4.81, abs=0.005)
    assert flops_ratio(llava7b, N_TEXT, N_VIS, plan) == pytest.approx(0.57, abs=0.005)


@pytest.mark.parametrize(("n_frozen", "ratio"), [(8, 0.81), (16, 0.62), (19, 0.55), (24, 0.43)])
def test_shortv(llava7b: DecoderDims, n_frozen: int, ratio: float) -> None:
    layers = SHORTV_7B[:n_frozen] if n_frozen <= len(SHORTV_7B) else range(32 - n_frozen, 32)
    plan = ExitPlan(frozen_layers=frozenset(layers))
    assert flops_ratio(llava7b, N_TEXT, N_VIS, plan) == pytest.approx(ratio, abs=0.005)


@pytest.mark.parametrize(
    ("kept", "alone", "with_vtw"), [(128, 0.29, 0.19), (64, 0.19, 0.14), (32, 0.14, 0.12)]
)
def test_vispruner_and_vtw(llava7b: DecoderDims, kept: int, alone: float, with_vtw: float) -> None:
    plan = ExitPlan(kept_visual_tokens=kept)
    assert flops_ratio(llava7b, N_TEXT, N_VIS, plan) == pytest.approx(alone, abs=0.005)
    both = ExitPlan(exit_layer=16, kept_visual_tokens=kept)
    assert flops_ratio(llava7b, N_TEXT, N_VIS, both) == pytest.approx(with_vtw, abs=0.005)


# --- hand-computed tiny model, exact ---------------------------------------------------------------


def test_tiny_layer_macs_exact(tiny: DecoderDims) -> None:
    assert layer_macs(tiny, 5, 5) == 1000.0
    assert layer_macs(tiny, 2, 2) == 4 * 2 * 16 + 2 * 4 * 4 + 3 * 2 * 4 * 8 == 352.0
    # ShortV MAC_f = 2nd² + 2n_t·d² + 2n_t·n·d + 3n_t·d·m with n=5, n_t=2.
    assert layer_macs(tiny, 2, 5) == 160 + 64 + 80 + 192 == 496.0
    # Decode: one query, K/V projected for one row, attention over 6 keys.
    assert layer_macs(tiny, 1, 6, n_kv_projected=1) == 32 + 32 + 48 + 96 == 208.0


def test_tiny_prefill_exact(tiny: DecoderDims) -> None:
    assert prefill_flops(tiny, 2, 3) == 2 * (1000 + 1000)
    assert prefill_flops(tiny, 2, 3, ExitPlan(exit_layer=1)) == 2 * (1000 + 352)
    assert prefill_flops(tiny, 2, 3, ExitPlan(frozen_layers=frozenset({1}))) == 2 * (1000 + 496)
    # FastV at layer 1 keeping 1 visual token: layer 1 sees n = 3, MAC(3) = 192 + 72 + 288.
    assert prefill_flops(tiny, 2, 3, ExitPlan(fastv=(1, 1))) == 2 * (1000 + 552)
    assert prefill_flops(tiny, 2, 3, include_lm_head=True) == 4000 + 2 * 4 * 10
    assert flops_ratio(tiny, 2, 3, ExitPlan(exit_layer=1)) == pytest.approx(2704 / 4000, rel=1e-12)


def test_tiny_decode_exact(tiny: DecoderDims) -> None:
    assert decode_flops_per_token(tiny, 2, 3) == 2 * (208 + 208)
    # From layer 1 on the cache holds the 2 text tokens; the new token attends to 3 keys.
    text_only_layer = 32 + 32 + 2 * 3 * 4 + 96
    assert decode_flops_per_token(tiny, 2, 3, ExitPlan(exit_layer=1)) == 2 * (208 + text_only_layer)
    # Two earlier generated tokens lengthen every cache by 2: 8 keys, attention 2·8·4 = 64.
    assert decode_flops_per_token(tiny, 2, 3, n_generated=2) == 2 * 2 * (32 + 32 + 64 + 96)
    assert decode_flops_per_token(tiny, 2, 3, include_lm_head=True) == 832 + 80


def test_gqa_exact() -> None:
    # d=8, 4 heads of 2, one KV head: d_kv = 2. §11: 4nd² -> 2nd² + 2nd·d_kv.
    dims = DecoderDims(1, 8, 16, 4, 1, 2)
    n = 3
    expected = 2 * n * 64 + 2 * n * 8 * 2 + 2 * n * n * 8 + 3 * n * 8 * 16
    assert layer_macs(dims, n, n) == expected == 1776.0
    mha = DecoderDims(1, 8, 16, 4, 4, 2)
    assert layer_macs(mha, n, n) - layer_macs(dims, n, n) == 2 * n * 8 * (8 - 2)


def test_attention_width_differs_from_hidden() -> None:
    # 2 heads of 8 on d=8 (attention width 16), one KV head (width 8), m=4, one token.
    dims = DecoderDims(1, 8, 4, 2, 1, 8)
    assert layer_macs(dims, 1, 1) == 2 * 8 * 16 + 2 * 8 * 8 + 2 * 16 + 3 * 8 * 4 == 512.0


# --- identities --------------------------------------------------------------------------------------


def test_exit_at_num_layers_equals_full(llava7b: DecoderDims) -> None:
    full = prefill_flops(llava7b, N_TEXT, N_VIS)
    assert prefill_flops(llava7b, N_TEXT, N_VIS, ExitPlan(exit_layer=32)) == full
    assert decode_flops_per_token(llava7b, N_TEXT, N_VIS, ExitPlan(exit_layer=32)) == decode_flops_per_token(
        llava7b, N_TEXT, N_VIS
    )
    assert prefill_flops(llava7b, N_TEXT, N_VIS, ExitPlan(fastv=(32, 0))) == full


def test_exit_at_zero_equals_text_only(llava7b: DecoderDims) -> None:
    plan = ExitPlan(exit_layer=0)
    assert prefill_flops(llava7b, N_TEXT, N_VIS, plan) == prefill_flops(llava7b, N_TEXT, 0)
    assert decode_flops_per_token(llava7b, N_TEXT, N_VIS, plan) == decode_flops_per_token(llava7b, N_TEXT, 0)
    assert prefill_flops(llava7b, N_TEXT, N_VIS, ExitPlan(kept_visual_tokens=0)) == prefill_flops(
        llava7b, N_TEXT, 0
    )


def test_vtw_cost_grows_with_exit_layer(llava7b: DecoderDims) -> None:
    costs = [prefill_flops(llava7b, N_TEXT, N_VIS, ExitPlan(exit_layer=k)) for k in range(33)]
    assert all(a < b for a, b in pairwise(costs))


def test_shortv_decode_is_normal(llava7b: DecoderDims) -> None:
    plan = ExitPlan(frozen_layers=frozenset(SHORTV_7B))
    assert decode_flops_per_token(llava7b, N_TEXT, N_VIS, plan) == decode_flops_per_token(
        llava7b, N_TEXT, N_VIS
    )


def test_decode_caches(llava7b: DecoderDims) -> None:
    full = decode_flops_per_token(llava7b, N_TEXT, N_VIS)
    vtw = decode_flops_per_token(llava7b, N_TEXT, N_VIS, ExitPlan(exit_layer=16))
    fastv = decode_flops_per_token(llava7b, N_TEXT, N_VIS, ExitPlan(fastv=(2, 288)))
    # Only the attention term changes: 2·a per cached key dropped, per layer.
    assert full - vtw == 2 * 2 * 4096 * N_VIS * 16
    assert full - fastv == 2 * 2 * 4096 * (N_VIS - 288) * 30
    # Decode is weight-bound: withdrawal saves a few percent, not the ~45% of prefill.
    assert 0.9 < vtw / full < 1.0
    weights = 2 * 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    assert full == weights + 2 * 32 * 2 * 4096 * (N_TEXT + N_VIS + 1)


def test_composed_layers() -> None:
    dims = DecoderDims(8, 16, 32, 2, 2, 8)
    plan = ExitPlan(exit_layer=6, kept_visual_tokens=10, fastv=(3, 4))
    assert visual_tokens_per_layer(dims, 20, plan) == [10, 10, 10, 4, 4, 4, 0, 0]
    # A FastV layer after the exit is allowed and has no effect (e.g. a gate firing early).
    early = ExitPlan(exit_layer=1, fastv=(2, 5))
    assert visual_tokens_per_layer(dims, 20, early) == [20] + [0] * 7
    # A frozen layer above the exit sees no visual rows: same cost as a text-only layer.
    frozen_late = ExitPlan(exit_layer=2, frozen_layers=frozenset({5}))
    assert prefill_flops(dims, 7, 20, frozen_late) == prefill_flops(dims, 7, 20, ExitPlan(exit_layer=2))


# --- batch ------------------------------------------------------------------------------------------


def test_batch_matches_single_calls(llava7b: DecoderDims) -> None:
    texts, visuals, exits = [60, 94, 40], [576, 576, 2880], [16, None, 0]
    single = [
        prefill_flops(llava7b, t, v, ExitPlan(exit_layer=k))
        for t, v, k in zip(texts, visuals, exits, strict=True)
    ]
    assert batch_prefill_flops(llava7b, texts, visuals, exits) == single


def test_batch_accepts_tensors_and_base_plan(llava7b: DecoderDims) -> None:
    exits = torch.tensor([3, 17, 32])
    base = ExitPlan(kept_visual_tokens=64)
    got = batch_prefill_flops(llava7b, torch.tensor([60, 60, 70]), [576] * 3, exits, base_plan=base)
    want = [
        prefill_flops(llava7b, t, 576, ExitPlan(exit_layer=k, kept_visual_tokens=64))
        for t, k in zip([60, 60, 70], [3, 17, 32], strict=True)
    ]
    assert got == want
    assert got[2] == prefill_flops(llava7b, 70, 576, base)


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (ExitPlan(exit_layer=33), r"exit_layer must be in \[0, 32\]"),
        (
            ExitPlan(frozen_layers=frozenset({3, 32})),
            r"frozen layer indices must be in \[0, 31\], got \[32\]",
        ),
        (ExitPlan(kept_visual_tokens=577), r"kept_visual_tokens must be in \[0, n_visual=576\]"),
        (ExitPlan(fastv=(33, 10)), r"FastV layer must be in \[1, 32\]"),
        (ExitPlan(kept_visual_tokens=64, fastv=(2, 100)), r"FastV kept tokens must be in \[0, 64\]"),
    ],
)
def test_plan_out_of_range(llava7b: DecoderDims, plan: ExitPlan, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        prefill_flops(llava7b, N_TEXT, N_VIS, plan)
    with pytest.raises(ValueError, match=message):
        decode_flops_per_token(llava7b, N_TEXT, N_VIS, plan)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exit_layer": -1}, "exit_layer must be >= 0"),
        ({"kept_visual_tokens": -5}, "kept_visual_tokens must be >= 0"),
        ({"fastv": (0, 10)}, "FastV layer must be >= 1"),
        ({"fastv": (2, -1)}, "FastV kept tokens must be >= 0"),
        ({"fastv": 2}, "fastv must be a"),
        ({"frozen_layers": frozenset({-1})}, "frozen layer index must be >= 0"),
        ({"frozen_layers": 3}, "frozen_layers must be a set"),
        ({"exit_layer": 2.5}, "exit_layer must be an integer"),
    ],
)
def test_plan_construction_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExitPlan(**kwargs)


def test_count_and_dims_errors(llava7b: DecoderDims, tiny: DecoderDims) -> None:
    with pytest.raises(ValueError, match="n_text must be >= 0"):
        prefill_flops(llava7b, -1, N_VIS)
    with pytest.raises(ValueError, match="n_visual must be >= 0"):
        decode_flops_per_token(llava7b, N_TEXT, -3)
    with pytest.raises(ValueError, match="n_visual must be an integer"):
        prefill_flops(llava7b, N_TEXT, 576.0)
    with pytest.raises(ValueError, match="n_generated must be >= 0"):
        decode_flops_per_token(llava7b, N_TEXT, N_VIS, n_generated=-1)
    with pytest.raises(ValueError, match="undefined"):
        flops_ratio(llava7b, 0, 0, ExitPlan())
    with pytest.raises(ValueError, match=r"n_kv_projected must be in \[0, n_kv=4\]"):
        layer_macs(tiny, 1, 4, n_kv_projected=5)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        DecoderDims(2, 8, 16, 4, 3, 2)
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        DecoderDims(0, 8, 16, 4, 4, 2)
    no_vocab = DecoderDims(2, 4, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="vocab_size > 0"):
        prefill_flops(no_vocab, 2, 3, include_lm_head=True)


def test_batch_errors(llava7b: DecoderDims) -> None:
    with pytest.raises(ValueError, match="same length, got 2, 2 and 1"):
        batch_prefill_flops(llava7b, [60, 60], [576, 576], [16])
    with pytest.raises(ValueError, match=r"exit_layer must be in \[0, 32\]"):
        batch_prefill_flops(llava7b, [60], [576], torch.tensor([40]))
    with pytest.raises(ValueError, match="exit_layers must be 1-D"):
        batch_prefill_flops(llava7b, [60], [576], torch.tensor([[16]]))
