"""One batched frame loop for every job on the device.

Each job owns a row ("slot") of the KV caches. The loop runs in blocks: prefill a bounded
number of prompt positions for newcomers, then `CHECK_EVERY` frame steps over the first
`bucket` rows (attending over the key span that holds their positions) without looking at
the results, then one device->host copy of the block to find end frames, feed Mimi (on the
same bucket of rows, `MimiRows`) and hand audio to each job. Jobs join and leave at block
boundaries; a finished job's slot is reused at once. A job may be several pieces (long text,
dialogue turns): when one piece ends, `next_piece` gives the next prompt and the job
re-prefills its own slot, keeping its Mimi state so the audio runs on without a seam.

Who owns what: the `Occupant` of a slot is its host-side state (the job, its current piece
and how far it has got); `FrameStepper` owns the row's device buffers; `_occupy` and
`_vacate` are the only ways into and out of a slot, and reset or park all of it together.

Nothing a job does can stop the loop: its callbacks run guarded and a failure ends that job
alone. A device fault (a CUDA error) or a loop that stops making progress (`_watch`) fails
every job with `DeviceFaultError` and refuses new ones: the process must be restarted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .codec import MimiCodec
from .frame_step import KEY_BLOCK, FrameStepper, GraphCaptureError
from .mimi_rows import MimiRows
from .model import CSM
from .sampling import noise_key

log = logging.getLogger(__name__)

CHECK_EVERY = 4
PREFILL_CHUNK = 512
# One iteration is a prefill chunk plus a few frames: milliseconds on a GPU, seconds for the
# full model on a CPU. Far beyond that, the device is hung.
STALL_TIMEOUT_S = 120.0


class EngineClosedError(RuntimeError):
    """A job was submitted to, or still running in, an engine that was closed."""


class DeviceFaultError(RuntimeError):
    """The device can't be trusted any more (a CUDA error, or a hung loop): restart."""


def is_device_fault(error: BaseException) -> bool:
    """A CUDA error poisons the process's context: every later kernel fails too. Running out
    of memory does not: that job fails and the others go on."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    if isinstance(error, getattr(torch, "AcceleratorError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("CUDA error", "CUBLAS_STATUS", "cuDNN error"))


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


@dataclass(eq=False)
class Job:
    """What a caller submits. The callbacks run on the loop thread; whatever they raise
    fails this job alone."""

    piece: Piece
    temperature: float
    topk: int
    seed: int
    # Each block of decoded audio (1-D, 24 kHz, on the host) and its codes [32, frames].
    on_audio: Callable[[Tensor, Tensor], None]
    # A piece's codes [32, frames] and stop reason -> the next piece, or None: complete.
    next_piece: Callable[[Tensor, str], Piece | None]
    # Called exactly once: None when the job completed or was cancelled, else its error.
    on_done: Callable[[BaseException | None], None]
    stop_at_end_frame: bool = True
    cancelled: bool = False
    done: bool = False


@dataclass(eq=False)
class Occupant:
    """A slot's host-side state: whose row it is and how far its current piece has got."""

    job: Job
    slot: int
    piece: Piece
    piece_index: int = 0
    prefilled: int = 0
    frames_done: int = 0
    codes: list[Tensor] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.piece.tokens)

    @property
    def frames_left(self) -> int:
        return self.piece.max_frames - self.frames_done

    @property
    def position(self) -> int:
        """The cache position the row's next frame goes to (the stepper's, seen from here)."""
        return len(self.piece.tokens) + self.frames_done

    def next(self, piece: Piece) -> None:
        self.piece, self.prefilled, self.frames_done, self.codes = piece, 0, 0, []
        self.piece_index += 1

    def take(self, frames: Tensor) -> tuple[int, str | None]:
        """Keep this block's frames [steps, 32] up to the end frame or the piece's limit.
        Returns how many were kept and why the piece ended, if it did."""
        limit = min(len(frames), self.frames_left)
        ends = frames[:limit].eq(0).all(dim=1).nonzero() if self.job.stop_at_end_frame else []
        n = int(ends[0]) if len(ends) else limit
        self.codes.append(frames[:n].t().clone())  # not a view that keeps the whole block
        self.frames_done += n
        if len(ends):
            return n, "end_of_speech"
        return n, "max_length" if self.frames_left == 0 else None


