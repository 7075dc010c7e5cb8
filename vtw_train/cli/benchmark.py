"""``vtw-train benchmark``: wall-clock of every reduction strategy next to its FLOPs, on a real model's shape.

A random model with a real model's decoder shape (``--preset llava15_7b``, built directly on the
device in the chosen dtype: under a second for 7B on a GPU) is timed on ragged, left-padded
prompts at each batch size. Every strategy runs in one interleaved loop and is compared by
medians, with CUDA synchronised around each call. For each: prefill ms, measured speedup, the
FLOPs speedup of what actually ran (``vtw_train.flops``, per sample), their ratio (efficiency),
the KV-cache bytes after prefill and their ratio to what the samples need at their own exits (no padding;
rows that withdraw by exit layers only), the peak memory (CUDA) and the time to generate
``decode_tokens`` new tokens. Results go to stdout, ``benchmark.json`` and ``benchmark.md``.
On CUDA (or with ``--graphs true``) every strategy also gets a "graphed" row: the same strategy with
graph-captured prefill, and the largest difference of its output from the eager row's.

    vtw-train benchmark --preset llava15_7b --device cuda --dtype bfloat16 --batch_sizes [1,16,64]
    vtw-train benchmark --config configs/benchmark/cpu.yaml          # CPU, scaled-down shape

Only the language model is timed: the image positions hold the image token's embedding in place
of projected features (the vision tower's cost does not depend on the strategy), and VisPruner's
row is the stock model on T visual tokens, which is what VisPruner hands the language model.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from ..config import NonNegativeInt, PositiveInt, parse_config
from ..engine import FULL, Reduction, attach, controller_of
from ..engine.graphs import GraphSettings, SegmentGraphs
from ..evaluation.profiling import cache_bytes
from ..flops import DecoderDims, flops_ratio, prefill_flops, token_counts
from ..gate import ExitGate, GateConfig, GateExitRule
from ..methods import FastV

IMAGE_TOKEN_ID = 3


@dataclass(frozen=True)
class Shape:
    """A decoder shape and a prompt layout."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    visual_tokens: int
    prefix_tokens: int
    question_tokens: tuple[int, int]


#: Decoder shapes of real models (random weights) and the prompts they see.
PRESETS: dict[str, Shape] = {
    "llava15_7b": Shape(32, 4096, 11008, 32, 32, 32064, 576, 35, (8, 40)),
    "llava15_13b": Shape(40, 5120, 13824, 40, 40, 32064, 576, 35, (8, 40)),
    "llava_next_7b": Shape(32, 4096, 11008, 32, 32, 32064, 2880, 35, (8, 40)),
    "qwen2_vl_7b": Shape(28, 3584, 18944, 28, 4, 152064, 1024, 20, (8, 40)),
    "cpu_small": Shape(8, 256, 688, 8, 8, 1024, 144, 8, (4, 16)),
}


