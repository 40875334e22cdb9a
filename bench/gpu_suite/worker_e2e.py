"""Part `worker`: the worker end to end on the device, through `Worker.start` and `run` only.

As RunPod drives it (one asyncio loop, up to 8 jobs at once), on the mode's main shapes:
time to the first streamed chunk with a preset voice, and with a voice cloned from a 10 s
clip whose codes are encoded for each request or kept (worker/clip_codes.py); a whole and a
streamed job, both watermarked; `verify_watermark` and its time; one stream's watermarking
call and how many streams a worker can keep marked in real time, and the same call while 8
jobs run (on the watermarker's own CUDA stream and on the default one); 8 jobs at once; a
streamed job whose caller hangs up after the first chunk (cancelled) and one whose consumer
raises, while others run; 8 at once again, which must not wait on the two abandoned jobs
(each asked for 90 s of audio: a slot still held would show as a long wait); a job at the
edge of the 2048-position window and one a frame past it (refused, naming the field); last, a
clip over `CSM_MAX_VERIFY_SECONDS` refused and, on a GPU, a verify at it timed. The weights
are random: the watermark detector's answer is timed, not judged.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from csm.engine import GenerationRequest
from csm.text_tokenizer import TextTokenizer
from csm.watermark import WATERMARK_SAMPLE_RATE, WatermarkStream, parse_key
from worker.clip_codes import ClipCodes
from worker.service import Worker

from ..run import TEXT, reference_audio, start_worker, time_ms, worker_stream
from .context import Context

CONCURRENCY = 8
KEY = "17,29,113,200,5"
LONG_MS = 90_000  # the abandoned jobs: far longer than anything else here
# The window-edge job's context: about EDGE_TEXT_POSITIONS of text (cheap to prefill), then
# reference audio (12.5 positions a second) up to about EDGE_POSITIONS of the 2048, which
# leaves a few dozen frames to draw.
EDGE_TEXT_POSITIONS = 1500
EDGE_POSITIONS = 2015
EDGE_MAX_CONTEXT_S = 170
FORMATS = [("wav", False), ("flac", False), ("ogg", False), ("pcm", False),
           ("pcm", True), ("wav", True), ("ogg", True), ("opus", True)]


async def verify_at_the_limit(ctx: Context, worker: Worker, wav: bytes) -> None:
    """A clip a frame over CSM_MAX_VERIFY_SECONDS is refused; on a GPU, one at the limit is
    timed: the longest a verify holds SilentCipher (and every stream's watermarking) back."""
    limit = worker.settings.limits.max_verify_seconds
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")

    def clip(seconds: float) -> str:
        out = io.BytesIO()
        sf.write(out, np.resize(audio, round(seconds * rate)), rate, format="WAV")
        return base64.b64encode(out.getvalue()).decode()

    over = (await collect(worker, {"task": "verify_watermark",
                                   "audio_base64": clip(limit + 0.08)}))[-1]
    ctx.check("a clip over CSM_MAX_VERIFY_SECONDS is refused, naming it",
              "CSM_MAX_VERIFY_SECONDS" in over.get("error", ""), over)
    if ctx.device.type != "cuda":  # minutes per second of audio on a CPU
        return
    ctx.step("verify_watermark at CSM_MAX_VERIFY_SECONDS")
    start = time.perf_counter()
    verdict = (await collect(worker, {"task": "verify_watermark",
                                      "audio_base64": clip(limit)}))[-1]
    ms = 1000 * (time.perf_counter() - start)
    ctx.record(verify_at_limit={"ms": ms, "audio_s": limit, "ms_per_audio_s": ms / limit})
    ctx.check("verify_watermark at CSM_MAX_VERIFY_SECONDS answers true or false",
              isinstance(verdict.get("watermarked"), bool), verdict)


async def collect(worker: Worker, payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [item async for item in worker.run(payload)]


def job(ctx: Context, seed: int, **fields: Any) -> dict[str, Any]:
    return {"text": TEXT, "seed": seed, "max_audio_length_ms": ctx.mode.job_ms, **fields}


def complete(ctx: Context, items: list[dict[str, Any]], stream: bool) -> bool:
    """A job answered in full: one response, or chunks ending in the final summary."""
    last = items[-1]
    shape = (all("chunk_index" in i for i in items) and last["final"] is True if stream
             else len(items) == 1 and "audio_base64" in last)
    return (shape and "error" not in last and last["watermarked"] is True
            and last["duration_ms"] == ctx.mode.job_ms)


async def eight_at_once(ctx: Context, worker: Worker, seed: int) -> tuple[float, list[bool]]:
    start = time.perf_counter()
    answers = await asyncio.gather(*(
        collect(worker, job(ctx, seed + i, response_format=fmt, stream=stream))
        for i, (fmt, stream) in enumerate(FORMATS)))
    return (time.perf_counter() - start,
            [complete(ctx, a, stream) for a, (_, stream) in zip(answers, FORMATS)])


async def abandoned(ctx: Context, worker: Worker) -> None:
    """A cancelled stream and a raising consumer, with two ordinary jobs running beside."""
    cancelled = worker.run(job(ctx, 20, stream=True, max_audio_length_ms=LONG_MS))
    first = await anext(cancelled)
    await cancelled.aclose()  # the caller hangs up after the first chunk
    ctx.check("a cancelled stream delivered its first chunk before hanging up",
              first.get("chunk_index") == 0, {k: first.get(k) for k in ("chunk_index", "error")})

    class ConsumerError(Exception):
        pass

    async def raising_consumer() -> None:
        async for _ in worker.run(job(ctx, 21, stream=True, max_audio_length_ms=LONG_MS)):
            raise ConsumerError("the consumer failed on the first chunk")

    raised, whole, streamed = await asyncio.gather(
        raising_consumer(), collect(worker, job(ctx, 22)),
        collect(worker, job(ctx, 23, stream=True)), return_exceptions=True)
    ctx.check("a raising consumer: its error stays its own, jobs beside it complete",
              isinstance(raised, ConsumerError) and not isinstance(whole, BaseException)
              and not isinstance(streamed, BaseException) and complete(ctx, whole, False)
              and complete(ctx, streamed, True), repr(raised))


def period_samples() -> np.ndarray:
    samples = np.random.default_rng(0).standard_normal(WatermarkStream.PERIOD) * 0.1
    return samples.astype(np.float32)


def watermark_period(worker: Worker, reps: int) -> dict[str, float]:
    """A stream is marked one period of the key at a time (~0.975 s of audio), its first
    period in three calls so that its first audio leaves early (csm.watermark.
    WatermarkStream.FIRST_PERIOD). Marking calls take turns process-wide (silentcipher's shared
    STFT): the period's length over one call's time is how many streams one worker can keep
    marked in real time, whatever the engine could generate."""
    samples, message = period_samples(), list(parse_key(KEY))
    marker, device = worker.engine.watermarker, worker.engine.device

    def first_period() -> None:
        for marked, _ in WatermarkStream.FIRST_PERIOD:
            marker.encode_44k(samples[:marked], message)

    ms = time_ms(lambda: marker.encode_44k(samples, message), device, reps)
    audio_ms = 1000 * WatermarkStream.PERIOD / WATERMARK_SAMPLE_RATE
    return {"ms": ms, "first_period_ms": time_ms(first_period, device, reps),
            "audio_ms": audio_ms, "real_time_streams": audio_ms / ms}


def marking_while_busy(worker: Worker, reps: int) -> dict[str, float]:
    """One period's marking call while 8 engine jobs (unmarked) keep the frame loop busy: on
    the watermarker's own CUDA stream, as served, and on the shared default stream, as before
    2026-12-06 (there a call queues behind the loop's graph replays). On the CPU both runs
    are the same call. The result is on the host when the call returns: no device sync."""
    engine, marker = worker.engine, worker.engine.watermarker
    samples, message = period_samples(), list(parse_key(KEY))
    generations = [engine.start(GenerationRequest(text=TEXT, max_audio_length_ms=LONG_MS,
                                                  seed=400 + i, stop_at_end_frame=False))
                   for i in range(CONCURRENCY)]
    try:
        for generation in generations:
            next(generation.blocks())  # every job is drawing frames
        own = time_ms(lambda: marker.encode_44k(samples, message), torch.device("cpu"), reps)
        stream, marker.cuda_stream = marker.cuda_stream, None
        try:
            shared = time_ms(lambda: marker.encode_44k(samples, message), torch.device("cpu"),
                             reps)
        finally:
            marker.cuda_stream = stream
    finally:
        for generation in generations:
            generation.cancel()
            list(generation.blocks())
    return {"own_stream_ms": own, "default_stream_ms": shared,
            "jobs_running": CONCURRENCY, "own_stream": stream is not None}


def edge_context(folder: Path) -> dict[str, Any]:
    """A context turn that fills about EDGE_POSITIONS of the window."""
    tokenizer = TextTokenizer(folder / "tokenizer.json")
    per_sentence = len(tokenizer.encode_turn(0, TEXT)) - 2  # without begin/end of text
    text = " ".join([TEXT] * (EDGE_TEXT_POSITIONS // per_sentence))
    positions = len(tokenizer.encode_turn(0, text))
    seconds = min(EDGE_MAX_CONTEXT_S, max(1.0, (EDGE_POSITIONS - positions) / 12.5))
    return {"text": text, "speaker": 0, "audio_base64": reference_audio(seconds)}


async def window_edge(ctx: Context, worker: Worker) -> None:
    """The longest audio the window allows after a long context, and one frame more. The
    refusal of a too-long request says how many positions the prompt takes."""
    request = {"text": "Edge.", "voice": "none", "seed": 30,
               "context": [edge_context(ctx.model_dir(ctx.mode.main_shapes))]}
    probe = (await collect(worker, dict(request, max_audio_length_ms=LONG_MS)))[-1]
    found = re.search(r"takes (\d+) positions.* of the model's (\d+)", probe.get("error", ""))
    if not ctx.check("the window's refusal says how many positions the prompt takes",
                     found is not None, probe):
        return
    positions, window = int(found[1]), int(found[2])
    frames = window - 1 - positions  # the prompt must stay under window - frames
    edge = (await collect(worker, dict(request, max_audio_length_ms=frames * 80)))[-1]
    over = (await collect(worker, dict(request, max_audio_length_ms=(frames + 1) * 80)))[-1]
    ctx.record(window_edge={"prompt_positions": positions, "frames": frames,
                            "last_position": positions + edge.get("frames", 0) - 1})
    ctx.check("at the window's edge: the job draws every frame up to its last position",
              0 < frames and edge.get("frames") == frames and "error" not in edge,
              {k: edge.get(k) for k in ("frames", "stop_reason", "error")})
    ctx.check("one frame past the edge: refused, naming max_audio_length_ms",
              "max_audio_length_ms" in over.get("error", ""), over.get("error"))


async def cloned_stream(ctx: Context, worker: Worker) -> dict[str, Any]:
    """The same cloned-voice request with the clip's Mimi codes encoded for each request
    (CSM_CLIP_CACHE_ENTRIES=0) and kept from the first (the default)."""
    context = [{"text": TEXT, "speaker": 0, "audio_base64": reference_audio(10)}]
    kept = worker.clip_codes
    try:
        worker.clip_codes = ClipCodes(0)
        encoded = await worker_stream(worker, ctx.mode.job_ms // 80, ctx.mode.reps,
                                      context=context)
    finally:
        worker.clip_codes = kept
    return {"encoded_each_time": encoded,
            "codes_kept": await worker_stream(worker, ctx.mode.job_ms // 80, ctx.mode.reps,
                                              context=context)}


async def scenario(ctx: Context, worker: Worker) -> None:
    ctx.step("time to the first streamed chunk, preset voice")
    ctx.record(stream=await worker_stream(worker, ctx.mode.job_ms // 80, ctx.mode.reps,
                                          voice="conversational_a"))
    ctx.step("time to the first streamed chunk, a voice cloned from a 10 s clip, its codes "
             "kept or not")
    ctx.record(cloned_stream=await cloned_stream(ctx, worker))
    ctx.step("a whole and a streamed job")
    whole = await collect(worker, job(ctx, 1))
    streamed = await collect(worker, job(ctx, 1, stream=True, response_format="pcm"))
    ctx.check("a whole job: one watermarked response of the asked length",
              complete(ctx, whole, False), whole[-1].get("error"))
    ctx.check("a streamed job: chunks, then the final summary, watermarked",
              complete(ctx, streamed, True), streamed[-1].get("error"))
    pcm_samples = sum(len(base64.b64decode(c["audio_base64"])) // 2 for c in streamed)
    ctx.check("the streamed chunks add up to the summary's duration",
              pcm_samples == ctx.mode.job_ms * 24, pcm_samples)
    first = len(base64.b64decode(streamed[0]["audio_base64"])) // 2
    _, leaves = WatermarkStream.FIRST_PERIOD[0]
    ctx.check("a stream's first chunk leaves with the first block (the watermark's first point, "
              "less the resamplers' delay), not after a whole period",
              len(streamed) > 1 and 0 < first <= leaves * 24_000 / WATERMARK_SAMPLE_RATE, first)
    ctx.record(whole_timings=whole[-1].get("timings"))
    ctx.step("verify_watermark")
    start = time.perf_counter()
    verdict = (await collect(worker, {"task": "verify_watermark",
                                      "audio_base64": whole[-1]["audio_base64"]}))[-1]
    ctx.record(verify_watermark={"ms": 1000 * (time.perf_counter() - start),
                                 "audio_ms": ctx.mode.job_ms,
                                 "watermarked": verdict.get("watermarked")})
    ctx.check("verify_watermark answers true or false",
              isinstance(verdict.get("watermarked"), bool), verdict)
    ctx.step("watermarking one period of a stream")
    ctx.record(watermark_period=watermark_period(worker, 5 if ctx.device.type == "cuda" else 2))
    ctx.step("watermarking one period while 8 jobs run")
    ctx.record(watermark_period_busy=await asyncio.to_thread(
        marking_while_busy, worker, 5 if ctx.device.type == "cuda" else 2))
    ctx.step("8 jobs at once")
    before_s, done = await eight_at_once(ctx, worker, 100)
    ctx.check("8 jobs at once (whole and streamed, every format) all complete", all(done), done)
    ctx.step("a cancelled stream and a raising consumer")
    await abandoned(ctx, worker)
    ctx.step("8 jobs at once, after the abandoned ones")
    after_s, done = await eight_at_once(ctx, worker, 200)
    ctx.record(eight_at_once_s={"before": before_s, "after_abandoned_jobs": after_s})
    ctx.check("8 at once again: all complete, without waiting for abandoned jobs' slots",
              all(done) and after_s <= 3 * before_s + 1, {"before_s": before_s,
                                                           "after_s": after_s})
    ctx.step("the window's edge")
    await window_edge(ctx, worker)
    ctx.step("a last job")
    last = await collect(worker, job(ctx, 2))
    ctx.check("the worker still answers", complete(ctx, last, False), last[-1].get("error"))
    # Last: if a verify this long overran the part's limit, nothing else is lost.
    await verify_at_the_limit(ctx, worker, base64.b64decode(whole[-1]["audio_base64"]))


def run(ctx: Context) -> None:
    ctx.step("Worker.start")
    start = time.perf_counter()
    worker = start_worker(ctx.model_dir(ctx.mode.main_shapes), ctx.device, CONCURRENCY,
                          CSM_WATERMARK_KEY=KEY,
                          CSM_MAX_CONTEXT_SECONDS=str(EDGE_MAX_CONTEXT_S),
                          CSM_MAX_REFERENCE_BYTES=str(16 * 2**20))
    ctx.record(ready_after_process_start_s=time.time() - ctx.spawned_at,
               worker_start_s=time.perf_counter() - start)
    asyncio.run(scenario(ctx, worker))
    # Where start-up went (weights, codec, watermark, graphs, presets, warm-up): the engine's
    # account, which Worker.start completes.
    ctx.record(startup_ms=worker.engine.startup_ms)
