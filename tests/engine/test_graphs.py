"""Graph-captured prefill: recorded segments replay to exactly the eager engine's numbers.

A CUDA graph cannot be recorded on this CPU, so segments are recorded by ``TraceReplay``, which has
a graph's constraints: Python runs once at capture, host reads fail there, outputs are overwritten
by the next replay. Every comparison is against the eager engine on the same inputs, exact.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from graph_emulator import CaptureError, TraceReplay

import vtw_train
from vtw_train.engine import Reduction
from vtw_train.engine.graphs import GraphSettings
from vtw_train.engine.grouped import GroupedLayer
from vtw_train.errors import WithdrawalError
from vtw_train.gate import ExitGate, GateConfig, GateExitRule
from vtw_train.methods import FastV
from vtw_train.tiny_models import tiny_inputs, tiny_model

LAYERS = 6


def gate_rule(lag: int, tau: float, ask_every: int = 1, hidden: int = 64) -> GateExitRule:
    torch.manual_seed(0)
    config = GateConfig(
        hidden_size=hidden, num_layers=LAYERS, width=8, min_layer=0, lag=lag, ask_every=ask_every
    )
    return GateExitRule(ExitGate(config), tau=tau)


REDUCTIONS = {
    "nothing withdrawn": lambda h: Reduction(),
    "fixed K": lambda h: Reduction(exit_layer=3),
    "K = 0": lambda h: Reduction(exit_layer=0),
    "K per sample": lambda h: Reduction(exit_layer=torch.tensor([1, 3, LAYERS])),
    "FastV": lambda h: Reduction(pruning=FastV(layer=2, keep_ratio=0.5)),
    "ShortV": lambda h: Reduction(frozen_layers={1, 4}),
    "ShortV + K per sample": lambda h: Reduction(
        frozen_layers={0, 2, 3}, exit_layer=torch.tensor([1, 3, LAYERS])
    ),
    "gate, lag 0": lambda h: Reduction(exit_rule=gate_rule(lag=0, tau=0.5, hidden=h)),
    "gate, lag 1, asked every 2nd layer": lambda h: Reduction(
        exit_rule=gate_rule(lag=1, tau=0.5, ask_every=2, hidden=h)
    ),
    "FastV + gate": lambda h: Reduction(
        pruning=FastV(layer=2, keep_ratio=0.5), exit_rule=gate_rule(lag=1, tau=0.5, hidden=h)
    ),
    "FastV + K per sample": lambda h: Reduction(
        pruning=FastV(layer=1, keep_ratio=0.5), exit_layer=torch.tensor([2, 4, LAYERS])
    ),
}


def other_prompts(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows in reverse order with other text tokens: the same shapes (a replay, not a new recording)
    but other values everywhere, padding masks and rotary tables included, so nothing recorded as a
    constant can pass for an input."""
    changed = {}
    for key, value in inputs.items():
        changed[key] = value.flip(0)
    if "image_grid_thw" in inputs:  # Qwen2-VL: patches of all images in one tensor, image after image
        sizes = inputs["image_grid_thw"].prod(-1).tolist()
        changed["pixel_values"] = torch.cat(inputs["pixel_values"].split(sizes)[::-1])
    ids = changed["input_ids"]
    changed["input_ids"] = torch.where(ids > 10, (ids * 7) % 50 + 11, ids)
    return changed


def cache_tensors(cache) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        if isinstance(layer, GroupedLayer):
            out += [t for group in layer.groups for t in (group.keys, group.values)]
        else:
            out += [layer.keys, layer.values]
    return out


def assert_same_cache(got, want, what: str) -> None:
    got_t, want_t = cache_tensors(got), cache_tensors(want)
    assert len(got_t) == len(want_t), what
    for i, (g, w) in enumerate(zip(got_t, want_t, strict=True)):
        assert g.shape == w.shape and torch.equal(g, w), f"{what}: cache tensor {i} differs"


def run(model, batches):
    with torch.no_grad():
        return [model(**b) for b in batches]