@dataclass
class BenchmarkRun:
    """A random model with a real model's shape, the batch sizes and the strategies to time."""

    preset: Literal["llava15_7b", "llava15_13b", "llava_next_7b", "qwen2_vl_7b", "cpu_small"] = "cpu_small"
    """Decoder shape and prompt layout (the LLaVA-NeXT shape has 2,880 visual tokens; the Qwen2-VL one is
    timed as a LLaVA-style decoder with its sizes)."""
    num_layers: PositiveInt | None = None
    """Override the preset's depth (a quick run on a smaller stack)."""
    batch_sizes: list[PositiveInt] = field(default_factory=lambda: [1, 4])
    """Batch sizes to time, each on its own ragged, left-padded prompts."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs (auto: cuda when available)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations dtype."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention backend."""
    exit_layers: list[NonNegativeInt] = field(default_factory=list)
    """VTW's K values to time (empty: L/2 and L/4)."""
    fastv_layer: PositiveInt = 2
    """FastV's layer K."""
    fastv_keep_ratio: float = 0.5
    """FastV's kept share of visual tokens."""
    shortv_layers: NonNegativeInt | None = None
    """ShortV's N (the last N layers frozen; default: 19/32 of the depth, ShortV's LLaVA-1.5-7B setting)."""
    vispruner_tokens: PositiveInt = 64
    """VisPruner's T: the language model then sees T visual tokens per image."""
    gate_lag: NonNegativeInt = 1
    """The gate's lag (a decision after layer l withdraws from l + 1 + lag)."""
    gate_fire_rate: float = 0.3
    """Share of (sample, layer) gate decisions that fire in the "gate fires" row (the gate's threshold is
    set to give it on these prompts)."""
    repeats: PositiveInt = 5
    """Timed interleaved rounds for the prefill."""
    warmup: NonNegativeInt = 1
    """Untimed rounds first."""
    decode_tokens: NonNegativeInt = 16
    """New tokens per ``generate`` call timed (0: skip decode timing)."""
    decode_repeats: PositiveInt = 3
    """Timed interleaved rounds for ``generate``."""
    threads: NonNegativeInt = 0
    """CPU threads for torch (0: torch's default)."""
    graphs: bool | None = None
    """Also time each strategy with graph-captured prefill (``controller.enable_graphs()``), as its own
    "graphed" row next to the eager one, with the largest difference between their outputs (None: on where
    the device is CUDA; on a CPU the graphed rows run eagerly)."""
    graphs_max_batch: PositiveInt = 8
    """Graphed rows only at batch sizes up to this: graphs cut launch overhead, which large batches hide, and
    each graph keeps its own copy of its segment's keys and values."""
    seed: int = 0
    """Seed of the weights, the prompts and the per-sample K mix."""
    output_dir: str = "outputs/benchmark"
    """Where benchmark.json and benchmark.md are written."""

    def shape(self) -> Shape:
        shape = PRESETS[self.preset]
        if self.num_layers is not None:
            shape = Shape(**{**asdict(shape), "num_layers": self.num_layers})
        return shape


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was requested but no CUDA device is available")
    return torch.device(name)


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype, attn: str, seed: int):
    """A random LLaVA with ``shape``'s decoder, created on ``device`` in ``dtype`` (no CPU copy, no init pass)."""
    text = LlamaConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        vocab_size=shape.vocab_size,
        max_position_embeddings=8192,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def prompts(
    shape: Shape, batch: int, visual: int, seed: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Left-padded ``prefix, image, question`` prompts with questions of random lengths (a real batch is ragged)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        question = rng.randint(*shape.question_tokens)
        text = [rng.randrange(10, shape.vocab_size) for _ in range(shape.prefix_tokens + question)]
        rows.append(text[: shape.prefix_tokens] + [IMAGE_TOKEN_ID] * visual + text[shape.prefix_tokens :])
    width = max(len(r) for r in rows)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.tensor(row)
        mask[b, width - len(row) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@dataclass
class Row:
    """One timed row: how to set the engine, and the prompts it runs on."""

    name: str
    reduction: Reduction | None  # None: the engine detached (the stock model)
    inputs: dict[str, torch.Tensor]
    exits: Callable[[], list[int | None]] | None = None  # per-sample exit layers of the last prefill
    kept_visual: int | None = None  # VisPruner: the visual tokens the language model sees
    graphs: bool = False  # prefill segments replayed as CUDA graphs
    twin: str | None = None  # graphed rows: the eager row with the same strategy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _medians(fns: dict[str, Callable[[], None]], setups: dict[str, Callable[[], None]], repeats: int, warmup: int,
             device: torch.device) -> dict[str, float]:  # fmt: skip
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_idx in range(warmup + repeats):
        for name, fn in fns.items():
            setups[name]()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_idx >= warmup:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def strategies_for(run: BenchmarkRun, model, shape: Shape, batch: int, device: torch.device) -> list[Row]:
    L = shape.num_layers
    base = prompts(shape, batch, shape.visual_tokens, run.seed + batch, device)
    controller = attach(model)

    def recorded() -> list[int | None]:
        return [None if k >= L else k for k in controller_of(model).last_exit_layers.tolist()]

    out = [
        Row("stock", None, base),
        Row("stock again (noise)", None, base),
        Row("engine, K = L", Reduction(exit_layer=L), base),
    ]
    torch.manual_seed(run.seed)
    gate = ExitGate(
        GateConfig(hidden_size=shape.hidden_size, num_layers=L, width=128, min_layer=0, lag=run.gate_lag)
    )
    gate = gate.to(device=device, dtype=model.dtype).eval()
    never = GateExitRule(gate, tau=1.0)
    out.append(Row("gate asked, never fires", Reduction(exit_rule=never), base, recorded))
    probe = GateExitRule(gate, tau=1.0)
    with torch.no_grad(), controller.using(exit_rule=probe):
        model.model(**base, use_cache=False)
    p = torch.cat([v.float().flatten() for v in probe.last_probabilities.values()])
    tau = float(torch.quantile(p, 1 - run.gate_fire_rate)) if p.numel() else 1.0
    out.append(
        Row(
            f"gate fires ({run.gate_fire_rate:.0%} of decisions)",
            Reduction(exit_rule=GateExitRule(gate, tau=tau)),
            base,
            recorded,
        )
    )
    for k in run.exit_layers or [L // 2, L // 4]:
        out.append(Row(f"VTW K = {k}", Reduction(exit_layer=k), base, recorded))
    rng = random.Random(run.seed)
    mix = torch.tensor([rng.randint(max(1, L // 8), L) for _ in range(batch)])
    out.append(
        Row(f"K per sample (mean {float(mix.float().mean()):.1f})", Reduction(exit_layer=mix), base, recorded)
    )
    out.append(Row(f"FastV K = {run.fastv_layer} keep {run.fastv_keep_ratio:g}",
                        Reduction(pruning=FastV(run.fastv_layer, run.fastv_keep_ratio)), base))  # fmt: skip
    n = run.shortv_layers if run.shortv_layers is not None else round(L * 19 / 32)
    out.append(Row(f"ShortV N = {n}", Reduction(frozen_layers=set(range(L - n, L))), base))
    pruned = prompts(shape, batch, min(run.vispruner_tokens, shape.visual_tokens), run.seed + batch, device)
    out.append(Row(f"VisPruner T = {run.vispruner_tokens} (LM on T tokens)", None, pruned,
                        kept_visual=min(run.vispruner_tokens, shape.visual_tokens)))  # fmt: skip
    if use_graphs(run, device) and batch <= run.graphs_max_batch:
        out += [graphed(row) for row in out if row.name not in GRAPHLESS]
    return out


#: Rows without a graphed twin: the noise row, and the engine at K = L (the "stock, graphed" row covers it).
GRAPHLESS = ("stock again (noise)", "engine, K = L")


def use_graphs(run: BenchmarkRun, device: torch.device) -> bool:
    return device.type == "cuda" if run.graphs is None else run.graphs


def graphed(row: Row) -> Row:
    """The same strategy with graph-captured prefill; the stock rows run the engine with nothing withdrawn."""
    reduction = FULL if row.reduction is None else row.reduction
    return Row(
        f"{row.name}, graphed", reduction, row.inputs, row.exits, row.kept_visual, graphs=True, twin=row.name
    )


def flops_speedup(model, strategy: Row, visual_total: int) -> float:
    """Full-model prefill FLOPs over this strategy's, summed over the batch (each sample at its own length)."""
    dims = DecoderDims.from_config(model.config)
    ids, mask = strategy.inputs["input_ids"], strategy.inputs["attention_mask"]
    n_text, n_visual = token_counts(ids == IMAGE_TOKEN_ID, mask)
    exits = strategy.exits() if strategy.exits is not None else [None] * len(n_text)
    reduction = strategy.reduction or FULL
    full = ratio_sum = 0.0
    for t, v, k in zip(n_text, n_visual, exits, strict=True):
        visual = visual_total if strategy.kept_visual is not None else v
        plan = reduction.flops_plan(n_visual=visual, kept_visual=strategy.kept_visual, exit_layer=k)
        full_t = prefill_flops(dims, t, visual)
        full += full_t
        ratio_sum += full_t * flops_ratio(dims, t, visual, plan)
    return full / ratio_sum


def kv_need_bytes(model, strategy: Row, exits: list[int | None] | None) -> int | None:
    """What the prompts' KV cache needs at each sample's own exit, without any padding: each sample's text in
    every layer plus its visual tokens below its K. None for rows that do not withdraw by exits (FastV,
    ShortV, VisPruner), whose need is not this formula."""
    if strategy.reduction is not None and not strategy.reduction.is_full and exits is None:
        return None
    if strategy.kept_visual is not None:
        return None
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token_layer = 2 * text.num_key_value_heads * head_dim * model.dtype.itemsize
    ids, mask = strategy.inputs["input_ids"], strategy.inputs["attention_mask"]
    n_text, n_visual = token_counts(ids == IMAGE_TOKEN_ID, mask)
    layers = text.num_hidden_layers
    ks = exits if exits is not None else [None] * len(n_text)
    tokens = sum(
        t * layers + v * (layers if k is None else k) for t, v, k in zip(n_text, n_visual, ks, strict=True)
    )
    return tokens * per_token_layer


def bench_batch(
    run: BenchmarkRun, model, shape: Shape, batch: int, device: torch.device
) -> list[dict[str, Any]]:
    controller = attach(model)
    rows = strategies_for(run, model, shape, batch, device)
    state: dict[str, Any] = {}
    # One recorder for every graphed row, switched on and off between rows without recording again.
    recorder = SegmentGraphs(GraphSettings(max_batch=batch, max_graphs=8 * len(rows)))

    def setup(s: Row) -> Callable[[], None]:
        def apply() -> None:
            engine = attach(model)
            engine.reduction = s.reduction if s.reduction is not None else FULL
            if s.graphs:
                engine.enable_graphs(recorder=recorder)
            else:
                engine.disable_graphs(release=False)
            if s.reduction is None:
                engine.detach()

        return apply

    def prefill(s: Row) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                state["out"] = model.model(**s.inputs, use_cache=True)

        return go

    def generate(s: Row) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                model.generate(**s.inputs, max_new_tokens=run.decode_tokens, min_new_tokens=run.decode_tokens,
                               do_sample=False, pad_token_id=0, suppress_tokens=[IMAGE_TOKEN_ID])  # fmt: skip

        return go

    setups = {s.name: setup(s) for s in rows}
    results = []
    exits_seen: dict[str, list[int | None]] = {}
    twins = {s.twin for s in rows if s.twin is not None}
    hidden: dict[str, torch.Tensor] = {}  # eager rows' outputs until their graphed twin has run
    for s in rows:  # one untimed pass each: cache size, peak memory, the exits the FLOPs are computed from
        setups[s.name]()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base_memory = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        prefill(s)()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base_memory if device.type == "cuda" else None
        out = state.pop("out")
        if s.name in twins:  # an eager row a graphed row is compared with (graphed rows come after it)
            hidden[s.name] = out.last_hidden_state.float()
        diff = None
        if s.twin is not None:
            diff = float((out.last_hidden_state.float() - hidden.pop(s.twin)).abs().max())
        kv = cache_bytes(out.past_key_values)
        if s.exits is not None:
            exits_seen[s.name] = s.exits()
        need = kv_need_bytes(model, s, exits_seen.get(s.name))
        speed = flops_speedup(
            model,
            Row(
                s.name,
                s.reduction,
                s.inputs,
                (lambda n=s.name: exits_seen[n]) if s.exits else None,
                s.kept_visual,
            ),
            shape.visual_tokens,
        )
        results.append(
            {
                "strategy": s.name,
                "batch": batch,
                "kv_bytes": kv,
                "kv_need_bytes": need,
                "peak_prefill_bytes": peak,
                "flops_speedup": speed,
                "graphs": s.graphs,
                "max_abs_diff_vs_eager": diff,  # graphed rows: the decoder's output against the eager row's
            }
        )
    times = _medians({s.name: prefill(s) for s in rows}, setups, run.repeats, run.warmup, device)
    decode = {}
    if run.decode_tokens:
        decode = _medians({s.name: generate(s) for s in rows}, setups, run.decode_repeats, 1, device)
    state.clear()
    hidden.clear()
    attach(model).disable_graphs()
    recorder.clear()
    attach(model).reduction = FULL
    stock = times["stock"]
    for r in results:
        if r["graphs"]:  # what the recorder did: a graphed row that recorded nothing ran eagerly
            r["graph_stats"] = asdict(recorder.stats)
        r["prefill_ms"] = times[r["strategy"]] * 1e3
        r["speedup"] = stock / times[r["strategy"]]
        r["efficiency"] = r["speedup"] / r["flops_speedup"]
        if decode:
            r["generate_s"] = decode[r["strategy"]]
            r["generate_speedup"] = decode["stock"] / decode[r["strategy"]]
    controller.reduction = FULL
    return results


COLUMNS = (
    "strategy",
    "prefill ms",
    "speedup",
    "FLOPs speedup",
    "efficiency",
    "KV MiB",
    "KV / need",
    "peak MiB",
    "generate s",
    "gen. speedup",
    "diff vs eager",
)


def _row(r: dict[str, Any]) -> list[str]:
    def num(value: Any, fmt: str) -> str:
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    peak = None if r["peak_prefill_bytes"] is None else r["peak_prefill_bytes"] / 2**20
    return [r["strategy"], num(r["prefill_ms"], ".1f"), num(r["speedup"], ".2f") + "x", num(r["flops_speedup"], ".2f") + "x",
            num(r["efficiency"], ".2f"), num(r["kv_bytes"] / 2**20, ".1f"),
            num(r["kv_bytes"] / r["kv_need_bytes"] if r.get("kv_need_bytes") else None, ".2f"), num(peak, ".0f"),
            num(r.get("generate_s"), ".3f"), num(r.get("generate_speedup"), ".2f") + ("x" if "generate_speedup" in r else ""),
            num(r.get("max_abs_diff_vs_eager"), ".2g")]  # fmt: skip


def markdown(results: list[dict[str, Any]], header: str) -> str:
    lines = [header, ""]
    for batch in sorted({r["batch"] for r in results}):
        lines += [f"### batch {batch}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(_row(r)) + " |" for r in results if r["batch"] == batch]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    run = parse_config(BenchmarkRun, argv, "vtw-train benchmark", __doc__ or "")
    if run.threads:
        torch.set_num_threads(run.threads)
    if not 0.0 < run.gate_fire_rate < 1.0:
        raise ValueError(f"gate_fire_rate must be in (0, 1), got {run.gate_fire_rate}")
    device = resolve_device(run.device)
    dtype = getattr(torch, run.dtype)
    shape = run.shape()
    started = time.perf_counter()
    model = build_model(shape, device, dtype, run.attn_implementation, run.seed)
    built = time.perf_counter() - started
    header = (
        f"Random LLaVA with the `{run.preset}` decoder ({shape.num_layers} x {shape.hidden_size}, MLP "
        f"{shape.intermediate_size}, {shape.num_heads} heads), {shape.visual_tokens} visual + {shape.prefix_tokens} prefix + "
        f"{shape.question_tokens[0]}-{shape.question_tokens[1]} question tokens, left-padded; {device} "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} {run.dtype}, {run.attn_implementation}; "
        f"medians of {run.repeats} interleaved prefills (and {run.decode_repeats} generate calls of "
        f"{run.decode_tokens} tokens); built in {built:.1f} s."
    )
    if use_graphs(run, device):
        header += (" Graphed rows: prefill segments replayed as CUDA graphs (recorded in the untimed pass)."
                   if device.type == "cuda" else " Graphed rows on a CPU run eagerly (no CUDA graphs).")  # fmt: skip
    print(header)
    results: list[dict[str, Any]] = []
    for batch in run.batch_sizes:
        rows = bench_batch(run, model, shape, batch, device)
        results += rows
        first_graphed = next((r for r in rows if r["graphs"]), None)
        if first_graphed is not None and device.type == "cuda":
            stats = first_graphed["graph_stats"]
            print(f"graphs at batch {batch}: {stats['captures']} recorded, {stats['replays']} replays, "
                  f"{stats['eager']} eager prefills, failures: {stats['failures'] or 'none'}")  # fmt: skip
        first = max(len(r["strategy"]) for r in rows)
        print(f"\nbatch {batch}")
        print(f"{COLUMNS[0]:<{first}}" + "".join(f"{c:>14}" for c in COLUMNS[1:]))
        for r in rows:
            cells = _row(r)
            print(f"{cells[0]:<{first}}" + "".join(f"{c:>14}" for c in cells[1:]))
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(
        json.dumps({"config": asdict(run), "header": header, "results": results}, indent=2) + "\n"
    )
    (out / "benchmark.md").write_text(markdown(results, header) + "\n")
    print(f"\nwritten: {out / 'benchmark.json'}, {out / 'benchmark.md'}")
    return results
