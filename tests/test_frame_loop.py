"""Regression tests for the frame loop's faults under concurrent load (tiny RANDOM weights).

Each test reproduces one fault found when the batched loop was tried as a user would: a job at
the edge of the position window beside a longer one, a consumer that raises, a device that
fails or hangs, pieces of one job drawing the same noise, engines never freed, prompt work on
the event loop. Tests that break an engine build their own.
"""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
import weakref

import pytest
import soundfile as sf
import torch

from csm.engine import (DeviceFaultError, Engine, GenerationRequest, Utterance)
from csm.prompt import Segment
from csm.sampling import noise_key
from csm.scheduler import PREFILL_CHUNK, EngineClosedError
from csm.testing.chaos import _edge_segment, sized_segment
from worker_helpers import complete


def finishes(fn, timeout: float = 60.0):
    """fn() in a thread; its result, or a test failure (not a hang) if it doesn't return."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"did not return within {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture
def engine(tiny_model_dir):
    with Engine.load(tiny_model_dir, device="cpu", max_batch=2, stall_timeout_s=2.0) as engine:
        yield engine


@pytest.fixture(scope="module")
def voice_audio(tiny_model_dir):
    audio, rate = sf.read(tiny_model_dir / "prompts" / "conversational_a.wav", dtype="float32")
    return torch.from_numpy(audio), rate


def voice(engine, voice_audio) -> Segment:
    return engine.segment(0, "a reference turn", *voice_audio)


def request(context=(), ms=800, seed=1, text="Hello there.", **kw) -> GenerationRequest:
    return GenerationRequest(text=text, context=context, max_audio_length_ms=ms, seed=seed,
                             stop_at_end_frame=False, **kw)


def test_a_job_at_the_window_edge_beside_a_longer_one(engine):
    """Prompt 2042 positions + 5 frames (the reference accepts < 2048 - 5) beside a 60-frame
    job: the edge row used to be stepped 4 times per block whatever its own limit, past
    position 2047 (IndexError on the CPU, a device-side assert in a CUDA graph)."""
    import random

    edge_context = (_edge_segment(engine, "Edge.", 0, 5, random.Random(0)),)
    edge = request(edge_context, ms=400, text="Edge.")
    assert engine.conversation(edge_context).piece(edge.utterances[0]).tokens.shape[0] == 2042
    long = request(ms=60 * 80, seed=2)
    positions = []
    step = engine.scheduler.stepper.step

    def spy(n, keys):
        positions.append(int(engine.scheduler.stepper.position[:n].max()))
        return step(n, keys)

    engine.scheduler.stepper.step = spy
    long_job = engine.start(long)
    edge_job = engine.start(edge)
    got_edge = finishes(lambda: engine.finish(edge_job, list(edge_job.blocks())))
    got_long = finishes(lambda: engine.finish(long_job, list(long_job.blocks())))
    assert got_edge.frames == 5 and got_long.frames == 60
    assert max(positions) <= 2047
    del engine.scheduler.stepper.step
    assert torch.equal(engine.generate(edge).codes, got_edge.codes)  # batched == alone


def test_a_row_that_would_write_past_the_window_is_refused_untouched(engine):
    """The stepper's own guard, behind the piece builder's: a cache index past the window is
    an out-of-range write, which on a GPU poisons the whole CUDA context."""
    stepper = engine.scheduler.stepper
    h = torch.zeros_like(stepper.h[0])
    before = (stepper.position[0].item(), stepper.remaining[0].item())
    with pytest.raises(ValueError, match="a piece of 5 frames after .* does not fit the "
                                         f"{stepper.window}-position window"):
        stepper.start(0, h, stepper.park_position - 4, 5, 0.9, 50, 1)
    assert (stepper.position[0].item(), stepper.remaining[0].item()) == before
    stepper.start(0, h, stepper.park_position - 4, 4, 0.9, 50, 1)  # the last that fits
    stepper.park(0)


def test_a_raising_consumer_fails_its_job_alone_and_the_loop_lives_on(engine):
    calls = []

    def deliver(event):
        calls.append(type(event).__name__)
        raise RuntimeError("the consumer's event loop is closed")

    beside = engine.start(request(ms=1600, seed=5))
    engine.start(request(ms=400), deliver=deliver)
    result = finishes(lambda: engine.finish(beside, list(beside.blocks())))
    assert result.frames == 20  # the job beside it was not disturbed
    assert torch.equal(result.codes, engine.generate(request(ms=1600, seed=5)).codes)
    # The raising job was failed once its on_audio raised, and told so once (on_done raised
    # too, and was only logged).
    assert calls == ["AudioBlock", "RuntimeError"]
    assert engine.scheduler.active_jobs == 0 and engine.fault is None


def raise_on_call(engine, n: int, error: BaseException) -> None:
    """The frame step raises `error` on its n-th call, and runs normally otherwise."""
    original, calls = engine.model.frame_step, [0]

    def step(*args):
        calls[0] += 1
        if calls[0] == n:
            raise error
        return original(*args)

    engine.model.frame_step = step


def test_a_cuda_error_fails_every_job_and_refuses_new_ones(engine):
    raise_on_call(engine, 3, torch.AcceleratorError("CUDA error: device-side assert triggered")
                  if hasattr(torch, "AcceleratorError")
                  else RuntimeError("CUDA error: device-side assert"))
    with engine.scheduler.cond:  # all three queued before the loop's third step faults
        jobs = [engine.start(request(ms=2000, seed=s)) for s in range(3)]  # 2 slots, 1 waiting
    for job in jobs:
        with pytest.raises(DeviceFaultError, match="the GPU failed"):
            finishes(lambda: list(job.blocks()))
    assert engine.fault is not None
    with pytest.raises(DeviceFaultError):
        engine.start(request())


def test_out_of_gpu_memory_fails_the_running_jobs_but_not_the_engine(engine):
    """Running out of memory is not a device fault (the context is still good): the jobs of
    that step fail with it, the waiting one runs as it would alone, new ones are taken."""
    raise_on_call(engine, 3, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to "
                                                         "allocate 2.00 GiB"))
    with engine.scheduler.cond:  # 2 slots: two running when the step fails, one waiting
        jobs = [engine.start(request(ms=800, seed=s)) for s in range(3)]
    for job in jobs[:2]:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            finishes(lambda: list(job.blocks()))
    waiting = finishes(lambda: engine.finish(jobs[2], list(jobs[2].blocks())))
    assert engine.fault is None
    assert torch.equal(waiting.codes, engine.generate(request(ms=800, seed=2)).codes)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_loop_thread_that_dies_fails_every_job(engine):
    """What `except Exception` can't catch (a BaseException from inside a step) ends the loop
    thread; the watchdog sees it gone with work left and fails every job, running or
    waiting, rather than leave them waiting for ever."""

    class Fatal(BaseException):
        pass

    raise_on_call(engine, 2, Fatal())
    with engine.scheduler.cond:
        jobs = [engine.start(request(ms=800, seed=s)) for s in range(3)]
    for job in jobs:
        with pytest.raises(DeviceFaultError, match="the frame loop stopped"):
            finishes(lambda: list(job.blocks()), timeout=20)
    assert not engine.scheduler.thread.is_alive()
    with pytest.raises(DeviceFaultError):
        engine.start(request())


def test_a_hung_step_is_caught_by_the_watchdog(engine):
    release = threading.Event()
    original = engine.model.frame_step

    def hang(*args):
        release.wait(30)
        return original(*args)

    engine.model.frame_step = hang
    job = engine.start(request(ms=800))
    started = time.monotonic()
    with pytest.raises(DeviceFaultError, match="no progress for over 2 s"):
        finishes(lambda: list(job.blocks()), timeout=20)
    assert time.monotonic() - started < 10
    with pytest.raises(DeviceFaultError):
        engine.start(request())
    release.set()


@pytest.mark.parametrize("error, says", [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "restarts"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     "the GPU ran out of memory on this job; retry it"),
], ids=["device-fault", "out-of-memory"])
def test_the_worker_asks_for_a_restart_after_a_gpu_failure(engine, tmp_path, error, says):
    """After a device fault the next job is refused too; after running out of memory the
    engine still takes jobs, and the worker still asks RunPod for a fresh one (README,
    "Faults inside the worker"), with an error that says what to retry."""
    from worker.service import Worker
    from worker.settings import load_settings

    engine.model.frame_step = lambda *a: (_ for _ in ()).throw(error)
    worker = Worker(engine, load_settings({"CSM_MODEL_DIR": str(tmp_path)}), presets={},
                    default_voice="none")
    loop = asyncio.new_event_loop()
    try:
        for _ in range(2):  # the failing job, then a new one (refused after a device fault)
            items = loop.run_until_complete(complete(worker,
                {"text": "Hi.", "voice": "none", "max_audio_length_ms": 160}))
            assert items["refresh_worker"] is True and says in items["error"]
    finally:
        loop.close()
    assert (engine.fault is None) == isinstance(error, torch.cuda.OutOfMemoryError)


def test_each_piece_draws_its_own_noise_and_a_seed_reproduces_the_job(engine):
    keys = []
    original = engine.model.decode_codes

    def spy(h, sampling, rows):
        keys.extend(sampling.seed.tolist())
        return original(h, sampling, rows)

    engine.model.decode_codes = spy
    req = request(ms=240, seed=77, then=(Utterance(0, "Hello there.", 240),
                                          Utterance(0, "Hello there.", 240)))
    first = engine.generate(req)
    assert {noise_key(77, p) for p in range(3)} <= set(keys)
    assert len({noise_key(77, p) for p in range(3)}) == 3
    engine.model.decode_codes = original
    assert torch.equal(engine.generate(req).codes, first.codes)


def test_a_job_between_pieces_is_not_stepped_while_its_next_prompt_prefills(engine):
    """The next piece's prompt takes two prefill chunks, beside a job that keeps the loop
    stepping. Its row must sit parked meanwhile: left at the position where its first piece
    stopped, it is stepped with the other job and writes that position's keys and values over
    what the first chunk had just prefilled there. One position of ~515 seldom turns a draw
    of the tiny model (the codes stayed equal when the park was taken out), so the rows are
    checked at every step."""
    context = (sized_segment(engine, "Hello there.", 0, 505, random.Random(0)),)
    first, second = Utterance(0, "Hello there.", 240), Utterance(0, "And a second piece.", 240)
    two = request(context, ms=first.max_audio_length_ms, text=first.text, seed=4,
                  then=(second,))
    conversation = engine.conversation(context)
    stopped_at = len(conversation.piece(first).tokens) + 3  # 3 frames
    conversation.add(first, torch.zeros(32, 3, dtype=torch.long))
    assert stopped_at < PREFILL_CHUNK < len(conversation.piece(second).tokens)
    alone = engine.generate(two)
    scheduler, stepper = engine.scheduler, engine.scheduler.stepper
    step, unparked = stepper.step, []

    def spy(n, keys):  # every row stepped without a piece of its own must sit parked
        unparked.extend(slot for slot in range(n)
                        if (scheduler.slots[slot] is None or scheduler.slots[slot].prefilling)
                        and int(stepper.position[slot]) != stepper.park_position)
        return step(n, keys)

    stepper.step = spy
    # The other job in slot 1, running; two in slot 0, inside the bucket that steps it.
    with scheduler.cond:
        filler = engine.start(request(ms=80))
        other = engine.start(request(ms=40 * 80, seed=2))
    finishes(lambda: engine.finish(filler, list(filler.blocks())))
    two_job = engine.start(two)
    together = finishes(lambda: engine.finish(two_job, list(two_job.blocks())))
    assert not other.job.done  # it ran beside every piece of two
    finishes(lambda: engine.finish(other, list(other.blocks())))
    del stepper.step
    assert unparked == []
    assert torch.equal(together.codes, alone.codes)


def test_close_stops_the_loop_fails_what_runs_and_frees_the_model(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, device="cpu", max_batch=1)
    running = engine.start(request(ms=8000))
    waiting = engine.start(request(ms=800))
    next(running.blocks())
    thread, model = engine.scheduler.thread, weakref.ref(engine.model)
    engine.close()
    assert not thread.is_alive()
    for job in (running, waiting):
        with pytest.raises(EngineClosedError):
            list(job.blocks())
    with pytest.raises(EngineClosedError):
        engine.start(request())
    del running, waiting
    gc.collect()
    assert model() is None


def test_each_turn_is_tokenised_once_per_job(engine, voice_audio):
    segment = voice(engine, voice_audio)
    context = (segment, Segment(1, "another turn", segment.codes[:, :10]))
    calls = []
    original = engine.tokenizer.encode_turn
    engine.tokenizer.encode_turn = lambda speaker, text: calls.append(text) or original(
        speaker, text)
    utterances = tuple(Utterance(0, f"Piece {i}.", 160) for i in range(4))
    result = engine.generate(request(context, ms=160, text="Piece start.", then=utterances))
    assert result.frames == 10
    assert sorted(calls) == sorted(["a reference turn", "another turn", "Piece start.",
                                    *(u.text for u in utterances)])


def test_the_worker_builds_prompts_off_its_event_loop(tiny_model_dir):
    from worker.service import Worker
    from worker.settings import load_settings

    settings = load_settings({"CSM_MODEL_DIR": str(tiny_model_dir), "CSM_DEVICE": "cpu",
                              "CSM_MAX_CONCURRENCY": "1"})
    worker = Worker.start(settings)
    threads = []
    original = worker.engine.tokenizer.encode_turn
    worker.engine.tokenizer.encode_turn = lambda s, t: threads.append(
        threading.get_ident()) or original(s, t)
    loop = asyncio.new_event_loop()
    try:
        loop_thread = loop.run_until_complete(_ident())
        out = loop.run_until_complete(complete(worker,
            {"text": " ".join(f"Sentence {i} is off the loop." for i in range(20)),
             "max_audio_length_ms": 160}))
    finally:
        loop.close()
        worker.engine.close()
    assert "error" not in out and out["utterances"] > 1
    assert threads and loop_thread not in threads
    # Tokenised once per job: the preset voice's transcript and each piece of the text.
    assert len(threads) == 1 + out["utterances"]


async def _ident() -> int:
    return threading.get_ident()
