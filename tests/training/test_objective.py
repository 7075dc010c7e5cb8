"""The distillation objective: values checked independently, then pinned (as torchtune pins its KD recipe)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import collate, singles
from peft import LoraConfig, get_peft_model
from reference_loop import reference_logits

import vtw_train
from vtw_train.gate import ExitGate, GateConfig
from vtw_train.tiny_models import tiny_model
from vtw_train.training.objective import DistillConfig, distill_step, exit_distribution, monotone_safe_labels

ANSWER = torch.tensor([[40, 41, 42]])
LORA = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"


def with_answer(sample):
    ids = torch.cat([sample["input_ids"], ANSWER], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": sample["pixel_values"]}


@pytest.fixture(scope="module")
def setup():
    base = tiny_model("llava", num_layers=4, seed=0)
    samples = [with_answer(s) for s in singles(base, [dict(seed=21), dict(seed=22)])]
    batch = collate(samples, "right")
    labels = torch.full_like(batch["input_ids"], -100)
    for row in range(2):
        real = batch["attention_mask"][row].nonzero().squeeze(1)
        labels[row, real[-3:]] = ANSWER[0]
    batch["labels"] = labels
    base.requires_grad_(False)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=LORA, init_lora_weights=False))
    vtw_train.attach(model)
    torch.manual_seed(0)
    gate = ExitGate(GateConfig(hidden_size=64, num_layers=4, width=16, min_layer=0))
    return model, gate, batch, samples


def test_kd_matches_reference_per_exit(setup):
    model, gate, batch, samples = setup
    out = distill_step(model, gate, batch, DistillConfig())
    assert out.exit_layers == [1, 2, 3, 4]
    for row, sample in enumerate(samples):
        with torch.no_grad(), model.disable_adapter():
            teacher, idx = reference_logits(model, sample, None)
        positions = [len(sample["input_ids"][0]) - 4 + j for j in range(3)]
        rows = [int((idx == p).nonzero()) for p in positions]
        lp_teacher = F.log_softmax(teacher[0, rows], -1)
        for column, k in enumerate(out.exit_layers):
            with torch.no_grad():
                student, _ = reference_logits(model, sample, k if k < 4 else None)
            lp_student = F.log_softmax(student[0, rows], -1)
            expected = (lp_teacher.exp() * (lp_teacher - lp_student)).sum(-1).mean()
            assert out.kl[row, column].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    assert out.kd_loss.item() == pytest.approx(out.kl.mean().item(), rel=1e-6)


def test_losses_are_pinned(setup):
    """Exact values on this tiny model; a change here means the objective changed."""
    model, gate, batch, _ = setup
    out = distill_step(
        model, gate, batch, DistillConfig(kd_weight=1.0, gate_weight=1.0, cost_weight=0.05, kl_threshold=0.05)
    )
    values = [out.kd_loss.item(), out.gate_loss.item(), out.cost_loss.item(), out.loss.item()]
    assert values == pytest.approx(PINNED, rel=1e-4)
    weighted = out.kd_loss + out.gate_loss + 0.05 * out.cost_loss
    assert out.loss.item() == pytest.approx(weighted.item(), rel=1e-6)


PINNED = [0.35686180, 0.59708196, 0.66659814, 0.98727363]  # kd, gate, cost, total


def test_gradients_reach_lora_and_gate_only(setup):
    model, gate, batch, _ = setup
    model.zero_grad()
    gate.zero_grad()
    out = distill_step(model, gate, batch, DistillConfig())
    out.loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gate.parameters())


def test_monotone_labels_and_exit_distribution():
    safe = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    assert monotone_safe_labels(safe).tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    p = torch.tensor([[0.5, 0.5], [1.0, 0.3]])
    dist = exit_distribution(p)
    torch.testing.assert_close(dist, torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(dist.sum(1), torch.ones(2))


def test_config_errors():
    with pytest.raises(ValueError, match="kd_exits"):
        DistillConfig(kd_exits="some")
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0)


def test_dyvte_rule_on_hand_built_distributions():
    from vtw_train.training.objective import dyvte_safe

    # Two answer positions over a 3-token vocabulary; targets are tokens 0 and 1.
    teacher = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.2, 0.6, 0.2]]] * 3))
    agreeing = torch.log(
        torch.tensor([[0.6, 0.3, 0.1], [0.3, 0.5, 0.2]])
    )  # same argmax, CE 1.2x the teacher's
    close = torch.log(
        torch.tensor([[0.695, 0.205, 0.1], [0.205, 0.595, 0.2]])
    )  # same argmax, CE within 1.03x
    flipped = torch.log(torch.tensor([[0.2, 0.7, 0.1], [0.2, 0.6, 0.2]]))  # first argmax differs
    student = torch.stack([agreeing, close, flipped])
    targets = torch.tensor([[0, 1]] * 3)
    valid = torch.ones(3, 2, dtype=torch.bool)
    ce_teacher = -(torch.log(torch.tensor(0.7)) + torch.log(torch.tensor(0.6))) / 2
    ce_close = -(torch.log(torch.tensor(0.695)) + torch.log(torch.tensor(0.595))) / 2
    assert ce_close < 1.03 * ce_teacher  # the hand-made case is what it claims
    assert dyvte_safe(teacher, student, targets, valid).tolist() == [False, True, False]
    # A looser CE ratio admits the first sample; an agreement threshold of 0.4 admits the third's 50%.
    assert dyvte_safe(teacher, student, targets, valid, ce_ratio=1.5).tolist() == [True, True, False]
    assert dyvte_safe(teacher, student, targets, valid, 0.4, 10.0).tolist() == [True, True, True]
    # Padding slots do not count.
    valid[2, 0] = False
    assert dyvte_safe(teacher, student, targets, valid, 0.99, 10.0).tolist() == [True, True, True]


def test_dyvte_labels_in_the_step_equal_an_independent_computation(setup):
    """Per sample and exit: agreement with the teacher's argmax and the answer cross-entropies, each computed
    from the reference loop's logits, decide the label (then made monotone)."""
    model, gate, batch, samples = setup
    config = DistillConfig(label_rule="dyvte", agree_threshold=0.3, ce_ratio=1.2)
    out = distill_step(model, gate, batch, config)
    expected = []
    for sample in samples:
        with torch.no_grad(), model.disable_adapter():
            teacher, idx = reference_logits(model, sample, None)
        positions = [len(sample["input_ids"][0]) - 4 + j for j in range(3)]
        rows = [int((idx == p).nonzero()) for p in positions]
        lp_teacher = F.log_softmax(teacher[0, rows], -1)
        ce_teacher = -lp_teacher[torch.arange(3), ANSWER[0]].mean()
        safe = []
        for k in out.exit_layers[:-1]:
            with torch.no_grad():
                student, _ = reference_logits(model, sample, k)
            lp_student = F.log_softmax(student[0, rows], -1)
            agree = (lp_student.argmax(-1) == lp_teacher.argmax(-1)).float().mean()
            ce_student = -lp_student[torch.arange(3), ANSWER[0]].mean()
            safe.append(bool(agree > 0.3) and bool(ce_student < 1.2 * ce_teacher))
        expected.append(safe)
    assert out.gate_label.tolist() == monotone_safe_labels(torch.tensor(expected)).tolist()
    assert 0 < out.gate_label.sum() < out.gate_label.numel(), "the case must have safe and unsafe exits"
    kl_labels = distill_step(model, gate, batch, DistillConfig()).gate_label
    assert out.gate_label.shape == kl_labels.shape


def test_dyvte_settings_are_checked():
    with pytest.raises(ValueError, match="label_rule"):
        DistillConfig(label_rule="vibes")
    with pytest.raises(ValueError, match="agree_threshold"):
        DistillConfig(agree_threshold=1.5)