class Scheduler:
    def __init__(self, model: CSM, codec: MimiCodec, max_batch: int,
                 use_graphs: bool | None = None, stall_timeout_s: float = STALL_TIMEOUT_S,
                 key_block: int = KEY_BLOCK, compile_backend: str | Callable | None = None):
        self.model = model
        self.codec = codec
        self.max_batch = max_batch
        self.stall_timeout_s = stall_timeout_s
        self.device = model.codebook0_head.weight.device
        model.setup_caches(max_batch)
        self.stepper = FrameStepper(model, max_batch, use_graphs, key_block, compile_backend)
        # Every row's codes for each step of the current block, on the device.
        self.block_codes = torch.zeros(CHECK_EVERY, max_batch, model.cfg.num_codebooks,
                                       dtype=torch.long, device=self.device)
        self.slots: list[Occupant | None] = [None] * max_batch
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.fault: DeviceFaultError | None = None
        self.closed = False
        self.busy_since: float | None = None  # when the running iteration began
        self.thread: threading.Thread | None = None
        self.watchdog: threading.Thread | None = None
        self.mimi = MimiRows(codec.streamer, self.stepper.buckets)
        self.graph_check_ms = self.stepper.check_ms  # both checks of CUDA graphs
        if self.stepper.use_graphs:
            start = time.perf_counter()
            self._check_mimi_graphs()
            self.graph_check_ms += 1000 * (time.perf_counter() - start)

    def _check_mimi_graphs(self) -> None:
        """Like the frame step's graphs (FrameStepper.check_replay), Mimi's are checked on
        the deployment's own GPU before the first job, and captured here rather than in a job:
        within 1% of the peak of the same decode without graphs. cuDNN's TF32 convolutions
        differ by ~0.1%; a replay that ignored exec_mask or its state would be off by about
        the signal itself."""
        for bucket in self.stepper.buckets:
            error = self.mimi.graph_error(bucket, self.codec.codebook_size)
            if not error <= 0.01:  # NaN fails too
                raise GraphCaptureError(
                    f"Mimi's streaming decode of {bucket} rows under CUDA graphs differs from "
                    f"the same decode without them by {error:.1%} of its peak (at most 1%); "
                    "CSM_CUDA_GRAPHS=0 serves without graphs, slower")

    # ---- thread-safe API -------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.cond:
            if self.fault is not None:
                raise DeviceFaultError(str(self.fault))
            if self.closed:
                raise EngineClosedError("the engine is closed")
            self.pending.append(job)
            self.cond.notify_all()
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name="csm-scheduler",
                                               daemon=True)
                self.watchdog = threading.Thread(target=self._watch, name="csm-watchdog",
                                                 daemon=True)
                self.thread.start()
                self.watchdog.start()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self.cond:
            self.cond.notify_all()

    def close(self) -> None:
        """Stop the loop; jobs still waiting or running fail with EngineClosedError."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for thread in (self.thread, self.watchdog):
            if thread is not None:
                thread.join(timeout=self.stall_timeout_s)
        error = EngineClosedError("the engine was closed before this job finished")
        for job in self._all_jobs():
            self._finish(job, error)

    @property
    def active_jobs(self) -> int:
        return sum(o is not None for o in self.slots)

    # ---- the loop --------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self.pending) or any(o is not None for o in self.slots)

    def _serve(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self._has_work() and not self.closed:
                        self.cond.wait()
                    if self.closed or self.fault is not None:
                        return
                    self.busy_since = time.monotonic()
                try:
                    self._iteration()
                except Exception as e:  # noqa: BLE001 - fail the jobs, keep the loop alive
                    self._loop_failed(e)
                finally:
                    with self.cond:
                        self.busy_since = None

    def _watch(self) -> None:
        """Fail everything if the loop hangs inside an iteration or its thread is gone."""
        while True:
            with self.cond:
                self.cond.wait(timeout=min(1.0, self.stall_timeout_s / 4))
                if self.closed or self.fault is not None:
                    return
                busy = self.busy_since
                hung = busy is not None and time.monotonic() - busy > self.stall_timeout_s
                dead = not self.thread.is_alive() and self._has_work()
            if hung or dead:
                self._declare_fault(DeviceFaultError(
                    f"the frame loop made no progress for over {self.stall_timeout_s:g} s"
                    if hung else "the frame loop stopped"))

    def _loop_failed(self, error: Exception) -> None:
        if is_device_fault(error):
            self._declare_fault(DeviceFaultError(
                f"the GPU failed ({type(error).__name__}: {str(error).splitlines()[0]})"))
            return
        # Not the device: the rows' state is unknown, so their jobs fail; the loop goes on.
        log.exception("frame loop iteration failed")
        for occupant in [o for o in self.slots if o is not None]:
            self._vacate(occupant, error)

    def _declare_fault(self, error: DeviceFaultError) -> None:
        log.error("device fault, every job fails and new ones are refused: %s", error)
        with self.cond:
            if self.fault is not None:
                return
            self.fault = error
            self.cond.notify_all()
        for job in self._all_jobs():
            self._finish(job, error)

    def _all_jobs(self) -> list[Job]:
        with self.cond:
            jobs = list(self.pending)
            self.pending.clear()
        return jobs + [o.job for o in self.slots if o is not None]

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._prefill()
        running = [o for o in self.slots if o is not None and not o.prefilling]
        if not running:
            return
        bucket = self.stepper.bucket(max(o.slot for o in running) + 1)
        steps = min(CHECK_EVERY, max(o.frames_left for o in running))
        # Every position the block writes: a row stops once its piece's frames are drawn.
        keys = self.stepper.key_span(max(o.position + min(steps, o.frames_left)
                                         for o in running))
        for s in range(steps):
            self.block_codes[s, :bucket].copy_(self.stepper.step(bucket, keys))
        self._collect(running, steps, bucket)

    def _drop_cancelled(self) -> None:
        with self.cond:
            dropped = [j for j in self.pending if j.cancelled]
            for job in dropped:
                self.pending.remove(job)
        for job in dropped:
            self._finish(job, None)
        for occupant in self.slots:
            if occupant is not None and occupant.job.cancelled:
                self._vacate(occupant, None)

    def _admit(self) -> None:
        while None in self.slots:
            with self.cond:
                if not self.pending:
                    return
                job = self.pending.popleft()
            self._occupy(job, self.slots.index(None))

    def _occupy(self, job: Job, slot: int) -> None:
        """A fresh row for a new job: parked until its prompt is in, Mimi's state reset."""
        self.slots[slot] = Occupant(job, slot, job.piece)
        self.stepper.park(slot)
        self.mimi.reset(self._per_row({slot: 1}) > 0)

    def _vacate(self, occupant: Occupant, error: BaseException | None) -> None:
        self.stepper.park(occupant.slot)
        self.slots[occupant.slot] = None
        self._finish(occupant.job, error)

    def _finish(self, job: Job, error: BaseException | None) -> None:
        """Tell the job it ended, once, whoever (loop, watchdog, close) gets there first."""
        with self.cond:
            if job.done:
                return
            job.done = True
        try:
            job.on_done(error)
        except Exception:  # noqa: BLE001 - the job is over either way
            log.exception("a job's on_done callback raised")

    def _guarded(self, occupant: Occupant, callback: Callable,
                 *args: object) -> tuple[bool, object]:
        """Run one of a job's callbacks: (True, its result), or (False, None) after what it
        raised ended that job. A device fault still propagates: it is everyone's."""
        try:
            return True, callback(*args)
        except Exception as e:  # noqa: BLE001
            if is_device_fault(e):
                raise
            log.warning("job callback %s raised %s: failing that job",
                        getattr(callback, "__name__", "?"), type(e).__name__)
            self._vacate(occupant, e)
            return False, None

    def _prefill(self) -> None:
        """At most PREFILL_CHUNK prompt positions per iteration, so running jobs keep going."""
        budget = PREFILL_CHUNK
        for occupant in self.slots:
            if budget == 0:
                return
            if occupant is not None and occupant.prefilling:
                ok, spent = self._guarded(occupant, self._prefill_chunk, occupant, budget)
                budget -= spent if ok else 0

    def compute_prefix(self, tokens: Tensor, mask: Tensor) -> Prefix:
        """Prefill a shared prompt prefix once (before the loop starts, in row 0)."""
        if self.thread is not None:
            raise RuntimeError("prefixes must be computed before the first job is submitted")
        n, dev = len(tokens), self.device
        with torch.inference_mode():
            self.model.prefill(tokens.to(dev)[None], mask.to(dev)[None],
                               torch.arange(n, device=dev)[None], slice(0, 1),
                               self.stepper.key_span(n))
        return Prefix(n, self.model.backbone.read_cache(0, n))

    def _prefill_chunk(self, occupant: Occupant, budget: int) -> int:
        piece, slot, dev = occupant.piece, occupant.slot, self.device
        if occupant.prefilled == 0 and piece.prefix is not None:
            self.model.backbone.write_cache(slot, piece.prefix.kv)
            occupant.prefilled = piece.prefix.positions
        start = occupant.prefilled
        end = min(len(piece.tokens), start + budget)
        h = self.model.prefill(piece.tokens[start:end].to(dev)[None],
                               piece.mask[start:end].to(dev)[None],
                               torch.arange(start, end, device=dev)[None], slice(slot, slot + 1),
                               self.stepper.key_span(end))
        occupant.prefilled = end
        if not occupant.prefilling:
            job = occupant.job
            self.stepper.start(slot, h[0], end, piece.max_frames, job.temperature, job.topk,
                               noise_key(job.seed, occupant.piece_index))
        return end - start

    def _collect(self, running: list[Occupant], steps: int, bucket: int) -> None:
        """The block's one sync: keep each row's valid frames, decode them, hand them out,
        and move on the rows whose piece ended."""
        block = self.block_codes[:steps, :bucket].to("cpu", copy=True)  # reused next block
        taken = {o.slot: o.take(block[:, o.slot]) for o in running}
        audio = self._decode({slot: n for slot, (n, _) in taken.items()}, bucket)
        for occupant in running:
            n, ended = taken[occupant.slot]
            if occupant.job.done:  # failed by the watchdog while this block ran
                continue
            if n:
                ok, _ = self._guarded(occupant, occupant.job.on_audio, audio[occupant.slot],
                                      occupant.codes[-1])
                if not ok:
                    continue
            if ended is not None:
                self._end_piece(occupant, ended)

    def _decode(self, valid: dict[int, int], bucket: int) -> dict[int, Tensor]:
        """Mimi's streaming decode, one frame at a time, over the frame step's bucket of rows
        (the others keep their state, a row between pieces too); only rows with a valid frame
        advance. Returns the audio of each row that had valid frames, on the host."""
        steps = max(valid.values(), default=0)
        if steps == 0:
            return {}
        counts = self._per_row(valid)[:bucket]  # one host->device copy per block, not per frame
        pcm = torch.stack([self.mimi.decode(self.codec.valid_codes(self.block_codes[s, :bucket]),
                                            counts > s) for s in range(steps)], dim=1)
        # [bucket, steps, 1920] to the host in one copy for every row, rather than a copy
        # (and a wait for the device) per row; a row's valid frames are its first. Each row's
        # audio is cloned out of it: a view would keep the whole bucket's block alive for as
        # long as a job holds its audio (a whole response holds every block to the end).
        host = pcm.float().cpu()
        return {slot: host[slot, :n].flatten().clone() for slot, n in valid.items() if n}

    def _end_piece(self, occupant: Occupant, reason: str) -> None:
        codes = torch.cat(occupant.codes, dim=1)
        ok, piece = self._guarded(occupant, occupant.job.next_piece, codes, reason)
        if not ok:
            return
        if piece is None:
            self._vacate(occupant, None)
            return
        self.stepper.park(occupant.slot)
        occupant.next(piece)

    def _per_row(self, counts: dict[int, int]) -> Tensor:
        """[max_batch] on the device: each row's count, 0 for rows not named."""
        row = torch.zeros(self.max_batch, dtype=torch.long)
        for slot, n in counts.items():
            row[slot] = n
        return row.to(self.device)
