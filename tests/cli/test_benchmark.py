"""The benchmark runs on the CPU at a small shape and reports what the GPU runs report."""

from __future__ import annotations

import json

import pytest

from vtw_train.cli.benchmark import PRESETS, main


def test_the_benchmark_times_every_strategy_and_writes_its_tables(tmp_path, capsys):
    out = tmp_path / "bench"
    results = main(
        [
            "--preset",
            "cpu_small",
            "--num_layers",
            "4",
            "--batch_sizes",
            "[1, 2]",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--decode_tokens",
            "2",
            "--decode_repeats",
            "1",
            "--threads",
            "1",
            "--output_dir",
            str(out),
        ]  # fmt: skip
    )
    printed = capsys.readouterr().out
    names = {r["strategy"] for r in results}
    for expected in (
        "stock",
        "engine, K = L",
        "gate asked, never fires",
        "VTW K = 2",
        "VTW K = 1",
        "ShortV N = 2",
    ):
        assert expected in names, expected
    assert any(n.startswith("FastV") for n in names) and any(n.startswith("VisPruner T = 64") for n in names)
    assert any(n.startswith("K per sample") for n in names) and any(n.startswith("gate fires") for n in names)
    by = {(r["batch"], r["strategy"]): r for r in results}
    for batch in (1, 2):
        stock = by[(batch, "stock")]
        assert stock["flops_speedup"] == pytest.approx(1.0) and stock["speedup"] == pytest.approx(1.0)
        assert by[(batch, "engine, K = L")]["flops_speedup"] == pytest.approx(1.0)
        assert by[(batch, "gate asked, never fires")]["flops_speedup"] == pytest.approx(1.0)
        half, quarter = by[(batch, "VTW K = 2")], by[(batch, "VTW K = 1")]
        assert quarter["flops_speedup"] > half["flops_speedup"] > 1.0
        assert quarter["kv_bytes"] < half["kv_bytes"] < stock["kv_bytes"]
        for r in (half, quarter):
            assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_speedup"])
            assert r["prefill_ms"] > 0 and r["generate_s"] > 0
    # One sample has no padding: what every exit row keeps is exactly what the sample needs at its K.
    for r in results:
        if r["batch"] == 1 and (r["strategy"].startswith(("stock", "VTW", "K per sample", "gate"))):
            assert r["kv_bytes"] == r["kv_need_bytes"], r["strategy"]
    mix = next(r for r in results if r["batch"] == 2 and r["strategy"].startswith("K per sample"))
    assert mix["kv_need_bytes"] <= mix["kv_bytes"] <= by[(2, "stock")]["kv_bytes"]
    assert by[(1, "FastV K = 2 keep 0.5")]["kv_need_bytes"] is None
    saved = json.loads((out / "benchmark.json").read_text())
    assert len(saved["results"]) == len(results) and saved["config"]["preset"] == "cpu_small"
    table = (out / "benchmark.md").read_text()
    assert "### batch 1" in table and "### batch 2" in table and "| VTW K = 2 |" in table
    assert "batch 2" in printed and "FLOPs speedup" in printed


def test_presets_carry_real_shapes():
    assert PRESETS["llava15_7b"].num_layers == 32 and PRESETS["llava15_7b"].visual_tokens == 576
    assert PRESETS["llava_next_7b"].visual_tokens == 2880 and PRESETS["llava15_13b"].hidden_size == 5120


def test_graphed_rows_sit_next_to_their_eager_twins_with_the_same_output(tmp_path, monkeypatch):
    """With a recorder that replays (the CPU stand-in for a CUDA graph), graphed rows equal the eager ones."""
    from graph_emulator import TraceReplay

    import vtw_train.cli.benchmark as benchmark
    from vtw_train.engine.graphs import SegmentGraphs

    recorders: list[SegmentGraphs] = []

    def replaying(settings):
        recorders.append(SegmentGraphs(settings, capture=TraceReplay))
        return recorders[-1]

    monkeypatch.setattr(benchmark, "SegmentGraphs", replaying)
    results = main(
        [
            "--num_layers",
            "4",
            "--batch_sizes",
            "[2]",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--decode_tokens",
            "0",
            "--threads",
            "1",
            "--graphs",
            "true",
            "--output_dir",
            str(tmp_path),
        ]  # fmt: skip
    )
    graphed = {r["strategy"]: r for r in results if r["graphs"]}
    assert set(graphed) >= {"stock, graphed", "VTW K = 2, graphed", "ShortV N = 2, graphed"}
    assert "gate asked, never fires, graphed" in graphed
    for name, r in graphed.items():
        assert r["max_abs_diff_vs_eager"] == 0.0, name
        eager = next(e for e in results if e["strategy"] == name.removesuffix(", graphed"))
        assert r["kv_bytes"] == eager["kv_bytes"] and r["kv_need_bytes"] == eager["kv_need_bytes"]
        assert r["flops_speedup"] == pytest.approx(eager["flops_speedup"])
    assert recorders[0].stats.captures > 0 and recorders[0].stats.replays > recorders[0].stats.captures
    assert all(r["graph_stats"]["captures"] == recorders[0].stats.captures for r in graphed.values())
    assert "diff vs eager" in (tmp_path / "benchmark.md").read_text()


def test_the_gpu_script_runs_at_a_small_shape_on_the_cpu(tmp_path):
    """``scripts/benchmark_gpu.sh`` is what a GPU machine runs in one go; here it runs at a CPU shape."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PRESET": "cpu_small", "DEVICE": "cpu", "DTYPE": "float32", "BATCHES": "[1]", "DECODE": "0",
           "REPEATS": "1", "LAYERS": "4", "OUT": str(tmp_path)}  # fmt: skip
    done = subprocess.run(["bash", str(root / "scripts" / "benchmark_gpu.sh")], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "benchmark.json").read_text())["results"]
    graphed = [r for r in results if r["graphs"]]
    assert graphed and all(r["max_abs_diff_vs_eager"] == 0.0 for r in graphed)
