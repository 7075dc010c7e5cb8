"""Evaluation harness: every visual-token reduction strategy on the same records, side by side.

Public API::

    StrategySweep(vtw=[...], vispruner=[...], shortv=[...], fastv=[FastVSetting(...)], ...)
    expand_strategies(sweep, num_layers, calibrated_exit_layer=K, gate_tau=tau) -> [Strategy]
    run_harness(model, processor, records, calibration_records, sweep, generation=..., timing=...,
                calibration=..., gate=None) -> HarnessResult
    write_reports(result, records, out_dir, budget)     -> results.json/.csv, predictions.jsonl, summary.md
    accuracy_vs_flops(result, "plot.png", budget=0.5)   -> the accuracy-vs-FLOPs figure
    budget_verdict(result, 0.5) / budget_sentence(...)  -> the best strategy within a FLOPs budget

``scripts/evaluate.py --config configs/evaluate_tiny.yaml`` drives all of it from a typed YAML.
"""

from __future__ import annotations

from .plot import accuracy_vs_flops
from .report import budget_sentence, csv_rows, strategy_table, summary_markdown, write_reports
from .results import BudgetVerdict, GroupStats, HarnessResult, StrategyResult, budget_verdict, group_stats
from .runner import run_harness
from .settings import CalibrationSettings, GenerationSettings, TimingSettings
from .strategies import (
    FAMILIES,
    FastVSetting,
    PrunedExit,
    PrunedGate,
    ShortVExit,
    Strategy,
    StrategySweep,
    expand_strategies,
)

__all__ = [
    "FAMILIES",
    "BudgetVerdict",
    "CalibrationSettings",
    "FastVSetting",
    "GenerationSettings",
    "GroupStats",
    "HarnessResult",
    "PrunedExit",
    "PrunedGate",
    "ShortVExit",
    "Strategy",
    "StrategyResult",
    "StrategySweep",
    "TimingSettings",
    "accuracy_vs_flops",
    "budget_sentence",
    "budget_verdict",
    "csv_rows",
    "expand_strategies",
    "group_stats",
    "run_harness",
    "strategy_table",
    "summary_markdown",
    "write_reports",
]
