"""Replaying runs of decoder layers as CUDA graphs: the opt-in fast path for small batches.

At batch 1 an eager 7B decoder is bound by Python launching kernels, not by the GPU: the text-only
layers after an exit are cheaper on the device, but each still costs its launches, so a shorter
sequence barely shows as time. A CUDA graph records a run of layers once per shape and replays it
with one launch. The engine cuts each prefill into *segments*, runs of consecutive layers in which
no sample can change group (cut at exits, around FastV's layer and where an exit rule is asked), and
hands each segment to :class:`SegmentGraphs` as a pure function of tensors, which records it once per
shape and replays it. Where graphs do not apply (CPU, gradients, a batch over ``max_batch``) the
prefill runs layer by layer as without them.

Why a segment must be a pure function: a replay re-runs the recorded kernels only. Python side
effects (a cache's ``update``) happen once, at capture, and outputs are the same buffers on every
replay. So a segment returns its keys and values, and the engine copies them out (one ``stack``
each) before anything can replay the graph again.

See docs/engine.md, "Graph-captured prefill".
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import WithdrawalError

Segment = Callable[..., Sequence[torch.Tensor]]


@dataclass(frozen=True)
class GraphSettings:
    """When segments are captured, and how many graphs are kept."""

    max_batch: int = 8
    """Capture only prefills of at most this many rows. Larger batches keep the GPU busy on their own, and
    a graph holds its own copy of every intermediate and of the segment's keys and values."""
    max_graphs: int = 96
    """Graphs kept, least recently used dropped first. One graph per (segment, batch, widths); a new prompt
    length is a new shape. A gate asked after every layer makes one segment per layer, so a 32-layer
    decoder needs 32 graphs per prompt shape."""
    max_bytes: int | None = None
    """Memory the recorded graphs may hold together (their intermediates and outputs), least recently used
    dropped first (None: a quarter of the GPU's memory)."""
    warmup: int = 2
    """Eager runs of a new shape before it is captured (cuBLAS and SDPA pick their kernels there)."""

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_graphs"):
            if getattr(self, name) < 1:
                raise WithdrawalError(f"GraphSettings.{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise WithdrawalError(f"GraphSettings.max_bytes must be >= 1 or None, got {self.max_bytes}.")
        if self.warmup < 0:
            raise WithdrawalError(f"GraphSettings.warmup must be >= 0, got {self.warmup}.")


class Replay(Protocol):
    """A recorded segment. It reads its inputs from ``static`` (the caller writes new values there first)
    and returns the same output tensors on every call, overwritten in place."""

    static: list[torch.Tensor | None]
    outputs: list[torch.Tensor]

    def __call__(self) -> Sequence[torch.Tensor]: ...


Capture = Callable[[Segment, list[torch.Tensor | None], int], Replay]
"""Records ``segment`` reading the given input buffers (after ``warmup`` eager runs) and returns its replay."""


class CudaGraphReplay:
    """One segment recorded as a ``torch.cuda.CUDAGraph``."""

    def __init__(self, segment: Segment, static: list[torch.Tensor | None], warmup: int) -> None:
        self.static = static
        self.device = next(t.device for t in static if t is not None)
        # Everything on the inputs' device, whichever device is current: torch's default capture stream lives on
        # the device current when it was first used, and a capture on another device's stream records nothing.
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
                for _ in range(warmup):
                    segment(*static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.empty_cache()
            reserved = torch.cuda.memory_reserved(self.device)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls from other threads (a data loader's pinning thread) do not break the capture.
            with torch.cuda.graph(
                self.graph, stream=torch.cuda.Stream(self.device), capture_error_mode="thread_local"
            ):
                self.outputs = list(segment(*static))
            # What the graph's private pool holds: its intermediates and its outputs.
            self.nbytes = max(torch.cuda.memory_reserved(self.device) - reserved, 0)

    def __call__(self) -> Sequence[torch.Tensor]:
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.outputs


def _nbytes(replay: Replay) -> int:
    """Memory a recorded graph holds (its own measure, or at least its outputs)."""
    measured = getattr(replay, "nbytes", None)
    if measured is not None:
        return int(measured)
    return sum(t.numel() * t.element_size() for t in replay.outputs)


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device.type == "cuda" else torch.is_autocast_cpu_enabled()


def _signature_of(tensor: torch.Tensor | None) -> Hashable:
    if tensor is None:
        return None
    return (tuple(tensor.shape), tensor.dtype, tensor.device)


@dataclass
class GraphStats:
    """What the graph path did since it was enabled (for benchmarks and tests)."""

    captures: int = 0
    replays: int = 0
    eager: int = 0
    """Prefills run layer by layer while graphs were on (CPU, gradients on, training mode, a batch over
    ``max_batch``)."""
    evicted: int = 0
    failures: list[str] = field(default_factory=list)


class SegmentGraphs:
    """Runs segments eagerly or as recorded graphs, keyed by segment and input shapes.

    Graphs are recorded for the model as it is: weights are read from their buffers at replay, so
    in-place updates are seen, but replacing a parameter (``model.to(...)``, loading a state dict
    with ``assign=True``) or switching peft adapters changes the model's signature and drops every
    graph before the next capture.
    """

    def __init__(self, settings: GraphSettings | None = None, capture: Capture | None = None) -> None:
        self.settings = settings or GraphSettings()
        self._capture = capture
        self._graphs: OrderedDict[Hashable, Replay] = OrderedDict()
        self._live: dict[int, torch.Tensor] = {}  # outputs of the recorded graphs, by id
        self._shared: dict[Hashable, torch.Tensor] = {}  # input buffers read by many graphs
        self._written: dict[int, torch.Tensor] = {}  # what each shared buffer holds now
        self._model_signature: Hashable = None
        self._watch = _ModelWatch()
        self._broken = False
        self._prefill = 0  # prefills seen, so an eviction can tell whether it undoes this prefill's work
        self._recorded_in: dict[int, int] = {}  # id(replay) -> the prefill that recorded it
        self._warned_small = False
        self._bytes = 0  # memory held by the recorded graphs
        self.stats = GraphStats()

    def active_for(self, device: torch.device, batch: int) -> bool:
        """Whether this prefill's segments are captured (else they run eagerly, as they would without graphs).

        Not under autocast: a graph would keep reading autocast's cached weight casts after they are freed.
        """
        if self._broken or batch > self.settings.max_batch or torch.is_grad_enabled() or _autocast_on(device):
            return False
        return self._capture is not None or device.type == "cuda"

    def check_model(self, language_model: nn.Module) -> bool:
        """Called once per prefill: drops every graph when the model's parameters or adapter state changed
        since they were recorded. False when the decoder spans several devices (a graph records one)."""
        self._prefill += 1
        signature = self._watch.signature(language_model)
        if signature != self._model_signature:
            self.clear()
            self._model_signature = signature
        return self._watch.devices == 1

    def clear(self) -> None:
        """Release every recorded graph (and the memory it holds)."""
        self._graphs.clear()
        self._bytes = 0
        self._recorded_in.clear()
        self._live.clear()
        self._shared.clear()
        self._written.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    def run(
        self,
        key: Hashable,
        segment: Segment,
        inputs: Sequence[torch.Tensor | None],
        shared: frozenset[int] = frozenset(),
    ) -> tuple[Sequence[torch.Tensor], bool]:
        """The segment's outputs, and whether they are replay buffers (to be copied before the next replay).

        ``key`` names the segment (its layers and anything its Python code branches on); input shapes are
        added here. Inputs at the positions in ``shared`` are the same tensors for many segments of a
        prefill (rotary tables, masks): graphs of the same shapes read them from one buffer, written once
        per new tensor rather than once per graph. An input that is another graph's output is read where
        it lies. If recording fails, graphs are switched off for good and the segment runs eagerly.
        """
        if self._broken:  # a capture failed earlier in this prefill
            return segment(*inputs), False
        # Buffers made under inference_mode cannot be written outside it (and the reverse): part of the key.
        full_key = (key, torch.is_inference_mode_enabled(), tuple(_signature_of(t) for t in inputs))
        replay = self._graphs.get(full_key)
        if replay is None:
            static = [self._buffer_for(i, t, i in shared) for i, t in enumerate(inputs)]
            self._load(static, inputs, shared)
            try:
                replay = self._record(segment, static)
            except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager path
                self._give_up(err)
                return segment(*inputs), False
            self._graphs[full_key] = replay
            self._recorded_in[id(replay)] = self._prefill
            self._live.update((id(t), t) for t in replay.outputs)
            self._bytes += _nbytes(replay)
            while len(self._graphs) > 1 and (
                len(self._graphs) > self.settings.max_graphs or self._bytes > self._budget(replay)
            ):
                self._evict_oldest()
        else:
            self._graphs.move_to_end(full_key)
            self._load(replay.static, inputs, shared)
        self.stats.replays += 1
        return replay(), True

    def _budget(self, replay: Replay) -> float:
        if self.settings.max_bytes is not None:
            return self.settings.max_bytes
        device = getattr(replay, "device", None)
        if device is None or device.type != "cuda":
            return float("inf")
        return torch.cuda.get_device_properties(device).total_memory / 4

    def _evict_oldest(self) -> None:
        _, evicted = self._graphs.popitem(last=False)
        self._bytes -= _nbytes(evicted)
        if self._recorded_in.pop(id(evicted), None) == self._prefill and not self._warned_small:
            self._warned_small = True
            warnings.warn(
                "vtw_train: one prefill needs more graphs than GraphSettings keeps (max_graphs="
                f"{self.settings.max_graphs}, max_bytes={self.settings.max_bytes}), so every prefill records its "
                "graphs again (slow). Raise max_graphs or max_bytes, or ask the gate less often (GateConfig.ask_every).",
                RuntimeWarning,
                stacklevel=5,
            )
        for t in evicted.outputs:
            self._live.pop(id(t), None)
        read = {id(t) for replay in self._graphs.values() for t in replay.static if t is not None}
        for slot, buffer in list(self._shared.items()):
            if id(buffer) not in read:  # no graph left reads it
                del self._shared[slot]
                self._written.pop(id(buffer), None)
        self.stats.evicted += 1

    def _buffer_for(self, position: int, tensor: torch.Tensor | None, shared: bool) -> torch.Tensor | None:
        if tensor is None:
            return None
        if shared:
            slot = (position, _signature_of(tensor), torch.is_inference_mode_enabled())
            if slot not in self._shared:
                self._shared[slot] = torch.empty_like(tensor, memory_format=torch.contiguous_format)
            return self._shared[slot]
        if self._live.get(id(tensor)) is tensor:  # another graph's output: read in place
            return tensor
        return torch.empty_like(tensor, memory_format=torch.contiguous_format)

    def _load(
        self, static: list[torch.Tensor | None], inputs: Sequence[torch.Tensor | None], shared: frozenset[int]
    ) -> None:
        """Write this call's inputs into the buffers a graph reads; a shared buffer that already holds the same
        tensor (the previous segment's rotary table) is left alone."""
        for position, (buffer, tensor) in enumerate(zip(static, inputs, strict=True)):
            if buffer is None or buffer is tensor:
                continue
            if position in shared:
                if self._written.get(id(buffer)) is tensor:
                    continue
                self._written[id(buffer)] = tensor
            buffer.copy_(tensor)

    def _record(self, segment: Segment, static: list[torch.Tensor | None]) -> Replay:
        capture = self._capture or CudaGraphReplay
        replay = capture(segment, static, self.settings.warmup)
        self.stats.captures += 1
        return replay

    def _give_up(self, err: Exception) -> None:
        self._broken = True
        self.clear()
        message = f"{type(err).__name__}: {err}"
        self.stats.failures.append(message)
        warnings.warn(
            "vtw_train: recording a decoder segment as a CUDA graph failed, so graphs are off for this model "
            f"and prefill runs eagerly (same results). Cause: {message}. Call controller.disable_graphs() to "
            "silence this, or report the model class and attention implementation.",
            RuntimeWarning,
            stacklevel=4,
        )


#: Bumped whenever any module gets a new submodule, parameter or buffer (peft wrapping, merging, assigning
#: a state dict): the one event after which a model's parameter list must be walked again.
_structure_version = 0
_watching = False


def _structure_changed(*args: Any) -> None:
    global _structure_version
    _structure_version += 1


def _watch_structure() -> None:
    global _watching
    if not _watching:
        torch.nn.modules.module.register_module_module_registration_hook(_structure_changed)
        torch.nn.modules.module.register_module_parameter_registration_hook(_structure_changed)
        torch.nn.modules.module.register_module_buffer_registration_hook(_structure_changed)
        _watching = True


def _adapter_switches(module: nn.Module) -> Hashable:
    """A peft layer's on/off, active and merged adapters; read from its attributes (peft's properties cost
    about 2 us each, a quarter of a millisecond per prefill on a fully adapted 7B decoder)."""
    state = module.__dict__
    try:
        active = state["_active_adapter"]
        return (
            id(module),
            state["_disable_adapters"],
            active if isinstance(active, str) else tuple(active),
            tuple(state["merged_adapters"]),
        )
    except KeyError:  # another peft version: its public properties
        return (
            id(module),
            bool(module.disable_adapters),
            tuple(module.active_adapters or ()),
            bool(module.merged),
        )


class _ModelWatch:
    """What a recorded graph depends on: where the decoder's weights live and which adapters are on.

    Walking a 7B decoder's modules takes about a millisecond, several percent of a batch-1 prefill, so
    the walk is done again only after a module anywhere got a new submodule, parameter or buffer;
    each prefill reads the cached parameters' addresses and the adapters' switches.
    """

    def __init__(self) -> None:
        _watch_structure()
        self._model: nn.Module | None = None
        self._version = -1
        self._parameters: list[torch.Tensor] = []
        self._adapters: list[nn.Module] = []
        self._pointers: tuple[int, ...] = ()
        self.devices = 0  # how many devices the decoder's weights are on

    def signature(self, language_model: nn.Module) -> Hashable:
        if language_model is not self._model or self._version != _structure_version:
            self._model, self._version = language_model, _structure_version
            self._parameters = list(language_model.parameters())
            self._adapters = [
                m for m in language_model.modules() if hasattr(m, "active_adapters") and hasattr(m, "merged")
            ]
        pointers = tuple(p.data_ptr() for p in self._parameters)
        if pointers != self._pointers:  # weights moved: count the devices they are on again
            self._pointers = pointers
            self.devices = len({p.device for p in self._parameters})
        adapters = tuple(_adapter_switches(m) for m in self._adapters)
        return id(language_model), pointers, adapters


def kwargs_are_constants(values: dict[str, Any]) -> bool:
    """Keyword arguments a segment can take as constants: no tensor among them (a tensor would be frozen in)."""
    return not any(isinstance(v, torch.Tensor) for v in values.values())
