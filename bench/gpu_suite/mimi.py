"""Part `mimi`: Mimi's streaming decode as the frame loop drives it, under moshi's CUDA graphs.

The scheduler keeps one Mimi streaming for all its rows (`csm.mimi_rows.MimiRows`) and decodes
each frame on the frame step's bucket of rows (1, 2, 4 ... as rows join and leave), each bucket
with its own moshi state objects whose tensors are views of the first rows of the one full
state, and its own graphs; `exec_mask` holds the rows that have a frame; a row taking a new job
resets its state. Here rows join late (the bucket grows), pause (their masked steps are fed
garbage codes that must leave their state alone), wait outside a smaller bucket and go on, and
one row is reused by a second clip after a reset. Each clip's audio must match, within
TOLERANCE of its peak:
- the same schedule with moshi's graphs off (`moshi.utils.compile.no_cuda_graph`),
- the clip alone, streaming in a plain moshi batch of one (batched rows equal solo rows),
- the clip decoded whole, not streaming.

Measured: one streaming decode step with one live row, on a bucket of each size the speed
part's engines hold (1 to 64 on a GPU): what a frame's decode costs as the bucket grows.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from moshi.utils.compile import no_cuda_graph
from torch import Tensor

from csm.codec import NUM_CODEBOOKS, MimiCodec
from csm.mimi_rows import MimiRows

from ..run import time_ms
from .context import Context

STEPS = 20
BUCKETS = [1, 2, 4]
# cuDNN may run convolutions in TF32 on a GPU (torch's default): ~1e-3 of the peak between
# algorithms. A state bug (a masked row advanced, a reset missed) is off by the signal itself.
TOLERANCE = 1e-2


@dataclass(frozen=True)
class Clip:
    row: int
    steps: tuple[int, ...]  # the decode steps at which this clip's next frame is fed


def schedule() -> list[Clip]:
    """The buckets go 1, 2, 4 as rows join, 2 at step 12 (row 2 paused outside it), 4 again."""
    return [
        Clip(0, tuple(range(STEPS))),                                        # from the start
        Clip(1, tuple(range(2, STEPS))),                                     # joins at step 2
        Clip(2, tuple(s for s in range(4, STEPS) if s not in {6, 12})),     # pauses twice
        Clip(3, tuple(range(4, 9))),                                         # leaves ...
        Clip(3, tuple(range(15, STEPS))),                                    # ... row reused
    ]


def streamed(codec: MimiCodec, clips: list[Clip], codes: list[Tensor],
             garbage: Tensor) -> list[Tensor]:
    """Decode the clips on their own copy of the scheduler's streamer as the scheduler does,
    each step on the bucket that holds the highest row with a frame; audio per clip."""
    rows, dev = MimiRows(copy.deepcopy(codec.streamer), BUCKETS), codec.device
    audio: list[list[Tensor]] = [[] for _ in clips]
    for step in range(STEPS):
        live = {i: clip for i, clip in enumerate(clips) if step in clip.steps}
        joining = [c.row for c in live.values() if c.steps[0] == step]
        if joining:
            rows.reset(row_mask(joining, rows.rows, dev))
        if not live:
            continue
        bucket = next(b for b in BUCKETS if b > max(c.row for c in live.values()))
        frame = garbage[:bucket, :, step].clone()
        for i, clip in live.items():
            frame[clip.row] = codes[i][:, clip.steps.index(step)]
        pcm = rows.decode(frame.to(dev), row_mask([c.row for c in live.values()], bucket, dev))
        for i, clip in live.items():
            audio[i].append(pcm[clip.row].float().cpu())
    return [torch.cat(a) for a in audio]


def alone(codec: MimiCodec, codes: Tensor) -> Tensor:
    """One clip streamed by a plain moshi Mimi in a batch of one."""
    mimi = copy.deepcopy(codec.streamer)
    with mimi.streaming(1):
        return torch.cat([mimi.decode(codes[None, :, f:f + 1].to(codec.device))[0, 0].float()
                          for f in range(codes.shape[1])]).cpu()


def decode_step_ms(codec: MimiCodec, rows: int, reps: int) -> float:
    """Median milliseconds of one streaming decode step on a bucket of `rows` rows, only row
    0 live (the warm-up calls also capture moshi's graphs)."""
    mimi_rows, dev = MimiRows(copy.deepcopy(codec.streamer), [rows]), codec.device
    frame = torch.zeros(rows, NUM_CODEBOOKS, dtype=torch.long, device=dev)
    live = row_mask([0], rows, dev)
    return time_ms(lambda: mimi_rows.decode(frame, live), dev, reps)


def row_mask(rows: list[int], size: int, device: torch.device) -> Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[rows] = True
    return mask.to(device)


def relative_difference(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run(ctx: Context) -> None:
    ctx.step("loading Mimi")
    codec = MimiCodec.load(ctx.model_dir(ctx.mode.main_shapes) / "mimi", ctx.device)
    clips = schedule()
    gen = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, codec.codebook_size, (NUM_CODEBOOKS, len(c.steps)), generator=gen)
             for c in clips]
    rows = BUCKETS[-1]
    garbage = torch.randint(0, codec.codebook_size, (rows, NUM_CODEBOOKS, STEPS), generator=gen)
    ctx.step("whole-clip decodes")
    whole = [codec.decode(c).cpu() for c in codes]
    timings = {}
    with torch.inference_mode():
        ctx.step("batched streaming, graphed")
        start = time.perf_counter()
        graphed = streamed(codec, clips, codes, garbage)
        timings["graphed_s"] = time.perf_counter() - start
        ctx.step("batched streaming, graphs off")
        start = time.perf_counter()
        with no_cuda_graph():
            eager = streamed(codec, clips, codes, garbage)
        timings["eager_s"] = time.perf_counter() - start
        ctx.step("each clip alone, streaming")
        solo = [alone(codec, c) for c in codes]
        ctx.step("one live row on many rows, timed")
        reps = 20 if ctx.device.type == "cuda" else 3
        timings["decode_step_ms_one_live_row"] = {
            str(n): decode_step_ms(codec, n, reps) for n in ctx.mode.concurrency}
    comparisons = {
        "graphed_vs_eager_streaming": [relative_difference(g, e) for g, e in zip(graphed, eager)],
        "batched_vs_solo": [relative_difference(g, s) for g, s in zip(graphed, solo)],
        "streaming_vs_whole": [relative_difference(g, w) for g, w in zip(graphed, whole)],
    }
    ctx.record(clips=len(clips), rows=rows, steps=STEPS, graphs=ctx.device.type == "cuda",
               max_relative_difference={k: max(v) for k, v in comparisons.items()},
               per_clip=comparisons, **timings)
    for name, values in comparisons.items():
        ctx.check(f"{name.replace('_', ' ')}: every clip within {TOLERANCE:g} of its peak",
                  max(values) <= TOLERANCE, max(values))