def eager_reference(reduction: Reduction, batch_size: int, seed: int):
    """A tiny LLaVA under ``reduction``, its inputs, its controller and its eager outputs (graphs off)."""
    model = tiny_model("llava", num_layers=LAYERS)
    inputs = tiny_inputs(model, batch_size=batch_size, seed=seed)
    controller = vtw_train.attach(model)
    controller.reduction = reduction
    (want,) = run(model, [inputs])
    return model, inputs, controller, want


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_recorded_segments_replay_the_eager_engine_exactly(family, name):
    model = tiny_model(family, num_layers=LAYERS)
    first = tiny_inputs(model, batch_size=3, seed=1)
    second = other_prompts(first)
    controller = vtw_train.attach(model)
    controller.reduction = REDUCTIONS[name](model.config.text_config.hidden_size)
    eager = run(model, [first, second])
    graphs = controller.enable_graphs(capture=TraceReplay)
    recorded = run(model, [first])
    captures = graphs.stats.captures
    replayed = run(model, [second])
    assert captures >= 1 and graphs.stats.eager == 0 and graphs.stats.replays > captures
    if "per sample" not in name and "gate" not in name:  # per-sample exits regroup rows: other widths
        assert graphs.stats.captures == captures, "the same shapes must replay, not record again"
    for got, want, what in ((recorded[0], eager[0], "first"), (replayed[0], eager[1], "second")):
        assert torch.equal(got.logits, want.logits), f"{name}: {what} prompt's logits differ"
        # The first prompt's cache is checked after the second replay: it must not share the replay buffers.
        assert_same_cache(got.past_key_values, want.past_key_values, f"{name}, {what} prompt")
    assert controller.last_exit_layers is None or torch.equal(
        controller.last_exit_layers, vtw_train.attach(model).last_exit_layers
    )


@pytest.mark.parametrize(
    ("reduction", "graphs"),
    [(Reduction(), 1), (Reduction(exit_layer=3), 2), (Reduction(frozen_layers={0, 1}, exit_layer=3), 2),
     (Reduction(frozen_layers={1, 4}), 1), (Reduction(pruning=FastV(layer=2, keep_ratio=0.5)), 3),
     (Reduction(exit_rule=gate_rule(lag=1, tau=1.0, ask_every=2)), 5)],
    ids=["nothing withdrawn", "fixed K", "ShortV + fixed K", "ShortV", "FastV",
         "gate asked after layers 0 and 2, lag 1: cut at 1, 2, 3, 4"],
)  # fmt: skip
def test_a_prefill_is_as_few_graphs_as_its_group_changes_allow(reduction, graphs):
    """One graph per run of layers without a change of group: the launches saved are the point."""
    model = tiny_model("llava", num_layers=LAYERS)
    controller = vtw_train.attach(model)
    controller.reduction = reduction
    recorder = controller.enable_graphs(capture=TraceReplay)
    run(model, [tiny_inputs(model, batch_size=2, seed=10)])
    assert recorder.stats.captures == graphs


def test_generate_after_a_recorded_prefill_equals_eager():
    model = tiny_model("llava", num_layers=LAYERS)
    inputs = tiny_inputs(model, batch_size=3, seed=2)
    controller = vtw_train.attach(model)
    settings = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[model.config.image_token_id])
    for reduction in (Reduction(exit_layer=torch.tensor([1, 3, LAYERS])), Reduction()):
        controller.reduction = reduction
        controller.disable_graphs()
        with torch.no_grad():
            want = model.generate(
                **inputs, **settings, num_beams=2, output_scores=True, return_dict_in_generate=True
            )
        graphs = controller.enable_graphs(capture=TraceReplay)
        with torch.no_grad():
            got = model.generate(
                **inputs, **settings, num_beams=2, output_scores=True, return_dict_in_generate=True
            )
        assert graphs.stats.captures >= 1
        assert torch.equal(got.sequences, want.sequences)
        for g, w in zip(got.scores, want.scores, strict=True):
            assert torch.equal(g, w)


def test_the_recorder_refuses_host_reads():
    """The stand-in fails where CUDA would: the engine's segments pass only because they read nothing."""

    def reads(x):
        return (x * float(x.sum()),)

    with pytest.raises(CaptureError):
        TraceReplay(reads, [torch.ones(3)], warmup=0)


