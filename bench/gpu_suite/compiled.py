"""Part `compiled` (named with --parts, not in the default run): `CSM_COMPILE=1` against the
engine as it is.

The depth decoder's 31 passes per frame hold most operations of a frame step (2467 of 2737
in bf16 at csm-1b shapes, the backbone's pass over the frame the rest: BENCHMARKS.md), most of
them small: at batch 1 on a GPU their launches and latencies, more than the bytes they read,
may bound a frame even when replayed from a CUDA graph. Inductor fuses the elementwise ones
into fewer kernels.

Batch 1 and 8 jobs at once (4 in the CPU mode) at the main shapes in the speed dtype, graphs
as deployed, three engines loaded from the same folder in one run: as it is, as
`CSM_COMPILE=1` loads it, with the frame step (depth decoder and the backbone's pass over the
frame) compiled by inductor (`CSM.compile_frame_step`) at start-up, before the frame step is captured, so that its kernels are replayed inside our
graphs, and as `CSM_COMPILE=1 CSM_DECODER_INT8=1` loads it, compiled with int8 weights
(where the int8 lead can pay: see the `int8` part). Measured: frames/s and real-time factor of each at batch 1, their aggregate frames/s
with the jobs at once (where the compiled engine runs its version with a symbolic batch
size), the time compiling added to start-up and the first job (and the engine's own start-up
breakdown), and the first frame where the compiled engine's codes leave the plain one's
(inductor may round differently: for information). Inductor caches what it compiled on disk
(TORCHINDUCTOR_CACHE_DIR): a second run in the same place compiles faster (dynamo still
traces), so the first run on a machine is the one that shows the cold cost.
"""

from __future__ import annotations

import math
import time

from csm.engine import Engine, GenerationRequest

from .. import run as bench
from .context import Context
from .graphs_eager import first_difference


# label -> (compiled, int8 decoder), built in this order
ENGINES = {"plain": (False, False), "compiled": (True, False), "compiled_int8": (True, True)}


def build(ctx: Context, label: str, max_batch: int) -> Engine:
    compiled, int8 = ENGINES[label]
    return Engine.load(ctx.model_dir(ctx.mode.main_shapes), ctx.device, ctx.dtype,
                       max_batch=max_batch, use_graphs=ctx.mode.graphs,
                       compile_backend="inductor" if compiled else None, decoder_int8=int8)


def run(ctx: Context) -> None:
    mode = ctx.mode
    jobs = mode.concurrency[1]  # 8 on a GPU, the worker's default: batch 1 static, 8 symbolic
    ctx.record(shapes=mode.main_shapes, dtype=mode.speed_dtype, frames=mode.frames,
               reps=mode.reps, graphs=mode.graphs, jobs=jobs)
    request = GenerationRequest(text=bench.TEXT, max_audio_length_ms=mode.frames * 80, seed=1,
                                stop_at_end_frame=False)
    codes = {}
    for label in ENGINES:
        ctx.step(f"{label}: building the engine, then a first job")
        start = time.perf_counter()
        with build(ctx, label, jobs) as engine:
            codes[label] = engine.generate(request).codes
            bench.sync(ctx.device)
            ready_s = time.perf_counter() - start
            ctx.step(f"{label}: batch 1")
            ctx.record(**{label: dict(bench.ours(engine, mode.frames, mode.reps),
                                      built_and_first_job_s=ready_s,
                                      startup_ms=engine.startup_ms)})
            ctx.step(f"{label}: {jobs} jobs at once")
            ctx.record(**{f"{label}_{jobs}_jobs": bench.concurrency_sweep(
                engine, mode.frames, [jobs], sequential=False)[0]})
    measured = ctx.result["measurements"]
    speed = {label: measured[label]["frames_per_s"]["median"] for label in ENGINES}
    aggregate = {label: measured[f"{label}_{jobs}_jobs"]["aggregate_frames_per_s"]
                 for label in ENGINES}
    ctx.record(compiled_over_plain_frames_per_s=speed["compiled"] / speed["plain"],
               compiled_over_plain_aggregate_frames_per_s=(aggregate["compiled"]
                                                           / aggregate["plain"]),
               compile_added_s=(measured["compiled"]["built_and_first_job_s"]
                                - measured["plain"]["built_and_first_job_s"]),
               first_differing_frame=first_difference(codes["plain"], codes["compiled"]),
               # int8 against its full-precision twin, both compiled: what the int8 lead buys
               int8_over_compiled_frames_per_s=speed["compiled_int8"] / speed["compiled"],
               int8_over_compiled_aggregate_frames_per_s=(aggregate["compiled_int8"]
                                                          / aggregate["compiled"]))
    ctx.check("every engine drew every frame at a positive, finite speed",
              all(c.shape[1] == mode.frames for c in codes.values())
              and all(math.isfinite(f) and f > 0 for f in speed.values()),
              {"frames": {k: c.shape[1] for k, c in codes.items()}, "frames_per_s": speed})
