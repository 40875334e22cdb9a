"""A seeded, randomized mix of jobs thrown at one engine, and what must hold afterwards.

Jobs of random prompt lengths (some exactly at the edge of the position window), lengths and
piece counts, consumed whole or as they stream, cancelled at random moments (while pending,
while prefilling, mid-frame, after the end), some with a consumer that raises. Afterwards:
every job ended within the deadline in a way it may end; no step or prefill touched a
position outside the window, or attended over a key span that leaves out a live position;
every completed job drew exactly the codes it draws alone (and every cancelled one a prefix
of them); nothing is left in a slot or queue and no job object outlives the run; the engine
still serves a normal job.

On a GPU, `exact=False`: a batch rounds differently from a row alone (cuBLAS picks kernels by
shape), so a job's codes may also part from its codes alone at a draw that was a tie within
rounding (`draw_margins`). Such partings are listed in the report; more than one job in 20
of them, or any parting at a clear choice, is a problem.

Used by tests/test_chaos.py (CPU, tiny model) and the GPU suite. The weights are random: the
audio is noise, only the bookkeeping is checked.
"""

from __future__ import annotations

import gc
import queue
import random
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from ..conversation import FRAME_MS
from ..engine import AudioBlock, Engine, Generation, GenerationRequest, Utterance
from ..prompt import Segment
from .draw_margins import joined, parting, pieces_of, record_margins

CANCEL_MOMENTS = ("pending", "prefill", "first_block", "after_end")


class ConsumerError(RuntimeError):
    """What a deliberately faulty consumer raises from its callback."""


@dataclass
class Spec:
    """One job of the mix and how its caller behaves."""

    index: int
    request: GenerationRequest
    cancel: str | None  # one of CANCEL_MOMENTS, or None
    raise_on_block: int | None  # the consumer raises when handed this block (0-based)
    # Streamed: a callback on the loop thread takes each block as it is decoded. Whole: the
    # blocks wait in the engine's own queue and are read after every job was launched.
    streamed: bool


@dataclass(eq=False)
class Outcome:
    """What one job's caller saw."""

    spec: Spec
    generation: Generation | None = None
    codes: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (piece, [32, F])
    blocks: int = 0
    end: str = "running"  # completed | cancelled | failed | timed_out
    error: BaseException | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    launched: threading.Event = field(default_factory=threading.Event)

    def record(self, event: object) -> None:
        """One event as the engine hands it over: a block, the end, or the job's error."""
        self.launched.wait()  # a callback can come before start() has returned
        spec = self.spec
        if isinstance(event, AudioBlock):
            index, self.blocks = self.blocks, self.blocks + 1
            if spec.cancel == "first_block" and index == 0:
                self.generation.cancel()
            if spec.raise_on_block == index:
                raise ConsumerError(f"job {spec.index}: the consumer raised on block {index}")
            self.codes.append((event.utterance, event.codes))
            return
        if isinstance(event, StopIteration):
            cancelled = self.generation.stop_reason() == "cancelled"
            self.end = "cancelled" if cancelled else "completed"
        else:
            # Without its traceback: those frames would keep the finished job alive.
            self.end, self.error = "failed", event.with_traceback(None)  # type: ignore
        self.ended.set()


