"""A CPU stand-in for a CUDA graph, faithful to what a recorded graph can and cannot do.

A CUDA graph records kernels once and replays them: Python does not run again, so anything the
code decided from tensor values at capture is frozen in, outputs are the same buffers on every
replay, and reading a device value during capture fails. This recorder does the same with aten
operations on the CPU: it records every operation the segment dispatches (refusing host reads),
and a replay re-executes that list on the new inputs, writing into the recorded output tensors.
A segment that only works eagerly (Python side effects, values read on the host, outputs kept
across replays, a tensor read by the recording but freed after it) gives wrong numbers or fails
here, as it would on a GPU.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

#: aten operations whose result size or value the host must read from the device.
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
           "unique_consecutive", "argwhere", "repeat_interleave"}  # fmt: skip


def device_read(func, args) -> str | None:
    """What makes this dispatched operation read the device on the host (None: nothing)."""
    name = func._schema.name.split("::")[-1]
    if name in SYNCING:
        return f"aten::{name} reads the device"
    if name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)):
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            return "boolean-mask indexing reads the device"
    return None


class CaptureError(RuntimeError):
    """What CUDA raises when captured code reads a device value on the host."""


class _External:
    """A tensor the recording reads but neither received as an input nor made: held weakly, as a graph holds
    only its address. If it is freed before a replay, the replay fails (on a GPU it would read freed memory)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.ref = weakref.ref(tensor)

    def resolve(self) -> torch.Tensor:
        tensor = self.ref()
        if tensor is None:
            raise CaptureError("a recorded graph reads a tensor that was freed after the capture")
        return tensor


class _Recorder(TorchDispatchMode):
    def __init__(self, inputs: list[torch.Tensor | None]) -> None:
        super().__init__()
        self.ops: list[tuple[Any, Any, Any, Any]] = []
        self.owned = {id(t): t for t in inputs if t is not None}  # inputs and everything made: held strongly

    def _hold(self, value):
        if not isinstance(value, torch.Tensor) or id(value) in self.owned:
            return value
        return _External(value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = device_read(func, args)
        if reason is not None:
            raise CaptureError(f"operation not permitted when stream is capturing: {reason}")
        out = func(*args, **kwargs)
        self.ops.append((func, tree_map(self._hold, args), tree_map(self._hold, kwargs), out))
        for made in tree_flatten(out)[0]:
            if isinstance(made, torch.Tensor):
                self.owned.setdefault(id(made), made)
        return out


class TraceReplay:
    """Records ``segment`` as a list of aten operations; calling it replays them on new inputs."""

    def __init__(self, segment, static: list[torch.Tensor | None], warmup: int) -> None:
        self.static = static  # the caller writes each call's inputs here; the recording reads them in place
        for _ in range(warmup):
            segment(*self.static)
        recorder = _Recorder(static)
        tolist = torch.Tensor.tolist

        def refuse(tensor):
            raise CaptureError("tolist() reads the device while capturing")

        torch.Tensor.tolist = refuse  # type: ignore[method-assign]
        try:
            with recorder:
                self.outputs = list(segment(*self.static))
        finally:
            torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        self.ops = recorder.ops
        self._owned = recorder.owned  # what a graph's own memory pool would hold
        self.replays = 0

    def __call__(self) -> list[torch.Tensor]:
        env: dict[int, torch.Tensor] = {}  # what each recorded tensor is in this replay (inputs: themselves)

        def current(value):
            if isinstance(value, _External):
                return value.resolve()
            return env.get(id(value), value) if isinstance(value, torch.Tensor) else value

        for func, args, kwargs, out in self.ops:
            result = func(*tree_map(current, args), **tree_map(current, kwargs))
            old, _ = tree_flatten(out)
            new, _ = tree_flatten(result)
            for before, after in zip(old, new, strict=True):
                if isinstance(before, torch.Tensor):
                    env[id(before)] = after
        for output in self.outputs:  # the same buffers every replay, overwritten
            output.copy_(env[id(output)])
        self.replays += 1
        return self.outputs
