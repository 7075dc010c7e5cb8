"""Evaluation: one generate-and-score loop, and the comparisons built on it.

    generate_answers(model, processor, records, reduction)  -> Answers (predictions, exits, FLOPs)
    run_strategy(model, processor, records, strategy)       -> the same, adapters on or off as the strategy says
    evaluate_exact_match(model, processor, records)         -> ExactMatchResult (per question type)
    compare_policies(...) / gate_verdicts(...)              -> the main job's table and verdicts
    exit_layer_sweep(...)                                   -> accuracy per type at every fixed K
    run_harness(...) / write_reports(...)                   -> every method of a StrategySweep side by side

``scripts/evaluate.py --config configs/evaluate/tiny.yaml`` drives the harness from a typed YAML.
"""

from .exit_sweep import exit_layer_sweep
from .harness import run_harness
from .loop import Answers, generate_answers, run_strategy
from .plot import accuracy_vs_flops
from .policies import (
    GateVerdict,
    PolicyResult,
    compare_policies,
    format_results,
    gate_verdicts,
    policy_strategies,
)
from .report import budget_sentence, csv_rows, strategy_table, summary_markdown, write_reports
from .results import BudgetVerdict, GroupStats, HarnessResult, StrategyResult, budget_verdict, group_stats
from .scoring import (
    ExactMatchResult,
    evaluate_exact_match,
    majority_baseline,
    score_answers,
    visual_token_share,
)
from .settings import CalibrationSettings, GenerationSettings, TimingSettings
from .strategies import (
    FAMILIES,
    FastVExit,
    FastVGate,
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
    "FastVExit",
    "FastVGate",
    "Answers",
    "BudgetVerdict",
    "CalibrationSettings",
    "ExactMatchResult",
    "FastVSetting",
    "GateVerdict",
    "GenerationSettings",
    "GroupStats",
    "HarnessResult",
    "PolicyResult",
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
    "compare_policies",
    "csv_rows",
    "evaluate_exact_match",
    "exit_layer_sweep",
    "expand_strategies",
    "format_results",
    "gate_verdicts",
    "generate_answers",
    "group_stats",
    "majority_baseline",
    "policy_strategies",
    "run_harness",
    "run_strategy",
    "score_answers",
    "strategy_table",
    "summary_markdown",
    "visual_token_share",
    "write_reports",
]
