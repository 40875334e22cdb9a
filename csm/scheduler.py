"""One batched frame loop for every job on the device.

Each job owns a row ("slot") of the KV caches. The loop runs in blocks: prefill a bounded
number of prompt positions for newcomers, then `CHECK_EVERY` frame steps over the first
`bucket` rows without looking at the results, then one device->host copy of the block to
find end frames, feed Mimi and hand audio to each job. Jobs join and leave at block
boundaries; a finished job's slot is reused at once. A job may be several pieces (long text,
dialogue turns): when one piece ends, `next_piece` gives the next prompt and the job
re-prefills its own slot, keeping its Mimi state so the audio runs on without a seam.

Rows outside any job are "parked" at the last cache position, which no job ever reaches:
whatever the step computes for them lands where no live row can attend to it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .codec import MimiCodec
from .frame_step import FrameStepper
from .model import CSM

log = logging.getLogger(__name__)

CHECK_EVERY = 4
PREFILL_CHUNK = 512


class EngineClosedError(RuntimeError):
    """A job was submitted to, or still running in, an engine that was closed."""


@dataclass(frozen=True)
class Prefix:
    """The backbone's keys and values for a prompt's first positions, computed once."""

    positions: int
    kv: list[tuple[Tensor, Tensor]]


@dataclass
class Piece:
    """A prompt to prefill and the frames to draw after it."""

    tokens: Tensor  # [positions, 33] (CPU)
    mask: Tensor
    max_frames: int
    prefix: Prefix | None = None  # copied into the slot instead of prefilling tokens[:n]


@dataclass
class Job:
    piece: Piece
    temperature: float
    topk: int
    seed: int
    # Called on the loop thread with each block of decoded audio (1-D, 24 kHz) and its codes.
    on_audio: Callable[[Tensor, Tensor], None]
    # Called when a piece ends with its codes [32, frames] and stop reason; returns the next
    # piece or None when the job is complete.
    next_piece: Callable[[Tensor, str], Piece | None]
    on_done: Callable[[BaseException | None], None]
    stop_at_end_frame: bool = True

    slot: int = -1
    prefilled: int = 0
    frames_done: int = 0
    piece_index: int = 0
    codes: list[Tensor] = field(default_factory=list)
    cancelled: bool = False
    new_slot: bool = True


class Scheduler:
    def __init__(self, model: CSM, codec: MimiCodec, max_batch: int, use_graphs: bool | None = None):
        self.model = model
        self.codec = codec
        self.max_batch = max_batch
        self.device = model.codebook0_head.weight.device
        self.park = model.cfg.backbone.max_seq_len - 1
        model.setup_caches(max_batch)
        self.stepper = FrameStepper(model, max_batch, self.park, use_graphs)
        self.hist = torch.zeros(CHECK_EVERY, max_batch, model.cfg.num_codebooks,
                                dtype=torch.long, device=self.device)
        self.slots: list[Job | None] = [None] * max_batch
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closed = False
        self.codec.streamer.streaming_forever(max_batch)

    # ---- thread-safe API -------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise EngineClosedError("the engine is closed")
            self.pending.append(job)
            self.cond.notify()
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name="csm-scheduler",
                                               daemon=True)
                self.thread.start()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self.cond:
            self.cond.notify()

    def close(self) -> None:
        """Stop the loop (jobs still waiting or running fail) and let go of the thread."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()
        error = EngineClosedError("the engine was closed before this job finished")
        for job in list(self.pending):
            job.on_done(error)
        self.pending.clear()
        self._fail_all(error)

    @property
    def active_jobs(self) -> int:
        return sum(job is not None for job in self.slots)

    # ---- the loop --------------------------------------------------------------------
    def _serve(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.pending and not any(self.slots) and not self.closed:
                        self.cond.wait()
                    if self.closed:
                        return
                try:
                    self._iteration()
                except Exception as e:  # noqa: BLE001 - fail the jobs, keep the loop alive
                    log.exception("frame loop failed")
                    self._fail_all(e)

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._prefill()
        running = [j for j in self.slots if j is not None and j.prefilled == len(j.piece.tokens)]
        if not running:
            return
        bucket = self.stepper.bucket(max(j.slot for j in running) + 1)
        steps = min(CHECK_EVERY, max(j.piece.max_frames - j.frames_done for j in running))
        for s in range(steps):
            self.hist[s, :bucket].copy_(self.stepper.step(bucket))
        self._collect(running, steps, bucket)

    def _drop_cancelled(self) -> None:
        with self.cond:
            for job in [j for j in self.pending if j.cancelled]:
                self.pending.remove(job)
                job.on_done(None)
        for job in self.slots:
            if job is not None and job.cancelled:
                self._release(job, None)

    def _admit(self) -> None:
        with self.cond:
            while self.pending and None in self.slots:
                job = self.pending.popleft()
                job.slot = self.slots.index(None)
                self.slots[job.slot] = job

    def _prefill(self) -> None:
        """At most PREFILL_CHUNK prompt positions per iteration, so running jobs keep going."""
        budget = PREFILL_CHUNK
        for job in self.slots:
            if job is None or job.prefilled == len(job.piece.tokens) or budget == 0:
                continue
            try:
                budget -= self._prefill_chunk(job, budget)
            except Exception as e:  # noqa: BLE001 - a bad prompt fails its own job only
                log.exception("prefill failed")
                self._release(job, e)

    def compute_prefix(self, tokens: Tensor, mask: Tensor) -> Prefix:
        """Prefill a shared prompt prefix once (before the loop starts, in row 0)."""
        if self.thread is not None:
            raise RuntimeError("prefixes must be computed before the first job is submitted")
        n, dev = len(tokens), self.device
        with torch.inference_mode():
            self.model.prefill(tokens.to(dev)[None], mask.to(dev)[None],
                               torch.arange(n, device=dev)[None], slice(0, 1))
        return Prefix(n, self.model.backbone.read_cache(0, n))

    def _prefill_chunk(self, job: Job, budget: int) -> int:
        prefix = job.piece.prefix
        if job.prefilled == 0 and prefix is not None:
            self.model.backbone.write_cache(job.slot, prefix.kv)
            job.prefilled = prefix.positions
        start = job.prefilled
        end = min(len(job.piece.tokens), start + budget)
        dev, slot = self.device, job.slot
        tokens = job.piece.tokens[start:end].to(dev)[None]
        mask = job.piece.mask[start:end].to(dev)[None]
        pos = torch.arange(start, end, device=dev)[None]
        h = self.model.prefill(tokens, mask, pos, slice(slot, slot + 1))
        job.prefilled = end
        if end == len(job.piece.tokens):
            self.stepper.start_row(slot, h[0], end, job.temperature, job.topk, job.seed)
            if job.new_slot:
                self.codec.streamer.reset_streaming(self._row_mask([slot]))
                job.new_slot = False
        return end - start

    def _collect(self, running: list[Job], steps: int, bucket: int) -> None:
        """The block's one sync: trim each job at its end frame or limit, decode, hand out."""
        block = self.hist[:steps, :bucket].to("cpu", copy=True)  # hist is reused next block
        valid: dict[int, int] = {}
        ended: dict[int, str] = {}
        for job in running:
            frames = block[:, job.slot]
            limit = min(steps, job.piece.max_frames - job.frames_done)
            zero = frames[:limit].eq(0).all(dim=1).nonzero()
            if not job.stop_at_end_frame:
                zero = zero[:0]
            n = int(zero[0]) if len(zero) else limit
            valid[job.slot] = n
            job.codes.append(frames[:n].t())
            job.frames_done += n
            if len(zero):
                ended[job.slot] = "end_of_speech"
            elif job.frames_done == job.piece.max_frames:
                ended[job.slot] = "max_length"
        audio = self._decode(valid, steps)
        for job in running:
            if valid[job.slot]:
                job.on_audio(audio[job.slot], job.codes[-1])
            if job.slot in ended:
                self._end_piece(job, ended[job.slot])

    def _decode(self, valid: dict[int, int], steps: int) -> dict[int, Tensor]:
        """Mimi's streaming decode, one frame at a time, only for rows with a valid frame."""
        mimi = self.codec.streamer
        pieces: dict[int, list[Tensor]] = {slot: [] for slot in valid}
        for s in range(steps):
            rows = [slot for slot, n in valid.items() if s < n]
            if not rows:
                break
            mimi.set_exec_mask(self._row_mask(rows))
            codes = self.codec.valid_codes(self.hist[s])[:, :, None]
            pcm = mimi.decode(codes)[:, 0].float()
            for slot in rows:
                pieces[slot].append(pcm[slot])
        return {slot: torch.cat(p) if p else torch.zeros(0, device=self.device)
                for slot, p in pieces.items()}

    def _end_piece(self, job: Job, reason: str) -> None:
        codes = torch.cat(job.codes, dim=1) if job.codes else torch.zeros(
            self.model.cfg.num_codebooks, 0, dtype=torch.long)
        try:
            nxt = job.next_piece(codes, reason)
        except Exception as e:  # noqa: BLE001
            self._release(job, e)
            return
        if nxt is None:
            self._release(job, None)
            return
        self.stepper.park_row(job.slot)
        job.piece, job.prefilled, job.frames_done, job.codes = nxt, 0, 0, []
        job.piece_index += 1

    def _release(self, job: Job, error: BaseException | None) -> None:
        self.stepper.park_row(job.slot)
        self.slots[job.slot] = None
        job.on_done(error)

    def _fail_all(self, error: BaseException) -> None:
        for job in self.slots:
            if job is not None:
                self._release(job, error)

    def _row_mask(self, rows: list[int]) -> Tensor:
        mask = torch.zeros(self.max_batch, dtype=torch.bool, device=self.device)
        mask[rows] = True
        return mask