def test_a_segment_that_keeps_state_in_python_gives_stale_results_under_replay():
    """Why segments return their keys and values: state set in Python at capture does not change on replay."""
    seen = {}

    def keeps(x):
        y = x * 2
        seen["y"] = y  # a cache-like side effect
        return (y + 1,)

    static = [torch.ones(2)]
    replay = TraceReplay(keeps, static, warmup=0)
    static[0].copy_(torch.full((2,), 5.0))  # a new input, written where the recording reads it
    out = replay()
    assert torch.equal(out[0], torch.full((2,), 11.0))  # outputs are replayed
    assert torch.equal(seen["y"], torch.full((2,), 2.0))  # the side effect is the capture's, not the replay's


def test_where_graphs_cannot_apply_prefill_runs_eagerly_with_the_same_numbers():
    model, inputs, controller, want = eager_reference(Reduction(exit_layer=2), batch_size=3, seed=3)

    graphs = controller.enable_graphs()  # the CUDA recorder, on a CPU model: the CPU fallback
    (got,) = run(model, [inputs])
    assert graphs.stats.captures == 0 and graphs.stats.eager == 1
    assert torch.equal(got.logits, want.logits)

    graphs = controller.enable_graphs(GraphSettings(max_batch=2), capture=TraceReplay)
    (got,) = run(model, [inputs])  # three rows
    assert graphs.stats.captures == 0 and graphs.stats.eager == 1
    assert torch.equal(got.logits, want.logits)

    graphs = controller.enable_graphs(capture=TraceReplay)
    got = model(**inputs)  # gradients on (training, distillation): never recorded
    assert graphs.stats.captures == 0
    assert torch.equal(got.logits.detach(), want.logits)


def test_changed_weights_or_adapters_are_never_replayed_from_a_stale_graph():
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llava", num_layers=LAYERS)
    targets = r".*language_model\.layers\.\d+\.self_attn\.(q|v)_proj"
    model = get_peft_model(base, LoraConfig(target_modules=targets, r=4, init_lora_weights=False)).eval()
    inputs = tiny_inputs(base, batch_size=2, seed=4)
    controller = vtw_train.attach(model)
    controller.reduction = Reduction(exit_layer=3)
    (student,) = run(model, [inputs])
    with model.disable_adapter():
        (teacher,) = run(model, [inputs])
    assert not torch.equal(student.logits, teacher.logits)

    graphs = controller.enable_graphs(capture=TraceReplay)
    run(model, [inputs])
    with model.disable_adapter():
        (got,) = run(model, [inputs])
    assert torch.equal(got.logits, teacher.logits), "the adapters-on graph was replayed with adapters off"
    (got,) = run(model, [inputs])
    assert torch.equal(got.logits, student.logits)

    # A parameter given new storage (``model.to``, ``load_state_dict(assign=True)``): a CUDA graph would
    # still read the old memory, so the recorder must record again.
    weight = base.model.language_model.layers[4].mlp.down_proj.weight
    captures = graphs.stats.captures
    weight.data = weight.data * 1.5
    (got,) = run(model, [inputs])
    assert graphs.stats.captures > captures
    controller.disable_graphs()
    (want,) = run(model, [inputs])
    assert torch.equal(got.logits, want.logits) and not torch.equal(got.logits, student.logits)


def test_at_most_max_graphs_are_kept():
    mix = Reduction(exit_layer=torch.tensor([1, 3, LAYERS]))
    model, inputs, controller, want = eager_reference(mix, batch_size=3, seed=5)
    graphs = controller.enable_graphs(GraphSettings(max_graphs=2), capture=TraceReplay)
    with pytest.warns(
        RuntimeWarning, match="more graphs than GraphSettings keeps \\(max_graphs=2"
    ):  # 5 segments per prefill
        (got,) = run(model, [inputs])
    assert torch.equal(got.logits, want.logits)
    (got,) = run(model, [inputs])  # warned once
    assert torch.equal(got.logits, want.logits)
    assert len(graphs) == 2 and graphs.stats.evicted > 0

    # Enough room for one prefill: shapes that come and go are evicted without a warning.
    controller.exit_layer = 2  # two graphs per prefill
    graphs = controller.enable_graphs(GraphSettings(max_graphs=3), capture=TraceReplay)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in (1, 2, 1):
            run(model, [tiny_inputs(model, batch_size=batch, seed=5)])
    assert graphs.stats.evicted > 0


