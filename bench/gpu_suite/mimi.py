"""Part `mimi`: Mimi's streaming decode as the frame loop drives it, under moshi's CUDA graphs.

The scheduler keeps one Mimi in batched streaming mode: each step it sets `exec_mask` to the
rows that have a frame and decodes every row; a row taking a new job resets its state
(`reset_streaming` with a mask). On a GPU moshi replays that streaming decode as CUDA graphs.
Here rows join late, pause (their masked steps are fed garbage codes that must leave their
state alone), and one row is reused by a second clip after a reset. Each clip's audio must
match, within TOLERANCE of its peak:
- the same schedule with moshi's graphs off (`moshi.utils.compile.no_cuda_graph`),
- the clip alone, streaming in a batch of one (batched rows equal solo rows),
- the clip decoded whole, not streaming.

Measured: one streaming decode step with one live row, on as many rows as the speed part's
engines hold (1 to 64 on a GPU). The scheduler decodes all of its rows every frame, live or
not: this says what the idle ones cost (the lead "decode only live rows").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from moshi.utils.compile import no_cuda_graph
from torch import Tensor

from csm.codec import NUM_CODEBOOKS, MimiCodec

from ..run import time_ms
from .context import Context

STEPS = 20
# cuDNN may run convolutions in TF32 on a GPU (torch's default): ~1e-3 of the peak between
# algorithms. A state bug (a masked row advanced, a reset missed) is off by the signal itself.
TOLERANCE = 1e-2


@dataclass(frozen=True)
class Clip:
    row: int
    steps: tuple[int, ...]  # the decode steps at which this clip's next frame is fed


def schedule() -> list[Clip]:
    paused = {5, 6, 7, 12}
    return [
        Clip(0, tuple(range(STEPS))),                                # from the start
        Clip(1, tuple(range(3, STEPS))),                             # joins at step 3
        Clip(2, tuple(s for s in range(STEPS) if s not in paused)),  # pauses twice
        Clip(3, tuple(range(8))),                                    # leaves at step 8 ...
        Clip(3, tuple(range(10, STEPS))),                            # ... its row reused
    ]


def streamed(codec: MimiCodec, clips: list[Clip], codes: list[Tensor], garbage: Tensor,
             rows: int) -> list[Tensor]:
    """Decode the clips on `rows` streaming rows as the scheduler does; audio per clip."""
    mimi, dev = codec.streamer, codec.device
    audio: list[list[Tensor]] = [[] for _ in clips]
    with mimi.streaming(rows):
        for step in range(STEPS):
            live = {i: clip for i, clip in enumerate(clips) if step in clip.steps}
            joining = [c.row for c in live.values() if c.steps[0] == step]
            if joining:
                mimi.reset_streaming(row_mask(joining, rows, dev))
            if not live:
                continue
            mimi.set_exec_mask(row_mask([c.row for c in live.values()], rows, dev))
            frame = garbage[:rows, :, step].clone()
            for i, clip in live.items():
                frame[clip.row] = codes[i][:, clip.steps.index(step)]
            pcm = mimi.decode(frame.to(dev)[:, :, None])[:, 0].float()
            for i, clip in live.items():
                audio[i].append(pcm[clip.row].cpu())
    return [torch.cat(a) for a in audio]


def decode_step_ms(codec: MimiCodec, rows: int, reps: int) -> float:
    """Median milliseconds of one streaming decode step on `rows` rows, only row 0 live (the
    warm-up calls also capture moshi's graphs)."""
    mimi, dev = codec.streamer, codec.device
    frame = torch.zeros(rows, NUM_CODEBOOKS, 1, dtype=torch.long, device=dev)
    with mimi.streaming(rows):
        mimi.set_exec_mask(row_mask([0], rows, dev))
        return time_ms(lambda: mimi.decode(frame), dev, reps)


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
    rows = max(c.row for c in clips) + 1
    garbage = torch.randint(0, codec.codebook_size, (rows, NUM_CODEBOOKS, STEPS), generator=gen)
    ctx.step("whole-clip decodes")
    whole = [codec.decode(c).cpu() for c in codes]
    timings = {}
    with torch.inference_mode():
        ctx.step("batched streaming, graphed")
        start = time.perf_counter()
        graphed = streamed(codec, clips, codes, garbage, rows)
        timings["graphed_s"] = time.perf_counter() - start
        ctx.step("batched streaming, graphs off")
        start = time.perf_counter()
        with no_cuda_graph():
            eager = streamed(codec, clips, codes, garbage, rows)
        timings["eager_s"] = time.perf_counter() - start
        ctx.step("each clip alone, streaming")
        solo = [streamed(codec, [Clip(0, c.steps)], [codes[i]], garbage, 1)[0]
                for i, c in enumerate(clips)]
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
