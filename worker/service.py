"""The worker's jobs: request -> schema -> engine -> encoded response, and never a crash.

Built once per process (`Worker.start`): the model is found (worker/model_source.py) and
loads, and the voices (presets and your own, worker/voices.py) are Mimi-encoded and prefilled
at start-up, so a job only pays for its own work. Jobs run concurrently on the
asyncio loop; their frames are drawn together by the engine's batched scheduler, and the
blocking steps of a job (decoding reference audio, watermarking, encoding files) run in
threads so that one job never holds up another.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from csm.codec import SAMPLE_RATE
from csm.engine import (AudioBlock, DeviceFaultError, Engine, Generation, GenerationRequest,
                        PromptTooLongError, Utterance, is_device_fault)
from csm.prompt import Segment
from csm.text_split import split_text

from .audio_io import (AudioInputError, MEDIA_TYPES, decode_base64, encode_audio,
                       read_audio, to_base64)
from .model_source import find_model, load_engine
from .schema import GenerateRequest, ListVoicesRequest, RequestError, VerifyRequest, parse_request
from .settings import Settings
from .stream_chunks import stream_items
from .voices import (NO_VOICE, check_default, read_voices, register_voices, voice_list,
                     voices_folder)

log = logging.getLogger("worker")

# Without a caller limit, a piece may run to about 100 ms per character plus 3 s: enough for
# slow speech, and a bound on the long silent tails CSM sometimes makes instead of ending.
AUTO_MS_PER_CHAR = 100
AUTO_MS_BASE = 3000
# Longer text is spoken as pieces of about this many characters (see csm/text_split.py).
PIECE_CHARS = 220


class Worker:
    def __init__(self, engine: Engine, settings: Settings, presets: dict[str, Segment]):
        self.engine = engine
        self.settings = settings
        self.presets = presets

    @classmethod
    def start(cls, settings: Settings) -> "Worker":
        """Raises settings.StartupError, one line saying what to do, when the worker can't start."""
        source = find_model(settings)
        # Voices are read and checked before the weights load: a broken default fails fast.
        clips = read_voices(source.folder, voices_folder(settings, source.origin))
        check_default(clips, settings.default_voice)
        engine = load_engine(source, settings)
        started = time.perf_counter()
        presets = register_voices(engine, clips, settings.default_voice)
        engine.startup_ms["voices"] = 1000 * (time.perf_counter() - started)
        # One short job through every stage (lazy CUDA graphs in Mimi, cuBLAS handles,
        # SilentCipher) so that the first caller does not pay for them.
        started = time.perf_counter()
        default = settings.default_voice
        engine.generate(GenerationRequest(
            text="Warming up.", context=(presets[default],) if default != NO_VOICE else (),
            max_audio_length_ms=4 * 80, watermark_key=settings.watermark_key))
        engine.startup_ms["warm_up"] = 1000 * (time.perf_counter() - started)
        if settings.watermark_key_is_public:
            log.warning("CSM_WATERMARK_KEY is unset: watermarking with CSM's public key, which "
                        "anyone can detect; set a private key for this deployment")
        log.info("worker ready on %s in %.1f s (%s; up to %d concurrent jobs)", engine.device,
                 engine.load_ms / 1000,
                 ", ".join(f"{k} {v / 1000:.1f} s" for k, v in engine.startup_ms.items()),
                 settings.max_concurrency)
        return cls(engine, settings, presets)

    # ---- entry points ------------------------------------------------------------------
    async def run(self, payload: Any, allow_stream: bool = True) -> AsyncIterator[dict[str, Any]]:
        """A job's outputs: one response (or {"error"}), or stream chunks ending in a summary."""
        try:
            request = parse_request(payload, self.settings.limits, self.voice_names)
            if isinstance(request, VerifyRequest):
                yield await asyncio.to_thread(self.verify, request)
                return
            if isinstance(request, ListVoicesRequest):
                yield voice_list(self.presets, self.settings.default_voice)
                return
            events: asyncio.Queue = asyncio.Queue()
            generation = await self.start_generation(request, events)
            try:
                if request.stream and allow_stream:
                    async for item in stream_items(self, request, generation, events):
                        yield item
                else:
                    blocks = [block async for block in self.blocks(events)]
                    yield await asyncio.to_thread(self.response, request, generation, blocks)
            finally:
                generation.cancel()  # a no-op once finished; frees the slot if we were cut off
        except (RequestError, AudioInputError, PromptTooLongError) as e:
            yield {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - a job must never take the worker down
            yield self.failure(e)

    async def start_generation(self, request: GenerateRequest,
                               events: asyncio.Queue) -> Generation:
        """Plan the job and queue it, in a thread: decoding reference audio, Mimi-encoding it
        and tokenising a long text must not hold up other jobs' streams on the event loop."""
        loop = asyncio.get_running_loop()

        def deliver(event: object) -> None:
            if not loop.is_closed():  # a job outliving its event loop has no one to tell
                loop.call_soon_threadsafe(events.put_nowait, event)

        started = asyncio.ensure_future(asyncio.to_thread(
            lambda: self.engine.start(self.plan(request), deliver)))
        try:
            return await asyncio.shield(started)
        except asyncio.CancelledError:
            # Cut off while the job was being queued: cancel it once it exists.
            started.add_done_callback(
                lambda f: f.exception() is None and f.result().cancel())
            raise

    async def run_to_completion(self, payload: Any) -> dict[str, Any]:
        """The whole response at once (streamed requests too): for `--test_input`."""
        result: dict[str, Any] = {}
        async for item in self.run(payload, allow_stream=False):
            result = item
        return result

    @staticmethod
    async def blocks(events: asyncio.Queue) -> AsyncIterator[AudioBlock]:
        while (block := Generation.unpack(await events.get())) is not None:
            yield block

    @staticmethod
    def failure(error: BaseException) -> dict[str, Any]:
        if isinstance(error, DeviceFaultError):
            return {"error": f"{error}; this worker restarts, retry the job",
                    "refresh_worker": True}
        if isinstance(error, torch.cuda.OutOfMemoryError):
            log.error("out of GPU memory: %s", error)
            return {"error": "the GPU ran out of memory on this job; retry it, or ask for "
                             "shorter audio or context", "refresh_worker": True}
        if is_device_fault(error):
            log.error("CUDA failure: %s", error)
            return {"error": "a GPU fault ended this job; the worker restarts, retry it",
                    "refresh_worker": True}
        log.error("job failed", exc_info=error)
        return {"error": f"internal error ({type(error).__name__}); the job was not completed"}

    # ---- request -> engine request -----------------------------------------------------
    @property
    def voice_names(self) -> tuple[str, ...]:
        """What `voice` may name: every voice (presets and your own), and "none"."""
        return (*sorted(self.presets), NO_VOICE)

    def voice(self, request: GenerateRequest) -> str:
        """The voice in the prompt: as asked, else none with the caller's own context, else the
        default voice (CSM_DEFAULT_VOICE)."""
        return request.voice or (NO_VOICE if request.context else self.settings.default_voice)

    def context_segments(self, request: GenerateRequest) -> tuple[Segment, ...]:
        """The preset voice (if any) followed by the caller's own turns, Mimi-encoded."""
        voice = self.voice(request)
        segments = [] if voice == NO_VOICE else [self.presets[voice]]
        limits = self.settings.limits
        budget_bytes, seconds = limits.max_reference_bytes, 0.0
        for i, turn in enumerate(request.context):
            field = f"context[{i}].audio_base64"
            raw = decode_base64(field, turn.audio_base64, budget_bytes)
            budget_bytes -= len(raw)
            audio, rate = read_audio(field, raw)
            seconds += audio.shape[0] / rate
            if seconds > limits.max_context_seconds:
                raise AudioInputError(
                    f"{field}: context audio adds up to {seconds:.1f} s; the limit is "
                    f"{limits.max_context_seconds:g} s (CSM_MAX_CONTEXT_SECONDS)")
            segments.append(self.engine.segment(turn.speaker, turn.text, audio, rate))
        return tuple(segments)

    def speaker(self, request: GenerateRequest) -> int:
        """Explicit speaker, else the voice's own, else 0."""
        if request.speaker is not None:
            return request.speaker
        voice = self.voice(request)
        return self.presets[voice].speaker if voice != NO_VOICE else 0

    def utterances(self, request: GenerateRequest) -> list[Utterance]:
        """Every piece to speak, in order: long text and long turns split at sentences."""
        turns = ([(self.speaker(request), request.words)] if request.turns is None
                 else [(t.speaker, t.text) for t in request.turns])
        out = []
        for speaker, text in turns:
            for piece in split_text(text, PIECE_CHARS):
                ms = request.max_audio_length_ms or min(
                    AUTO_MS_BASE + AUTO_MS_PER_CHAR * len(piece),
                    self.settings.limits.max_audio_length_ms)
                out.append(Utterance(speaker, piece, ms))
        return out

    def plan(self, request: GenerateRequest) -> GenerationRequest:
        first, *rest = self.utterances(request)
        return GenerationRequest(
            text=first.text, speaker=first.speaker, then=tuple(rest),
            max_audio_length_ms=first.max_audio_length_ms,
            context=self.context_segments(request),
            temperature=float(request.temperature), topk=request.topk,
            seed=request.seed if request.seed is not None else secrets.randbelow(2**32),
            watermark_key=self.settings.watermark_key)

    # ---- engine result -> response -----------------------------------------------------
    def summary(self, generation: Generation, result_audio_ms: float, frames: int,
                watermarked: bool, timings: dict[str, float]) -> dict[str, Any]:
        timings = {k: round(v, 3) for k, v in timings.items()}
        timings["load_ms"] = round(self.engine.load_ms, 3)
        return {
            "sample_rate": SAMPLE_RATE,
            "duration_ms": round(result_audio_ms, 3),
            "frames": frames,
            "utterances": len(generation.request.utterances),
            "seed": generation.request.seed,
            "stop_reason": generation.stop_reason(),
            "watermarked": watermarked,
            "timings": timings,
        }

    def response(self, request: GenerateRequest, generation: Generation,
                 blocks: list[AudioBlock]) -> dict[str, Any]:
        result = self.engine.finish(generation, blocks)
        start = time.perf_counter()
        data = encode_audio(result.audio, result.sample_rate, request.response_format)
        timings = dict(result.timings_ms, encode_ms=1000 * (time.perf_counter() - start))
        return {"audio_base64": to_base64(data), "format": request.response_format,
                "media_type": MEDIA_TYPES[request.response_format],
                **self.summary(generation, result.duration_ms, result.frames,
                               result.watermarked, timings)}

    def verify(self, request: VerifyRequest) -> dict[str, Any]:
        raw = decode_base64("audio_base64", request.audio_base64,
                            self.settings.limits.max_reference_bytes)
        audio, rate = read_audio("audio_base64", raw)
        found = self.engine.watermarker.verify(audio, rate, self.settings.watermark_key)
        return {"task": "verify_watermark", "watermarked": bool(found)}
