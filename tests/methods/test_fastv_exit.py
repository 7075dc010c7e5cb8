"""FastV followed by an exit (DyVTE's FastV variant): a sample keeps FastV's tokens from FastV's layer
until its own exit. Checked against the hand-written reference loop, batched and alone, prefill and
cached decode, with fixed, per-sample and gated exits."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_LAYERS, mixed_specs
from engine_helpers import collate, singles
from reference_loop import reference_logits, with_tokens
from torch.testing import assert_close

import vtw_train
from vtw_train.engine import Reduction
from vtw_train.engine.grouped import REDUCED, TEXT, GroupedLayer
from vtw_train.errors import WithdrawalError
from vtw_train.gate import ExitGate, GateConfig, GateExitRule
from vtw_train.methods import FastV
from vtw_train.tiny_models import EOS_TOKEN_ID, tiny_model, visual_token_mask

L = NUM_LAYERS
FASTV = FastV(layer=2, keep_ratio=0.5)
# Per sample: exit after FastV, before FastV (pruning moot), never (FastV alone), at FastV's layer.
EXITS = [3, 1, L, 2]


def _choose(fastv: FastV):
    def choose(layer, hidden, cos, sin, visual):
        return fastv.select(layer, hidden, cos, sin, visual, None)[0]

    return choose


def _choose_as_on_the_prompt(model, sample, k, fastv: FastV):
    """FastV chooses once, at prefill, from the prompt's last token; a reference run over the prompt plus
    generated tokens must keep that choice (generated tokens are text and never pruned)."""
    chosen = {}

    def record(layer, hidden, cos, sin, visual):
        chosen["keep"] = fastv.select(layer, hidden, cos, sin, visual, None)[0]
        return chosen["keep"]

    reference_logits(model, sample, k, prune=(fastv.layer, record))

    def replay(layer, hidden, cos, sin, visual):
        keep = chosen["keep"]
        return torch.cat([keep, keep.new_zeros(visual.shape[1] - keep.numel())])

    return replay


def _reference(model, sample, k, fastv=FASTV):
    return reference_logits(model, sample, k, prune=(fastv.layer, _choose(fastv)))[0][0]


def _text_positions(model, batch, row):
    """Real (not padding) non-visual positions of one row: where the logits are compared."""
    ids = batch["input_ids"][row]
    real = batch["attention_mask"][row].bool()
    return ~visual_token_mask(model, ids) & real


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_fastv_then_per_sample_exits_equals_the_reference(family):
    model = tiny_model(family)
    controller = vtw_train.attach(model)
    samples = singles(model, mixed_specs(family))
    batch = collate(samples, "left")
    controller.reduction = Reduction(pruning=FASTV, exit_layer=torch.tensor(EXITS))
    with torch.no_grad():
        logits = model(**batch).logits
    assert controller.last_exit_layers.tolist() == EXITS
    for b, sample in enumerate(samples):
        want = _reference(model, sample, EXITS[b])
        assert_close(logits[b][_text_positions(model, batch, b)], want, atol=2e-5, rtol=1e-5)

    # The composition is not one of its parts: FastV alone and the exit alone give other logits.
    b = 0  # exits after FastV
    fastv_only = _reference(model, samples[b], None)
    exit_only = reference_logits(model, samples[b], EXITS[b])[0][0]
    got = logits[b][_text_positions(model, batch, b)]
    assert (got - fastv_only).abs().max() > 1e-4 and (got - exit_only).abs().max() > 1e-4


def test_fastv_then_a_fixed_exit_equals_the_reference_and_keeps_three_streams_in_the_cache():
    model = tiny_model("llava")
    controller = vtw_train.attach(model)
    samples = singles(model, mixed_specs("llava"))
    batch = collate(samples, "left")
    controller.reduction = Reduction(pruning=FASTV, exit_layer=3)
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    for b, sample in enumerate(samples):
        assert_close(
            out.logits[b][_text_positions(model, batch, b)],
            _reference(model, sample, 3),
            atol=2e-5,
            rtol=1e-5,
        )
    state = out.past_key_values.exit_state
    assert state.layer_streams == ["full", "full", REDUCED, TEXT]
    lengths = [int(layer.keys.shape[-2]) for layer in out.past_key_values.layers]
    assert lengths[0] == lengths[1] == batch["input_ids"].shape[1]
    assert lengths[3] < lengths[2] < lengths[1]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_generate_after_fastv_and_per_sample_exits_equals_the_reference(family):
    """Cached decode on a cache with full, reduced, text and grouped layers: every step's logits of every row
    are the reference's for that sample."""
    model = tiny_model(family)
    controller = vtw_train.attach(model)
    samples = singles(model, mixed_specs(family))
    batch = collate(samples, "left")
    controller.reduction = Reduction(pruning=FASTV, exit_layer=torch.tensor(EXITS))
    out = model.generate(
        **batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    cache = out.past_key_values
    assert any(
        isinstance(layer, GroupedLayer) and layer.groups[0].layout == REDUCED for layer in cache.layers
    )
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    logits = torch.stack(out.logits, dim=1)
    for b, sample in enumerate(samples):
        row = new[b]
        n = row.numel()
        if (row == EOS_TOKEN_ID).any():
            n = int((row == EOS_TOKEN_ID).nonzero()[0]) + 1
        replay = _choose_as_on_the_prompt(model, sample, EXITS[b], FASTV)
        ref, _ = reference_logits(
            model, with_tokens(sample, row[: n - 1]), EXITS[b], prune=(FASTV.layer, replay)
        )
        assert_close(logits[b, :n], ref[0, -n:], atol=2e-5, rtol=1e-5)
        # Alone, the sample generates the same tokens.
        controller.reduction = Reduction(pruning=FASTV, exit_layer=EXITS[b])
        alone = model.generate(**sample, max_new_tokens=4, do_sample=False)[0, sample["input_ids"].shape[1] :]
        assert row[: alone.numel()].tolist() == alone.tolist()
        controller.reduction = Reduction(pruning=FASTV, exit_layer=torch.tensor(EXITS))


def test_the_gate_after_fastv_decides_as_it_does_alone_and_matches_the_reference():
    model = tiny_model("llava")
    controller = vtw_train.attach(model)
    samples = singles(model, mixed_specs("llava"))
    batch = collate(samples, "left")
    torch.manual_seed(3)
    config = GateConfig(
        hidden_size=model.config.text_config.hidden_size, num_layers=L, width=8, min_layer=0, lag=0
    )
    gate = ExitGate(config)
    probe = GateExitRule(gate, tau=1.0)
    controller.reduction = Reduction(pruning=FASTV, exit_rule=probe)
    with torch.no_grad():
        model(**batch)
    p = torch.cat([v.flatten() for v in probe.last_probabilities.values()])
    tau = float(p.median())  # fires for some (sample, layer) pairs, not all
    controller.reduction = Reduction(pruning=FASTV, exit_rule=GateExitRule(gate, tau=tau))
    with torch.no_grad():
        logits = model(**batch).logits
    exits = controller.last_exit_layers.tolist()
    assert len(set(exits)) > 1, exits
    rule = controller.reduction.exit_rule
    assert FASTV.layer in rule.last_probabilities, "the gate was never asked in FastV's stream"
    for b, sample in enumerate(samples):
        with torch.no_grad():
            model(**sample)
        alone = controller.last_exit_layers  # None for the sample without an image: nothing to withdraw
        if alone is not None:
            assert alone.tolist() == [exits[b]], f"row {b} decides differently alone"
        assert_close(
            logits[b][_text_positions(model, batch, b)],
            _reference(model, sample, exits[b]),
            atol=2e-5,
            rtol=1e-5,
        )


def test_shortv_layers_after_fastv_are_refused():
    model = tiny_model("llava")
    controller = vtw_train.attach(model)
    with pytest.raises(WithdrawalError, match="frozen_layers \\[2, 3\\] come at or after FastV"):
        controller.reduction = Reduction(pruning=FASTV, frozen_layers={0, 2, 3})
    controller.reduction = Reduction(pruning=FASTV, frozen_layers={0}, exit_layer=3)  # before FastV: fine
