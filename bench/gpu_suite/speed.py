"""Parts `speed`, `transformers` and `transformers_compiled`: the issue's speed figures for
our engine and for transformers' CSM on the same device and the same weights (the `models`
folder), in the same run, with bench/run.py's measurements. The report divides one by the
other. `speed` also records what one frame step launches (CUDA kernels on a GPU, by name,
from torch's profiler). `speed_whole_window` is `speed` with attention over the whole window,
the engine before key spans (frame_step.py), for a before-and-after in one run. The weights
are random: these are speed figures only.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from csm.engine import Engine
from csm.frame_step import KEY_BLOCK

from .. import run as bench
from .context import Context


def launches(call: Callable[[], object], device: torch.device, top: int = 12) -> dict:
    """What one call runs, from torch's profiler: on a GPU its CUDA kernels (whatever each
    operation becomes there, one fused kernel or several); on the CPU, as a stand-in, the
    ATen operations called directly (views included)."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU]
                 + ([ProfilerActivity.CUDA] if cuda else [])) as trace:
        call()
        bench.sync(device)
    if cuda:
        names = [e.name for e in trace.events() if e.device_type == DeviceType.CUDA]
    else:
        names = [e.name for e in trace.events() if e.name.startswith("aten::") and not (
            e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]
    counts = Counter(name[:120] for name in names)
    return {"unit": "CUDA kernels" if cuda else "ATen operations called directly",
            "total": len(names), "most_frequent": dict(counts.most_common(top))}


def ours(ctx: Context) -> None:
    _ours(ctx, KEY_BLOCK)


def ours_whole_window(ctx: Context) -> None:
    """The same with attention over the whole window: the engine before key spans."""
    _ours(ctx, bench.SHAPES[ctx.mode.main_shapes].backbone.max_seq_len)


def _ours(ctx: Context, key_block: int) -> None:
    mode, device = ctx.mode, ctx.device
    ctx.record(shapes=mode.main_shapes, dtype=mode.speed_dtype, frames=mode.frames,
               reps=mode.reps, graphs=mode.graphs, key_block=key_block)
    ctx.step("Engine.load")
    start = time.perf_counter()
    with Engine.load(ctx.model_dir(mode.main_shapes), device=device, dtype=ctx.dtype,
                     max_batch=max(mode.concurrency), use_graphs=mode.graphs,
                     key_block=key_block) as engine:
        bench.sync(device)
        ctx.record(startup_ms=dict(engine.startup_ms,
                                   total=1000 * (time.perf_counter() - start)),
                   graphs_captured=len(engine.scheduler.stepper.graphs))
        ctx.step("batch 1")
        ctx.record(batch1=bench.ours(engine, mode.frames, mode.reps))
        rows: list[dict] = []
        for jobs in mode.concurrency:
            ctx.step(f"{jobs} concurrent jobs")
            rows += bench.concurrency_sweep(engine, mode.frames, [jobs], sequential=False)
            ctx.record(concurrency=rows)
        # Eager, one row over the first key span: what each replay of a graph runs. The
        # engine is idle, so the step only moves a parked row's scratch state.
        ctx.step("what one frame step launches")
        stepper = engine.scheduler.stepper
        with torch.inference_mode():
            ctx.record(frame_step_launches=launches(lambda: stepper._step(1, stepper.spans[0]),
                                                    device))
    figures = [ctx.result["measurements"]["batch1"]["frames_per_s"]["median"],
               *(r["aggregate_frames_per_s"] for r in rows)]
    ctx.check("every figure is positive and finite",
              all(math.isfinite(f) and f > 0 for f in figures), figures)


def _transformers(ctx: Context, compile_forward: bool) -> None:
    mode = ctx.mode
    folder = ctx.model_dir(mode.main_shapes)
    ctx.step("transformers: building the model and generating" if not compile_forward else
             "transformers: building, compiling and generating")
    result = bench.transformers_side(bench.SHAPES[mode.main_shapes], bench.folder_weights(folder),
                                     bench.prompt_ids(folder), ctx.device, ctx.dtype,
                                     mode.frames, mode.reps, compile_forward=compile_forward)
    ctx.record(shapes=mode.main_shapes, dtype=mode.speed_dtype, frames=mode.frames, **result)
    ctx.check("frames/s is positive and finite",
              math.isfinite(result["frames_per_s"]["median"])
              and result["frames_per_s"]["median"] > 0, result["frames_per_s"])


def transformers(ctx: Context) -> None:
    _transformers(ctx, compile_forward=False)


def transformers_compiled(ctx: Context) -> None:
    _transformers(ctx, compile_forward=True)