def test_a_failed_capture_warns_once_and_falls_back_to_eager():
    model, inputs, controller, want = eager_reference(Reduction(exit_layer=2), batch_size=2, seed=6)

    def broken(segment, inputs, warmup):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    graphs = controller.enable_graphs(capture=broken)
    with pytest.warns(RuntimeWarning, match="graphs are off for this model"):
        (got,) = run(model, [inputs])
    assert torch.equal(got.logits, want.logits)
    assert len(graphs.stats.failures) == 1
    (got,) = run(model, [inputs])  # no second attempt, no second warning
    assert torch.equal(got.logits, want.logits) and len(graphs.stats.failures) == 1


@pytest.mark.parametrize("field", ["max_batch", "max_graphs", "warmup"])
def test_graph_settings_are_checked(field):
    with pytest.raises(WithdrawalError, match=f"GraphSettings.{field}"):
        GraphSettings(**{field: -1})


def test_detach_releases_graphs():
    model = tiny_model("llava", num_layers=LAYERS)
    controller = vtw_train.attach(model)
    controller.exit_layer = 2
    graphs = controller.enable_graphs(capture=TraceReplay)
    run(model, [tiny_inputs(model, batch_size=1, seed=7)])
    assert len(graphs) > 0
    controller.detach()
    assert len(graphs) == 0 and controller.graphs is None


def test_inference_mode_and_no_grad_keep_separate_graphs():
    """Buffers recorded under ``inference_mode`` cannot be written under ``no_grad``: each mode records its own."""
    model, inputs, controller, want = eager_reference(Reduction(exit_layer=2), batch_size=2, seed=8)
    graphs = controller.enable_graphs(capture=TraceReplay)
    with torch.inference_mode():
        first = model(**inputs)
    (second,) = run(model, [inputs])
    assert torch.equal(first.logits, want.logits) and torch.equal(second.logits, want.logits)
    assert graphs.stats.captures == 4 and len(graphs.stats.failures) == 0


def test_graphs_can_be_paused_without_recording_again():
    model = tiny_model("llava", num_layers=LAYERS)
    inputs = tiny_inputs(model, batch_size=1, seed=9)
    controller = vtw_train.attach(model)
    controller.exit_layer = 3
    graphs = controller.enable_graphs(capture=TraceReplay)
    (graphed,) = run(model, [inputs])
    kept = controller.disable_graphs(release=False)
    (eager,) = run(model, [inputs])
    assert kept is graphs and len(graphs) == 2 and graphs.stats.replays == 2
    controller.enable_graphs(recorder=kept)
    (again,) = run(model, [inputs])
    assert graphs.stats.captures == 2 and graphs.stats.replays == 4
    assert torch.equal(graphed.logits, eager.logits) and torch.equal(again.logits, eager.logits)
    with pytest.raises(TypeError, match="recorder or settings"):
        controller.enable_graphs(GraphSettings(), recorder=kept)


@pytest.mark.parametrize("lag", [0, 1])
def test_the_gate_is_asked_inside_the_recorded_graphs_with_the_eager_decisions(monkeypatch, lag):
    """Asking the gate costs no launch of its own: its step is part of the graph of the layers before it."""
    rule = gate_rule(lag=lag, tau=0.5)
    model, inputs, controller, want = eager_reference(Reduction(exit_rule=rule), batch_size=3, seed=1)
    want_exits, want_p = (
        controller.last_exit_layers,
        {k: v.clone() for k, v in rule.last_probabilities.items()},
    )
    assert 0 < int((want_exits < LAYERS).sum()) < 3, "the test needs some rows to exit and some not"

    def never(*args):
        raise AssertionError("the gate was called eagerly")

    controller.enable_graphs(capture=TraceReplay)
    rule.last_probabilities.clear()
    monkeypatch.setattr(GateExitRule, "__call__", never)
    for _ in range(2):  # recorded, then replayed
        (got,) = run(model, [inputs])
        assert torch.equal(got.logits, want.logits) and torch.equal(controller.last_exit_layers, want_exits)
        assert rule.last_probabilities.keys() == want_p.keys()
        for layer, p in want_p.items():
            assert torch.equal(rule.last_probabilities[layer], p), layer


