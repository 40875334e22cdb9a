"""Part `chaos`: the frame loop's randomized mix of jobs (csm/testing/chaos.py), on the device.

The same seeded scenario CI runs on the CPU, here with CUDA graphs and the main shapes' Mimi:
jobs at the window's edge, multi-piece texts, cancels at every stage and raising consumers,
with every job's codes compared to the same job run alone. On a GPU this is where a row
stepped past the window would show as a device-side assert in a captured graph.

On a GPU a batch rounds differently from a row alone (cuBLAS picks kernels by shape), so a
job's codes may part from its codes alone at a draw that was a tie within rounding: such
partings are recorded, and allowed in at most one job in 20 (`csm/testing/draw_margins.py`).
A parting at a clear choice fails the part. The CPU mode runs the same check; on the CPU
tests/test_chaos.py holds the codes equal.
"""

from __future__ import annotations

import soundfile as sf
import torch

from csm.engine import Engine
from csm.testing.chaos import run_chaos

from .context import Context

SEED = 20261123
# The CPU mode only keeps the part from rotting: tests/test_chaos.py is the full CPU run.
JOBS = {"gpu": 300, "cpu": 8}


def run(ctx: Context) -> None:
    folder = ctx.model_dir("tiny")  # fp32 tiny: solo and batched codes must match exactly
    ctx.step("load")
    with Engine.load(folder, device=ctx.device, dtype=torch.float32, max_batch=3,
                     use_graphs=ctx.mode.graphs) as engine:
        audio, rate = sf.read(folder / "prompts" / "conversational_a.wav", dtype="float32")
        voice = engine.segment(0, "a reference turn", torch.from_numpy(audio), rate)
        ctx.step("chaos")
        report = run_chaos(engine, voice, seed=SEED, jobs=JOBS[ctx.mode.name],
                           deadline_s=max(5.0, ctx.remaining_s - 15), exact=False)
    ctx.record(seed=report.seed, jobs=report.jobs, ends=report.ends,
               max_position=report.max_position, window=report.window,
               seconds=round(report.seconds, 2), problems=report.problems[:20],
               rounding_partings=report.rounding_partings[:20])
    ctx.check("every job ended as it may, nothing left behind, batched == alone (or parted at "
              "a tie within rounding)", report.ok, report.problems[:5])
    ctx.check("no position outside the window", report.max_position < report.window,
              report.max_position)