class TieAllowance:
    """exact=False: partings at a tie within rounding found so far, and how many more jobs
    that differ may be probed for one (a probe is slow; past the allowance, a job that
    differs is a problem without one)."""

    def __init__(self, jobs: int):
        self.allowed = max(1, jobs // 20)
        self.probes_left = self.allowed + 1
        self.partings: list[str] = []


@dataclass
class ChaosReport:
    seed: int
    jobs: int
    ends: dict[str, int]
    max_position: int
    window: int
    seconds: float
    problems: list[str]
    rounding_partings: list[str]  # exact=False: jobs that parted from alone at a tie

    @property
    def ok(self) -> bool:
        return not self.problems


def sized_segment(engine: Engine, text: str, speaker: int, positions: int,
                  rng: random.Random) -> Segment:
    """A context turn of random codes sized so that the prompt for `text` is exactly
    `positions` long."""
    target = len(engine.tokenizer.encode_turn(speaker, text))
    turn = len(engine.tokenizer.encode_turn(speaker, "edge"))
    audio_frames = positions - target - turn - 1  # minus the end-of-audio frame
    codes = torch.tensor([[rng.randrange(2048) for _ in range(audio_frames)]
                          for _ in range(32)])
    return Segment(speaker=speaker, text="edge", codes=codes)


def _edge_segment(engine: Engine, text: str, speaker: int, frames: int,
                  rng: random.Random) -> Segment:
    """A context turn sized so that the prompt for `text` is the longest the window allows
    with `frames` frames to draw (the reference accepts prompt < window - frames)."""
    return sized_segment(engine, text, speaker, engine.max_positions - frames - 1, rng)


def make_specs(engine: Engine, voice: Segment, seed: int, jobs: int) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for index in range(jobs):
        frames = rng.randint(1, 8)
        text = " ".join(rng.choice(("one", "two", "three", "speak", "now", "more"))
                        for _ in range(rng.randint(1, 12))) + "."
        speaker = rng.randrange(4)
        kind = rng.random()
        then: tuple[Utterance, ...] = ()
        if kind < 0.12:  # one piece only: the context fills the window for this piece
            # Short, so that its last block likely has neighbours with more frames to draw:
            # a row stepped past its own budget would then leave the window.
            frames = rng.choice((1, 2, 5))
            context: tuple[Segment, ...] = (_edge_segment(engine, text, speaker, frames, rng),)
        else:
            context = (voice,) if kind < 0.6 else ()
            then = tuple(Utterance(rng.randrange(4), f"And piece {k}.",
                                   FRAME_MS * rng.randint(1, 6))
                         for k in range(rng.choice((0, 0, 0, 1, 2))))
        request = GenerationRequest(
            text=text, speaker=speaker, context=context, max_audio_length_ms=FRAME_MS * frames,
            temperature=rng.choice((0.7, 0.9, 1.3)), topk=rng.choice((1, 5, 50)),
            seed=rng.randrange(2**32), then=then, stop_at_end_frame=rng.random() < 0.5)
        cancel = rng.choice(CANCEL_MOMENTS) if rng.random() < 0.3 else None
        streamed = rng.random() < 0.5
        raise_on = rng.randrange(2) if streamed and rng.random() < 0.2 else None
        specs.append(Spec(index, request, cancel, raise_on, streamed))
    return specs


class _Window:
    """Records the highest position any prefill or frame step used, and every live position
    that was not inside the key span its step attended over (wraps, then restores)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.max_position = -1
        self.outside_span: list[str] = []
        stepper, model = engine.scheduler.stepper, engine.model
        self._step, self._prefill = stepper.step, model.prefill

        def step(n: int, keys: int) -> torch.Tensor:
            positions = stepper.position[:n]
            self.max_position = max(self.max_position, int(positions.max()))
            live = positions[stepper.remaining[:n] > 0]
            if len(live) and int(live.max()) >= keys:
                self.outside_span.append(f"a frame step at position {int(live.max())} "
                                         f"attended over {keys} positions")
            return self._step(n, keys)

        def prefill(tokens, mask, pos, rows, keys=None):
            self.max_position = max(self.max_position, int(pos.max()))
            # A frame step feeds its parked rows too, at the window's last position: they
            # draw nothing that is used, so only the other positions must be in the span.
            used = pos[pos != stepper.park_position]
            if keys is not None and len(used) and int(used.max()) >= keys:
                self.outside_span.append(f"a prefill to position {int(used.max())} attended "
                                         f"over {keys} positions")
            return self._prefill(tokens, mask, pos, rows, keys)

        stepper.step, model.prefill = step, prefill

    def close(self) -> None:
        del self.engine.scheduler.stepper.step, self.engine.model.prefill


def run_chaos(engine: Engine, voice: Segment, seed: int, jobs: int = 200,
              deadline_s: float = 60.0, exact: bool = True) -> ChaosReport:
    """Throw `jobs` random jobs at `engine` (sized for `max_batch` of 2 to 4) and check.
    `exact`: batched codes must equal alone bit for bit (the CPU); False: or part at a tie."""
    rng = random.Random(seed ^ 0x5EED)
    outcomes = [Outcome(spec) for spec in make_specs(engine, voice, seed, jobs)]
    window = _Window(engine)
    started = time.monotonic()
    try:
        for outcome in outcomes:
            _launch(engine, outcome, rng)
            time.sleep(rng.random() * 0.004)
        for outcome in outcomes:
            remaining = started + deadline_s - time.monotonic()
            if not outcome.spec.streamed and outcome.generation is not None:
                _drain(outcome, remaining)
            if not outcome.ended.wait(max(0.0, remaining)):
                outcome.end = "timed_out"
            elif outcome.spec.cancel == "after_end":
                outcome.generation.cancel()  # must change nothing
    finally:
        window.close()
    seconds = time.monotonic() - started
    problems: list[str] = []
    ties = None if exact else TieAllowance(jobs)
    ends: dict[str, int] = {}
    for outcome in outcomes:
        ends[outcome.end] = ends.get(outcome.end, 0) + 1
        problems += _check_outcome(engine, outcome, ties)
    partings = ties.partings if ties else []
    if ties and len(partings) > ties.allowed:
        problems.append(f"{len(partings)} of {jobs} jobs parted from their codes alone at "
                        "ties: more than rounding explains")
    if window.max_position >= engine.max_positions:
        problems.append(f"a step or prefill used position {window.max_position}, outside the "
                        f"{engine.max_positions}-position window")
    problems += window.outside_span[:3]
    generations = [weakref.ref(o.generation) for o in outcomes if o.generation is not None]
    for outcome in outcomes:
        outcome.generation = None
    problems += _check_nothing_left(engine, generations)
    try:
        engine.generate(GenerationRequest(text="After the storm.", context=(voice,),
                                          max_audio_length_ms=4 * FRAME_MS, seed=1))
    except Exception as e:  # noqa: BLE001 - reported, not raised: the report says it all
        problems.append(f"a normal job after the run failed: {e!r}")
    return ChaosReport(seed, jobs, ends, window.max_position, engine.max_positions, seconds,
                       problems, partings)


def _launch(engine: Engine, outcome: Outcome, rng: random.Random) -> None:
    spec = outcome.spec
    try:
        if spec.streamed:
            # The callback may run before start() returns: it reads the generation from here.
            outcome.generation = engine.start(spec.request, outcome.record)
        else:
            outcome.generation = engine.start(spec.request)
    except Exception as e:  # noqa: BLE001 - refused up front: also an ending
        outcome.end, outcome.error = "failed", e
        outcome.ended.set()
        return
    finally:
        outcome.launched.set()
    if spec.cancel == "pending":
        outcome.generation.cancel()
    elif spec.cancel == "prefill":
        threading.Timer(rng.random() * 0.01, outcome.generation.cancel).start()


def _drain(outcome: Outcome, timeout: float) -> None:
    """A whole job's caller: read the engine's queue until the end (or the deadline)."""
    deadline = time.monotonic() + timeout
    while not outcome.ended.is_set():
        try:
            event = outcome.generation.events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return
        outcome.record(event)


def _check_outcome(engine: Engine, outcome: Outcome, ties: TieAllowance | None) -> list[str]:
    spec, name = outcome.spec, f"job {outcome.spec.index} (seed {outcome.spec.request.seed})"
    if outcome.end == "timed_out":
        return [f"{name} did not end"]
    if outcome.end == "failed":
        if spec.raise_on_block is None or not isinstance(outcome.error, ConsumerError):
            return [f"{name} failed unexpectedly: {outcome.error!r}"]
        return []
    cancelled = outcome.end == "cancelled"
    if cancelled and spec.cancel in (None, "after_end"):
        return [f"{name} reports cancelled but was not cancelled while running"]
    codebooks = engine.model.cfg.num_codebooks
    got = joined([codes for _, codes in outcome.codes], codebooks)
    solo = engine.generate(spec.request).codes
    if torch.equal(got, solo[:, :got.shape[1]] if cancelled else solo):
        return []
    what = ("a cancelled job's codes are not a prefix of the job run alone" if cancelled
            else "codes differ from the same job run alone")
    if ties is None:
        return [f"{name}: {what}"]
    if ties.probes_left == 0:
        return [f"{name}: {what} (not probed for a tie: too many jobs differ)"]
    ties.probes_left -= 1
    alone = record_margins(engine, spec.request)
    if not torch.equal(joined(alone.pieces, codebooks), solo):
        return [f"{name}: alone, the eager frame step drew other codes than the graphs"]
    part = parting(pieces_of(outcome.codes, codebooks), alone, prefix=cancelled)
    if part is not None and part.is_rounding:
        ties.partings.append(f"{name} at {part}")
        return []
    where = f" first at {part}," if part is not None else ""
    return [f"{name}: {what},{where} not a tie within rounding"]


def _check_nothing_left(engine: Engine, generations: list[weakref.ref]) -> list[str]:
    problems = []
    scheduler = engine.scheduler
    deadline = time.monotonic() + 5
    while (scheduler.active_jobs or scheduler.pending) and time.monotonic() < deadline:
        time.sleep(0.01)
    if scheduler.active_jobs or scheduler.pending:
        problems.append(f"{scheduler.active_jobs} slots and {len(scheduler.pending)} queued "
                        "jobs left after every job ended")
    gc.collect()
    alive = sum(ref() is not None for ref in generations)
    if alive:
        problems.append(f"{alive} finished jobs are still referenced (a leak)")
    return problems

