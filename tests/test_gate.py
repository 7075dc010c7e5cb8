"""The exit gate: size, causal decisions, and agreement between training and inference features."""

from __future__ import annotations

import pytest
import torch
from miniature import batches, build_miniature
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor, LlamaConfig

import vtw_train
from vtw_train.engine import Reduction
from vtw_train.gate import (
    ExitGate,
    GateConfig,
    GateExitRule,
    gate_features,
    policy_reduction,
    text_feature_masks,
)
from vtw_train.training.objective import DistillConfig, distill_step

LORA = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paths = build_miniature(tmp_path_factory.mktemp("mini"), text_layers=4)
    processor = AutoProcessor.from_pretrained(paths["model"])
    base = AutoModelForImageTextToText.from_pretrained(paths["model"]).eval()
    base.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=LORA, init_lora_weights=False))
    vtw_train.attach(model)
    torch.manual_seed(0)
    gate = ExitGate(GateConfig(hidden_size=32, num_layers=4, width=16, min_layer=0, tau=0.5))
    return paths, processor, model, gate


def test_gate_is_tiny_for_a_7b_model():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    gate = ExitGate(GateConfig(hidden_size=cfg.hidden_size, num_layers=32, width=128))
    per_layer = 4 * cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.intermediate_size
    language_model = 32 * per_layer + 2 * 32000 * cfg.hidden_size
    share = sum(p.numel() for p in gate.parameters()) / language_model
    assert share < 0.005
    # DyVTE's per-layer routers: ~21M parameters each (docs/methods.md §3.1)
    assert sum(p.numel() for p in gate.parameters()) < 21_000_000 / 10


def test_features_ignore_everything_after_the_prompt():
    torch.manual_seed(0)
    hidden = torch.randn(2, 10, 8)
    visual = torch.zeros(2, 10, dtype=torch.bool)
    visual[:, 1:5] = True
    prompt_end = torch.tensor([7, 8])
    mean_mask, last = text_feature_masks(visual, None, prompt_end)
    assert last.tolist() == [6, 7]
    assert mean_mask[0].nonzero().squeeze(1).tolist() == [5]
    assert mean_mask[1].nonzero().squeeze(1).tolist() == [5, 6]
    before = gate_features(hidden, mean_mask, last)
    changed = hidden.clone()
    changed[0, 7:] = 100.0
    changed[1, 8:] = -100.0
    assert torch.equal(gate_features(changed, mean_mask, last), before)
    expected_mean = hidden[1, 5:7].mean(0)
    torch.testing.assert_close(before[1, :8], expected_mean)
    torch.testing.assert_close(before[1, 8:], hidden[1, 7])


def test_inference_decisions_equal_training_decisions(setup):
    """The engine asks the gate layer by layer on prompts (left padded); training reads the same
    features from teacher-forced prompt+answer batches (right padded). Causality makes them equal."""
    paths, processor, model, gate = setup
    train_batch = batches(paths, processor, "train", size=8)[0]
    out = distill_step(model, gate, train_batch, DistillConfig())
    with torch.no_grad():  # make the gate fire at different layers for different samples
        gate.head[1].bias -= float(out.gate_prob[:, 0].median().logit()) + 1e-4
    out = distill_step(model, gate, train_batch, DistillConfig())
    assert len(set(out.gate_exit.tolist())) > 1, "test needs samples that exit at different layers"

    prompt_batch = batches(paths, processor, "generate", size=8)[0]
    controller = vtw_train.attach(model)
    with torch.no_grad(), controller.using(policy_reduction("gate", gate, fixed_exit_layer=None)):
        model(**prompt_batch)
    assert controller.last_exit_layers.tolist() == out.gate_exit.tolist()


def test_gate_rule_is_causal_per_layer(setup):
    """A decision after layer l uses only layer l's states: changing later layers changes nothing."""
    paths, processor, model, gate = setup
    controller = vtw_train.attach(model)
    prompt_batch = batches(paths, processor, "generate", size=8)[0]
    rule = GateExitRule(gate, tau=1.0)  # never fires: every layer is asked
    controller.reduction = Reduction(exit_rule=rule)
    with torch.no_grad():
        model(**prompt_batch)
        seen = {k: v.clone() for k, v in rule.last_probabilities.items()}
        last_layer = controller.language_model.layers[-1]
        saved = (
            last_layer.mlp.down_proj.base_layer.weight.clone()
            if hasattr(last_layer.mlp.down_proj, "base_layer")
            else last_layer.mlp.down_proj.weight.clone()
        )
        target = getattr(last_layer.mlp.down_proj, "base_layer", last_layer.mlp.down_proj)
        target.weight.add_(1.0)
        model(**prompt_batch)
        target.weight.copy_(saved)
    controller.reduction = None
    assert sorted(seen) == [0, 1, 2]
    for layer, p in seen.items():
        assert torch.equal(rule.last_probabilities[layer], p)


def test_policies(setup):
    paths, processor, model, gate = setup
    controller = vtw_train.attach(model)
    prompt_batch = batches(paths, processor, "generate", size=8)[0]
    with torch.no_grad():
        controller.reduction = policy_reduction("gate", None, fixed_exit_layer=2)  # no gate: the calibrated K
        model(**prompt_batch)
        assert controller.last_exit_layers.tolist() == [2] * 8
        controller.reduction = policy_reduction("fixed", gate, fixed_exit_layer=1)
        model(**prompt_batch)
        assert controller.last_exit_layers.tolist() == [1] * 8
        controller.reduction = policy_reduction("gate", gate, fixed_exit_layer=1)
        model(**prompt_batch)
        free = controller.last_exit_layers.clone()
        controller.reduction = policy_reduction("gate_capped", gate, fixed_exit_layer=1)
        model(**prompt_batch)
        capped = controller.last_exit_layers.clone()
    assert torch.equal(capped, torch.clamp(free, max=1))
    controller.reduction = policy_reduction("fixed", None, fixed_exit_layer=None)
    assert controller.reduction.is_full
    with pytest.raises(ValueError, match="policy"):
        policy_reduction("sometimes", gate, fixed_exit_layer=None)


def test_config_errors():
    with pytest.raises(ValueError, match="tau"):
        GateConfig(hidden_size=8, num_layers=4, tau=0.0)
    with pytest.raises(ValueError, match="min_layer"):
        GateConfig(hidden_size=8, num_layers=4, min_layer=4)
