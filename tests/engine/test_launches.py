"""What the engine adds to the kernels a prefill launches, counted on the CPU.

At batch 1 on a GPU the eager decoder is bound by launching kernels, so a strategy that saves
FLOPs but launches more kernels per layer is slower there. Counted as the dispatched aten
operations that compute something (views and metadata excluded), per layer added to the depth.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vtw_train
from vtw_train.engine import Reduction
from vtw_train.gate import ExitGate, GateConfig, GateExitRule
from vtw_train.tiny_models import tiny_inputs, tiny_model

#: Operations that only make views or read metadata: no kernel on a GPU.
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "expand", "slice", "select", "unsqueeze", "squeeze",
             "permute", "alias", "detach", "as_strided", "reshape", "split", "unbind", "split_with_sizes",
             "_reshape_alias", "lift_fresh", "empty", "empty_like", "empty_strided", "unflatten", "flatten",
             "narrow"}  # fmt: skip


class Kernels(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._schema.name.split("::")[-1] not in NO_KERNEL
        return func(*args, **(kwargs or {}))


def kernels(num_layers: int, reduction) -> int:
    model = tiny_model("llava", num_layers=num_layers)
    controller = vtw_train.attach(model)
    controller.reduction = reduction(num_layers)
    counter = Kernels()
    with torch.no_grad(), counter:
        model.model(**tiny_inputs(model, batch_size=1, seed=1), use_cache=True)
    return counter.count


def per_layer(reduction) -> float:
    """Kernels each extra layer adds (depth 8 against depth 4)."""
    return (kernels(8, reduction) - kernels(4, reduction)) / 4


def test_a_fixed_exit_adds_kernels_once_not_per_layer():
    assert per_layer(lambda L: Reduction(exit_layer=L // 2)) == per_layer(lambda L: Reduction())


def test_a_frozen_layer_launches_under_one_and_three_quarters_of_a_stock_layer():
    """ShortV's layer-independent work (mask, text layout, rotary tables) is done once per prefill."""
    stock = per_layer(lambda L: Reduction())
    frozen = per_layer(lambda L: Reduction(frozen_layers=set(range(L))))
    assert frozen < 1.75 * stock, f"a frozen layer launches {frozen:.0f} kernels, a stock one {stock:.0f}"


def test_asking_the_gate_adds_at_most_a_third_of_a_layer():
    def gate(L: int) -> Reduction:
        torch.manual_seed(0)
        config = GateConfig(hidden_size=64, num_layers=L, width=8, min_layer=0, lag=1, tau=1.0)
        return Reduction(exit_rule=GateExitRule(ExitGate(config)))

    stock = per_layer(lambda L: Reduction())
    assert per_layer(gate) - stock <= stock / 3
