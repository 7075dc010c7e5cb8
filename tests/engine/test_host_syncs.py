"""The engine never makes the host wait for the device per layer.

On a GPU, reading a device value (``bool(t)``, ``.item()``, ``.tolist()``, boolean-mask indexing,
``nonzero``) drains the launch queue, so launch time and GPU time add up. Counted here on the CPU
as the operations that force such a read: a prefill under any reduction makes at most two more of
them than the stock forward, and the count does not grow with the depth.
"""

from __future__ import annotations

import pytest
import torch
from graph_emulator import TraceReplay, device_read
from torch.utils._python_dispatch import TorchDispatchMode

import vtw_train
import vtw_train.engine.forward as engine_forward
from vtw_train.engine import Reduction
from vtw_train.gate import ExitGate, GateConfig, GateExitRule
from vtw_train.methods import FastV
from vtw_train.tiny_models import tiny_inputs, tiny_model


class HostReads(TorchDispatchMode):
    """Counts the device-to-host reads of the code run under it (dispatched ops and ``tolist``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += device_read(func, args) is not None
        return func(*args, **(kwargs or {}))


@pytest.fixture
def reads(monkeypatch):
    mode = HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        mode.count += 1
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    # The engine's one designated late read: a gate decision taken ``lag`` layers earlier, copied to
    # pinned memory without blocking; on a GPU the host waits for that copy only, not for the queue.
    monkeypatch.setattr(engine_forward, "_read", lambda host: tolist(host))
    return mode


def gate_rule(num_layers: int, lag: int, tau: float) -> GateExitRule:
    torch.manual_seed(0)
    gate = ExitGate(GateConfig(hidden_size=64, num_layers=num_layers, width=8, min_layer=0, lag=lag, tau=tau))
    return GateExitRule(gate)


REDUCTIONS = {
    "fixed K": lambda L: Reduction(exit_layer=2),
    "K per sample": lambda L: Reduction(exit_layer=torch.tensor([1, 2, L])),
    "FastV": lambda L: Reduction(pruning=FastV(layer=1, keep_ratio=0.5)),
    "ShortV": lambda L: Reduction(frozen_layers={0, 1, 3}),
    "ShortV + K": lambda L: Reduction(frozen_layers={0}, exit_layer=3),
    "gate asked, never fires (lag 1)": lambda L: Reduction(exit_rule=gate_rule(L, lag=1, tau=1.0)),
    "gate fires (lag 1)": lambda L: Reduction(exit_rule=gate_rule(L, lag=1, tau=0.01)),
}


def host_reads(reads: HostReads, num_layers: int, reduction, graphs: bool = False) -> tuple[int, int]:
    model = tiny_model("llava", num_layers=num_layers)
    inputs = tiny_inputs(model, batch_size=3, seed=1)
    reads.count = 0
    with torch.no_grad(), reads:
        model(**inputs)
    stock = reads.count
    controller = vtw_train.attach(model)
    controller.reduction = reduction(num_layers)
    if graphs:  # recorded on the first call, replayed on the counted one
        controller.enable_graphs(capture=TraceReplay)
        with torch.no_grad():
            model(**inputs)
    reads.count = 0
    with torch.no_grad(), reads:
        model(**inputs)
    return stock, reads.count


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_a_prefill_reads_the_device_at_most_twice_more_than_stock_at_any_depth(reads, name):
    shallow_stock, shallow = host_reads(reads, 4, REDUCTIONS[name])
    deep_stock, deep = host_reads(reads, 8, REDUCTIONS[name])
    assert shallow - shallow_stock <= 2, (
        f"{name}: {shallow} reads against the stock forward's {shallow_stock}"
    )
    assert deep == shallow and deep_stock == shallow_stock, (
        f"{name}: the reads grow with depth ({shallow} -> {deep})"
    )


@pytest.mark.parametrize(
    "name", ["nothing withdrawn", "fixed K", "K per sample", "FastV", "ShortV + K", "gate fires (lag 1)"]
)
def test_a_graph_replayed_prefill_reads_the_device_at_most_twice_more_than_stock(reads, name):
    reduction = REDUCTIONS.get(name, lambda L: Reduction())
    shallow_stock, shallow = host_reads(reads, 4, reduction, graphs=True)
    _, deep = host_reads(reads, 8, reduction, graphs=True)
    assert shallow - shallow_stock <= 2 and deep == shallow, f"{name}: {shallow_stock} -> {shallow}, {deep}"


def test_an_unlagged_gate_reads_every_decision_at_once(reads):
    """Why the lag exists: without it, every asked layer is a read (and on a GPU, a drain)."""
    _, shallow = host_reads(reads, 4, lambda L: Reduction(exit_rule=gate_rule(L, lag=0, tau=1.0)))
    _, deep = host_reads(reads, 8, lambda L: Reduction(exit_rule=gate_rule(L, lag=0, tau=1.0)))
    assert deep - shallow == 4  # one per extra asked layer


def test_the_counter_sees_the_reads_it_must(reads):
    t = torch.tensor([1.0, 2.0])
    with reads:
        bool(t.any())
        t.tolist()
        t[t > 1]
        torch.nonzero(t)
    assert reads.count == 4


@pytest.mark.parametrize("lag", [0, 1])
def test_a_decision_copied_to_pinned_memory_is_read_only_after_its_copy_finished(lag):
    """On a GPU the decision travels to pinned memory asynchronously; reading before the copy's event would
    read whatever the buffer held (this once happened at lag 0)."""
    order: list[str] = []

    class Event:
        def synchronize(self):
            order.append("wait")

    class PinnedBuffer:
        def tolist(self):
            order.append("read")
            return [True, False]

    decisions = engine_forward._LaggedDecisions(lag)
    decisions._pending.append((0, [3, 5], PinnedBuffer(), Event()))
    assert decisions.due(1 + lag) == [3]
    assert order == ["wait", "read"]
