"""Part `graphs_eager`: CUDA-graph replay draws exactly what the eager frame step draws.

A scripted scenario of jobs joining and leaving mid-run runs on two engines built from the
same folder, graphs on and off. Every join and the one cancellation happen inside a job's
audio callback (on the loop thread, between blocks), so the schedule is the same in both runs:
rows move through buckets 1, 2, 4, 8 and back down, and one job's long context moves the
attention's key span from 512 positions to 1024 and back. In fp32 each job's codes must be
identical, at every shapes the mode builds (tiny and csm-1b on a GPU); the (bucket, span) of
every step is recorded and must match.

Then the same scenario in bf16 (graphs as deployed) against the fp32 codes: the first frame
where each job's codes differ, and the relative error of the backbone's codebook-0 logits,
teacher-forced on the fp32 codes. For information, on a GPU each job is also run alone and
compared with its batched run (on the CPU, tests/test_engine.py holds them equal): where they
part, the margin of that draw alone says whether it was a tie within rounding (a batch rounds
differently from a row alone) or a clear choice (csm/testing/draw_margins.py).

In the CPU mode both runs are eager (graphs exist only on CUDA): the part then checks the
scenario's machinery and that it is deterministic.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from csm.checkpoint import load_model
from csm.engine import Engine, Generation, GenerationRequest
from csm.prompt import Segment
from csm.testing.draw_margins import parting, record_margins
from csm.testing.teacher_forced import backbone_states
from csm.text_tokenizer import TextTokenizer

from ..run import TEXT
from .context import Context

MAX_BATCH = 8
BLOCK_FRAMES = 4  # the scheduler hands audio out in blocks of up to 4 frames
PROBES = 3  # jobs whose parting from alone is probed for its margin (seconds each)


@dataclass(frozen=True)
class ScriptedJob:
    name: str
    frames: int
    starts_after: tuple[str, int] | None = None  # (job, its n-th audio block); None: first
    cancel_after: int | None = None  # cancelled at its own n-th audio block
    context_frames: int = 0  # a context turn of this many (seeded random) frames

    def request(self, seed: int) -> GenerationRequest:
        # The end-frame stop is off so that the schedule never depends on what was drawn.
        return GenerationRequest(text=f"{TEXT} ({self.name})", seed=seed,
                                 context=self.context(), max_audio_length_ms=self.frames * 80,
                                 stop_at_end_frame=False)

    def context(self) -> tuple[Segment, ...]:
        if not self.context_frames:
            return ()
        draw = torch.Generator().manual_seed(self.context_frames)
        codes = torch.randint(0, 2048, (32, self.context_frames), generator=draw)
        return (Segment(speaker=1, text="An earlier turn.", codes=codes),)


# The schedule, in blocks of 4 frames (the bucket, then the key span):
#   a alone (1, 512); b joins (2, 512); c's long prompt (its context puts it past 512
#   positions) takes two prefill chunks while a and b go on (2, 512); c and d join (4, 1024);
#   e..h fill rows 4..7 (8, 1024); b, d, e, f, h finish and g is cancelled, i takes freed
#   row 1 beside c (4, 1024); c finishes, a and i end together (2, 512).
SCRIPT = (
    ScriptedJob("a", 28),
    ScriptedJob("b", 12, ("a", 1)),
    ScriptedJob("c", 12, ("a", 2), context_frames=520),
    ScriptedJob("d", 8, ("a", 2)),
    ScriptedJob("e", 4, ("c", 1)),
    ScriptedJob("f", 4, ("c", 1)),
    ScriptedJob("g", 40, ("c", 1), cancel_after=1),
    ScriptedJob("h", 4, ("c", 1)),
    ScriptedJob("i", 8, ("e", 1)),
)
SEEDS = {job.name: seed for seed, job in enumerate(SCRIPT, start=11)}


@dataclass
class ScenarioRun:
    codes: dict[str, Tensor]  # job -> [32, frames drawn]
    buckets: list[tuple[int, int]]  # the (batch bucket, key span) of every step, in order
    seconds: float


@contextmanager
def recorded_buckets(engine: Engine) -> Iterator[list[tuple[int, int]]]:
    """The (batch bucket, key span) of every frame step the engine takes, in order."""
    stepper = engine.scheduler.stepper
    buckets: list[tuple[int, int]] = []
    step = stepper.step

    def recording(n: int, keys: int) -> Tensor:
        buckets.append((n, keys))
        return step(n, keys)

    stepper.step = recording
    try:
        yield buckets
    finally:
        del stepper.step  # the class's own method again


def run_scenario(engine: Engine, timeout_s: float) -> ScenarioRun:
    followers: dict[tuple[str, int], list[ScriptedJob]] = defaultdict(list)
    for job in SCRIPT:
        if job.starts_after:
            followers[job.starts_after].append(job)
    codes: dict[str, list[Tensor]] = {job.name: [] for job in SCRIPT}
    blocks: Counter[str] = Counter()
    done = {job.name: threading.Event() for job in SCRIPT}
    generations: dict[str, Generation] = {}
    errors: list[str] = []

    def start(job: ScriptedJob) -> None:
        generations[job.name] = engine.start(
            job.request(SEEDS[job.name]), deliver=lambda event: on_event(job, event))

    def on_event(job: ScriptedJob, event: object) -> None:
        """On the loop thread: record the block, then start or cancel what the script says."""
        try:
            block = Generation.unpack(event)
            if block is None:
                done[job.name].set()
                return
            codes[job.name].append(block.codes)
            blocks[job.name] += 1
            for follower in followers[(job.name, blocks[job.name])]:
                start(follower)
            if job.cancel_after == blocks[job.name]:
                generations[job.name].cancel()
        except Exception as e:  # noqa: BLE001 - reported below; the loop thread must go on
            errors.append(f"{job.name}: {type(e).__name__}: {e}")
            done[job.name].set()

    with recorded_buckets(engine) as buckets:
        began = time.perf_counter()
        start(SCRIPT[0])
        deadline = time.monotonic() + timeout_s
        unfinished = [n for n, event in done.items()
                      if not event.wait(max(0.0, deadline - time.monotonic()))]
        seconds = time.perf_counter() - began
    if errors or unfinished:
        raise RuntimeError(f"scenario: errors {errors}; jobs not finished after "
                           f"{timeout_s:.0f} s: {unfinished}")
    return ScenarioRun({n: torch.cat(c, dim=1) for n, c in codes.items()}, list(buckets),
                       seconds)


def first_difference(a: Tensor, b: Tensor) -> int | None:
    """The first frame where two [32, frames] code tensors differ (over their common length,
    or where one stops early); None if identical."""
    n = min(a.shape[1], b.shape[1])
    differs = (a[:, :n] != b[:, :n]).any(dim=0).nonzero()
    if len(differs):
        return int(differs[0])
    return None if a.shape[1] == b.shape[1] else n


def runs_of(buckets: list[tuple[int, int]]) -> list[list[int]]:
    """[bucket, span, steps] for each stretch of equal steps: the schedule at a glance."""
    out: list[list[int]] = []
    for n, keys in buckets:
        if out and out[-1][:2] == [n, keys]:
            out[-1][2] += 1
        else:
            out.append([n, keys, 1])
    return out


def check_schedule(ctx: Context, label: str, run: ScenarioRun) -> None:
    frames = {n: c.shape[1] for n, c in run.codes.items()}
    expected = {job.name: job.frames for job in SCRIPT if job.cancel_after is None}
    cancelled = {job.name: job.cancel_after * BLOCK_FRAMES for job in SCRIPT if job.cancel_after}
    ctx.check(f"{label}: every job drew its frames, the cancelled one stopped early",
              all(frames[n] == f for n, f in expected.items())
              and all(f <= frames[n] < next(j.frames for j in SCRIPT if j.name == n)
                      for n, f in cancelled.items()), frames)
    sizes = [n for n, _ in run.buckets]
    spans = [keys for _, keys in run.buckets]
    ctx.check(f"{label}: rows moved through buckets 1, 2, 4 and 8 and back down, the key "
              "span from 512 to 1024 and back",
              {1, 2, 4, 8} <= set(sizes) and sizes[-1] < max(sizes)
              and spans[0] == spans[-1] == 512 and 1024 in spans, runs_of(run.buckets))


def fp32_graphs_against_eager(ctx: Context, shapes: str) -> ScenarioRun:
    folder = ctx.model_dir(shapes)
    runs: dict[str, ScenarioRun] = {}
    partings: dict[str, str | None] = {}
    captured: list[tuple[int, int]] = []
    for label, graphs in (("eager", False), ("graphs", ctx.mode.graphs)):
        ctx.step(f"{shapes} fp32: the scenario, {label}")
        with Engine.load(folder, device=ctx.device, dtype=torch.float32, max_batch=MAX_BATCH,
                         use_graphs=graphs) as engine:
            runs[label] = run_scenario(engine, ctx.remaining_s)
            if label == "graphs":
                captured = sorted(engine.scheduler.stepper.graphs)
                ctx.step(f"{shapes} fp32: each job alone")
                partings = batched_against_alone(engine, runs[label])
    eager, graphed = runs["eager"], runs["graphs"]
    check_schedule(ctx, f"{shapes} fp32", graphed)
    ctx.check(f"{shapes} fp32: both runs stepped the same buckets",
              eager.buckets == graphed.buckets)
    differing = {n: first_difference(eager.codes[n], graphed.codes[n]) for n in eager.codes}
    label = "graph replay" if ctx.mode.graphs else "a second eager run (graphs off)"
    ctx.check(f"{shapes} fp32: {label} draws the eager codes for every job",
              all(d is None for d in differing.values()),
              {n: d for n, d in differing.items() if d is not None} or None)
    if ctx.mode.graphs:
        ctx.check(f"{shapes}: every (bucket, span) stepped was replayed from a captured graph",
                  set(graphed.buckets) <= set(captured),
                  {"captured": captured, "stepped": sorted(set(graphed.buckets))})
    ctx.record(**{f"{shapes}_fp32": {
        "graphs": ctx.mode.graphs, "frames_stepped": len(graphed.buckets),
        "eager_s": eager.seconds, "graphs_s": graphed.seconds}})
    # Not a requirement: on a GPU a batch may round differently from a single row.
    ctx.record(**{f"{shapes}_fp32_batched_vs_alone": partings})
    return graphed


def batched_against_alone(engine: Engine, run: ScenarioRun) -> dict[str, str | None]:
    """Per job: None where its batched codes are its codes alone; else where they first part
    and that draw's margin alone (probed for the first PROBES jobs that part: a probe steps
    every operation through Python)."""
    partings: dict[str, str | None] = {}
    probes = PROBES
    for job in SCRIPT:
        request, got = job.request(SEEDS[job.name]), run.codes[job.name]
        frame = first_difference(got, engine.generate(request).codes[:, :got.shape[1]])
        if frame is None:
            partings[job.name] = None
        elif probes == 0:
            partings[job.name] = f"frame {frame} (not probed)"
        else:
            probes -= 1
            alone = record_margins(engine, request)
            found = parting([got], alone, prefix=job.cancel_after is not None)
            partings[job.name] = str(found) if found else f"frame {frame}"
    return partings


def codebook0_logits(folder: Path, device: torch.device, dtype: torch.dtype, text: str,
                     codes: Tensor) -> Tensor:
    """The backbone's codebook-0 logits for each frame of `codes` [32, F], teacher-forced:
    the prompt, then the given frames as audio positions. Returns [F, vocabulary] float32."""
    ids = TextTokenizer(folder / "tokenizer.json").encode_turn(0, text)
    model = load_model(folder, device, dtype)
    model.setup_caches(1)
    with torch.inference_mode():
        logits = model.codebook0_head(backbone_states(model, ids, codes)).float().cpu()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return logits


def bf16_against_fp32(ctx: Context, shapes: str, fp32: ScenarioRun) -> None:
    folder = ctx.model_dir(shapes)
    ctx.step(f"{shapes} bf16: the scenario")
    with Engine.load(folder, device=ctx.device, dtype=torch.bfloat16, max_batch=MAX_BATCH,
                     use_graphs=ctx.mode.graphs) as engine:
        bf16 = run_scenario(engine, ctx.remaining_s)
    check_schedule(ctx, f"{shapes} bf16", bf16)
    ctx.check(f"{shapes} bf16: the same buckets as fp32", bf16.buckets == fp32.buckets)
    longest = max((j for j in SCRIPT if j.cancel_after is None), key=lambda j: j.frames)
    ctx.step(f"{shapes} bf16: teacher-forced logits against fp32")
    text = longest.request(0).text
    logits = {dtype: codebook0_logits(folder, ctx.device, dtype, text, fp32.codes[longest.name])
              for dtype in (torch.float32, torch.bfloat16)}
    reference, low = logits[torch.float32], logits[torch.bfloat16]
    relative = (low - reference).norm(dim=-1) / reference.norm(dim=-1)
    result: dict[str, Any] = {
        "first_differing_frame_vs_fp32": {n: first_difference(fp32.codes[n], bf16.codes[n])
                                          for n in fp32.codes},
        "codebook0_logits_vs_fp32": {
            "job": longest.name, "frames": int(relative.shape[0]),
            "relative_error_median": float(relative.median()),
            "relative_error_max": float(relative.max()),
            "top1_agreement": float((low.argmax(-1) == reference.argmax(-1)).float().mean()),
        },
        "graphs": ctx.mode.graphs, "seconds": bf16.seconds,
    }
    ctx.record(**{f"{shapes}_bf16": result})
    # bf16 rounds about 1% off fp32 (CSM facts, "Verified here"); far more means a real bug.
    ctx.check(f"{shapes} bf16: codebook-0 logits within 5% of fp32 (median over frames)",
              result["codebook0_logits_vs_fp32"]["relative_error_median"] < 0.05,
              result["codebook0_logits_vs_fp32"]["relative_error_median"])


def run(ctx: Context) -> None:
    fp32 = {shapes: fp32_graphs_against_eager(ctx, shapes) for shapes in ctx.mode.shapes}
    bf16_against_fp32(ctx, ctx.mode.main_shapes, fp32[ctx.mode.main_shapes])