def test_segments_share_context_buffers_and_read_each_other_in_place(monkeypatch):
    """Per replay, only what changed is written: a new hidden state, not the rotary tables every graph reads,
    nor the previous graph's output, which the next graph reads where it lies."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vtw_train.engine.graphs import SegmentGraphs

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Copies.count += func._schema.name == "aten::copy_"
            return func(*args, **(kwargs or {}))

    graphs = SegmentGraphs(capture=TraceReplay)
    load = graphs._load

    def counted(*args):
        with Copies():
            load(*args)

    monkeypatch.setattr(graphs, "_load", counted)

    def segment(hidden, table):
        return (hidden * table + 1,)

    table, shared = torch.randn(4), frozenset({1})

    def prefill(hidden):
        (first,), _ = graphs.run("first", segment, [hidden, table], shared)
        (second,), _ = graphs.run("second", segment, [first, table], shared)
        return second.clone()

    prefill(torch.randn(4))  # records both
    Copies.count = 0
    hidden = torch.randn(4)
    got = prefill(hidden)
    assert torch.allclose(got, (hidden * table + 1) * table + 1)
    assert Copies.count == 1, "only the new hidden state is written"
    table = torch.randn(4)  # a new tensor in the shared role: written once, read by both graphs
    Copies.count = 0
    assert torch.allclose(prefill(hidden), (hidden * table + 1) * table + 1) and Copies.count == 2


def test_what_the_stock_forward_handles_stays_with_it_when_graphs_are_on():
    """With nothing withdrawn the engine used to hand every call to the stock forward; graphs must not take
    away what it handles (hidden states out, here)."""
    model, inputs, controller, _ = eager_reference(Reduction(), batch_size=2, seed=11)
    with torch.no_grad():
        want = model(**inputs, output_hidden_states=True)
    graphs = controller.enable_graphs(capture=TraceReplay)
    with torch.no_grad():
        got = model(**inputs, output_hidden_states=True)
    assert graphs.stats.captures == 0 and graphs.stats.eager == 1
    assert torch.equal(got.logits, want.logits)
    assert all(torch.equal(g, w) for g, w in zip(got.hidden_states, want.hidden_states, strict=True))


def test_autocast_keeps_the_eager_path():
    """A graph recorded under autocast would read its cached weight casts after autocast frees them."""
    model, inputs, controller, _ = eager_reference(Reduction(exit_layer=2), batch_size=2, seed=12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (want,) = run(model, [inputs])
        graphs = controller.enable_graphs(capture=TraceReplay)
        (got,) = run(model, [inputs])
    assert graphs.stats.captures == 0 and graphs.stats.eager == 1
    assert torch.equal(got.logits, want.logits)


def test_a_new_attention_implementation_records_new_graphs():
    model, inputs, controller, sdpa = eager_reference(Reduction(exit_layer=2), batch_size=3, seed=13)
    graphs = controller.enable_graphs(capture=TraceReplay)
    run(model, [inputs])
    model.config.text_config._attn_implementation = "eager"
    controller.disable_graphs(release=False)
    (want,) = run(model, [inputs])
    controller.enable_graphs(recorder=graphs)
    (got,) = run(model, [inputs])
    assert not torch.equal(want.logits, sdpa.logits), "the two implementations must differ for this test"
    assert torch.equal(got.logits, want.logits) and graphs.stats.captures == 4


def test_graphs_over_the_memory_budget_are_dropped_oldest_first():
    mix = Reduction(exit_layer=torch.tensor([1, 3, LAYERS]))
    model, inputs, controller, want = eager_reference(mix, batch_size=3, seed=5)
    graphs = controller.enable_graphs(GraphSettings(max_bytes=1), capture=TraceReplay)
    with pytest.warns(RuntimeWarning, match="more graphs than GraphSettings keeps"):
        (got,) = run(model, [inputs])
    assert torch.equal(got.logits, want.logits)
    assert len(graphs) == 1 and graphs.stats.evicted == graphs.stats.captures - 1


def test_the_recorder_refuses_a_replay_that_reads_freed_memory():
    """A graph holds addresses, not tensors: a constant the segment made outside itself must outlive it."""

    def recorded_with(constant):
        def segment(x):
            return (x + constant,)

        return TraceReplay(segment, [torch.ones(2)], warmup=0)

    parameter = torch.full((2,), 3.0)
    assert torch.equal(recorded_with(parameter)()[0], torch.full((2,), 4.0))  # alive: fine
    replay = recorded_with(torch.full((2,), 3.0))  # the constant dies with this line
    with pytest.raises(CaptureError, match="freed after the capture"):
        replay()
