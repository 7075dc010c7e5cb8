"""The gate-versus-fixed-K verdicts the README reports (pure arithmetic on policy rows)."""

from __future__ import annotations

import pytest

from vtw_train.evaluation import PolicyResult, gate_verdicts


def _row(name: str, acc: float, flops: float, role: str | None = None) -> PolicyResult:
    role = role or ("gate" if name.startswith("gate") else "fixed_k" if "fixed K" in name else "full")
    return PolicyResult(
        name=name, accuracy=acc, per_type={}, flops_ratio=flops, mean_exit_layer=0.0, role=role
    )


def test_verdicts_pick_cheapest_close_gate_and_best_cheap_gate():
    rows = [
        _row("full model", 0.95, 1.0),
        _row("VTW fixed K=4", 0.90, 0.60),
        _row("gate tau=0.9", 0.93, 0.55),
        _row("gate tau=0.5", 0.897, 0.40),  # within 0.5 pt: counts as the same accuracy
        _row("gate tau=0.1", 0.80, 0.30),
    ]
    (v,) = gate_verdicts(rows)
    assert v.baseline == "VTW fixed K=4"
    assert v.same_accuracy == "gate tau=0.5"
    assert v.flops_saving == pytest.approx(1 - 0.40 / 0.60)
    assert v.same_flops == "gate tau=0.9"
    assert v.accuracy_gain == pytest.approx(0.03)
    assert "33.3%" in v.line() and "+3.0 pt" in v.line()


def test_verdicts_say_when_no_gate_qualifies():
    rows = [
        _row("VTW fixed K=2", 0.9, 0.3),
        _row("LoRA + fixed K=2", 0.92, 0.3),
        _row("gate tau=0.5", 0.5, 0.5),
    ]
    verdicts = gate_verdicts(rows)
    assert [v.baseline for v in verdicts] == ["VTW fixed K=2", "LoRA + fixed K=2"]
    for v in verdicts:
        assert v.same_accuracy is None and v.same_flops is None
        assert "no gate threshold reaches" in v.line() and "no gate threshold is as cheap" in v.line()


def test_verdicts_go_by_role_not_by_display_name():
    rows = [
        _row("baseline at layer 3", 0.9, 0.5, role="fixed_k"),
        _row("gate tau=0.5 (not a gate row)", 0.99, 0.1, role="other"),
        _row("learned exit, strict", 0.91, 0.4, role="gate"),
    ]
    (v,) = gate_verdicts(rows)
    assert v.baseline == "baseline at layer 3" and v.same_accuracy == v.same_flops == "learned exit, strict"


def test_a_gate_that_costs_more_says_so():
    rows = [_row("VTW fixed K=4", 0.90, 0.50), _row("gate tau=0.9", 0.90, 0.53)]
    (v,) = gate_verdicts(rows)
    assert v.flops_saving == pytest.approx(-0.06)
    line = v.line()
    assert "costs 6.0% more FLOPs" in line and "saves -" not in line and "within 0.5 points" in line


def test_the_table_says_what_its_columns_are():
    from vtw_train.evaluation import format_results

    rows = [
        PolicyResult("full model", 0.9, {"color": 1.0, "count": 0.8}, 1.0, 8.0),
        PolicyResult("gate tau=0.5", 0.8, {"color": 1.0, "count": 0.6}, 0.5, 3.0),
    ]
    table = format_results(rows)
    assert "exact match per question type" in table and "FLOPs ratio" in table
    assert "over the full model's" in table and "mean exit K" in table
    assert "gate tau=0.5" in table and "0.600" in table
