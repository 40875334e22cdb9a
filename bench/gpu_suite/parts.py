"""The suite's parts, in the order they run: name -> function, time limits, what it shows.

Each part runs in its own process (runner.py) under its time limit, so a stuck CUDA call
costs that part, never the suite. Functions are named "module:function" and imported in that
process, so a part whose module needs a missing package reports "not run: missing module"
while the others run.

To add a part, write `run(ctx: Context) -> None` (context.py: `ctx.model_dir`, `ctx.record`,
`ctx.check`, `ctx.step`) and add one line below with a limit per mode. The GPU limits of the
default parts, plus STOP_GRACE_S each, must stay under GPU_RUN_LIMIT_S (a test checks it):
give a new part time by taking it from another.
"""

from __future__ import annotations

from dataclasses import dataclass

# The whole GPU run must finish under 8 minutes on one H100. The CPU mode's limits guard
# against a hang (a CI machine shared with other jobs can be several times slower than idle),
# and their order is the order parts start side by side there: keep them about four times
# what each part takes on an idle 2-core machine.
GPU_RUN_LIMIT_S = 480.0
# What the runner allows beyond the limits: stopping a process that overran (runner.py).
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class Part:
    name: str
    function: str  # "module:function", imported in the part's own process
    limit_s: dict[str, float]  # mode name -> seconds
    about: str
    in_default_run: bool = True  # False: only when named with --parts
    # The other parts read what this one builds: it runs first, alone.
    builds: bool = False


PARTS: dict[str, Part] = {part.name: part for part in (
    Part("models", "bench.gpu_suite.models:run", {"gpu": 75, "cpu": 45},
         "random-weight model folders (tiny, csm-1b) in the real on-disk formats",
         builds=True),
    Part("graphs_eager", "bench.gpu_suite.graphs_eager:run", {"gpu": 75, "cpu": 75},
         "CUDA-graph replay against the eager step with jobs joining and leaving (fp32: same "
         "codes, tiny and csm-1b shapes); bf16 against fp32 (first differing frame, logits)"),
    Part("mimi", "bench.gpu_suite.mimi:run", {"gpu": 25, "cpu": 30},
         "Mimi's graphed streaming decode with exec_mask against the eager and whole-clip "
         "decodes; batched rows against solo rows; a step's time with one live row on many"),
    Part("chaos", "bench.gpu_suite.chaos:run", {"gpu": 30, "cpu": 60},
         "the frame loop's seeded random mix of jobs (window edge, pieces, cancels at every "
         "stage, raising consumers): every job ends, batched codes equal solo codes (or "
         "part from them only at a tie within rounding)"),
    Part("worker", "bench.gpu_suite.worker_e2e:run", {"gpu": 70, "cpu": 150},
         "the worker end to end: whole and streamed jobs, 8 at once, a cancelled job, a "
         "raising consumer, the window edge, watermarking, verify_watermark timing (at "
         "CSM_MAX_VERIFY_SECONDS too)"),
    Part("speed", "bench.gpu_suite.speed:ours", {"gpu": 95, "cpu": 60},
         "our engine: batch-1 frames/s and real-time factor, time to first audio, "
         "concurrency sweep, peak memory, start-up breakdown"),
    Part("speed_whole_window", "bench.gpu_suite.speed:ours_whole_window",
         {"gpu": 95, "cpu": 60},
         "`speed` with attention over the whole 2048-position window, as before key spans: "
         "run it with --parts models,speed,speed_whole_window for a before and after",
         in_default_run=False),
    Part("attention", "bench.gpu_suite.attention:run", {"gpu": 10, "cpu": 30},
         "one backbone attention call per decode step: the engine's (query heads folded "
         "into key/value heads' rows, additive mask) over the whole 2048-position cache and "
         "over 512 (the first key span), the grouped-query call with a boolean mask it made "
         "before, and each with every SDPA backend forced (which kernels take them)"),
    Part("compiled", "bench.gpu_suite.compiled:run", {"gpu": 500, "cpu": 900},
         "CSM_COMPILE=1: batch 1 and 8 jobs with the frame step (depth decoder, sampling, the "
         "backbone's pass) compiled by inductor at start-up and replayed inside our CUDA "
         "graphs, in full precision and in int8 (CSM_DECODER_INT8=1), against the engine as "
         "it is, same run (compiling takes minutes: --parts models,compiled)",
         in_default_run=False),
    Part("int8", "bench.gpu_suite.int8:run", {"gpu": 90, "cpu": 60},
         "CSM_DECODER_INT8=1: the depth decoder's teacher-forced logits with int8 weights "
         "against full precision, the first differing frame, and batch-1 and 8-job speed "
         "not compiled, against the engine as it is (--parts models,int8)",
         in_default_run=False),
    Part("transformers", "bench.gpu_suite.speed:transformers", {"gpu": 60, "cpu": 75},
         "transformers' CsmForConditionalGeneration on the same weights (static cache, "
         "not compiled)"),
    Part("transformers_compiled", "bench.gpu_suite.speed:transformers_compiled",
         {"gpu": 420, "cpu": 120},
         "transformers with its own torch.compile of the forward pass (slow to compile: run "
         "it on its own with --parts transformers_compiled)", in_default_run=False),
)}


def default_parts() -> list[Part]:
    return [part for part in PARTS.values() if part.in_default_run]
