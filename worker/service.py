"""The worker's service: request -> plan -> engine -> watermark -> encoded chunks, never a crash.

Built once per process (`Worker.start`): the model is found (worker/model_source.py) and
loads, and the voices (presets and your own, worker/voices.py) are Mimi-encoded and prefilled
at start-up, so a job only pays for its own work. Both front doors (the RunPod queue handler
and the HTTP server) call the same API: `speak` makes the audio of a `SpeechRequest` as chunks
ready to leave, `whole_answer` shapes a whole one (its audio as base64, or as a link into the
bucket: worker/result_store.py), `verify` checks a watermark, and `run` answers a queue job
with the native JSON items. Jobs run concurrently on the asyncio loop; their frames are drawn
together by the engine's batched scheduler, and the blocking steps of a job (planning it,
decoding reference audio, watermarking, encoding files, storing a result in the bucket) run in
threads so that one job never holds up another.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import torch
from torch import Tensor

from csm.codec import SAMPLE_RATE
from csm.engine import (AudioBlock, DeviceFaultError, Engine, Generation, GenerationRequest,
                        PromptTooLongError, Utterance, is_device_fault)
from csm.prompt import Segment
from csm.text_split import split_text

from .audio_fetch import fetch_audio
from .audio_io import (MAX_BYTES_PER_SECOND, MEDIA_TYPES, AudioInputError, audio_seconds,
                       decode_base64, encode_audio, read_audio)
from .chunk import Chunk
from .clip_codes import ClipCodes
from .model_source import find_model, load_engine
from .responses import chunk_item, stored_response, whole_response
from .result_store import ResultStore, ResultStoreError
from .schema import (CallerAudio, ListVoicesRequest, RequestError, SpeechRequest, VerifyRequest,
                     has_words, parse_request)
from .settings import Settings
from .stream_encoder import StreamEncoder
from .timings import Timer
from .voices import (NO_VOICE, choose_default, read_voices, register_voices, voice_list,
                     voices_folder)
from .watermarking import Marking, Watermarking

log = logging.getLogger("worker")

# Without a caller limit, a piece may run to about 100 ms per character plus 3 s: enough for
# slow speech, and a bound on the long silent tails CSM sometimes makes instead of ending.
AUTO_MS_PER_CHAR = 100
AUTO_MS_BASE = 3000
# A result's JSON besides its audio: a streamed item's fields, about 3 items a second; a
# whole response's summary (about 600 bytes) with room to spare.
ITEM_OVERHEAD_BYTES_PER_SECOND = 1_000
WHOLE_OVERHEAD_BYTES = 4_000
# Longer text is spoken as pieces of about this many characters (see csm/text_split.py).
PIECE_CHARS = 220
# A long job's progress, as it goes (Worker.speak's `on_progress`).
Progress = Callable[[dict[str, Any]], None]
# What a caller's mistake raises: answered with its message, the worker carries on.
CALLER_ERRORS = (RequestError, AudioInputError, PromptTooLongError)


class Worker:
    def __init__(self, engine: Engine, settings: Settings, presets: dict[str, Segment],
                 default_voice: str, results: ResultStore | None = None):
        self.engine = engine
        self.settings = settings
        self.presets = presets
        self.default_voice = default_voice  # of requests that name none (CSM_DEFAULT_VOICE)
        self.watermarking = Watermarking(engine.watermarker, settings)
        self.results = results  # the bucket for whole responses (CSM_BUCKET_NAME), if any
        self.clip_codes = ClipCodes(settings.clip_cache_entries)  # callers' reference clips

    @classmethod
    def start(cls, settings: Settings) -> "Worker":
        """Raises settings.StartupError, one line saying what to do, when the worker can't start."""
        source = find_model(settings)
        # Voices are read and checked before the weights load: a broken default fails fast.
        clips = read_voices(source.folder, voices_folder(settings, source.origin))
        default = choose_default(clips, settings.default_voice)
        results = ResultStore.connect(settings.bucket) if settings.bucket else None
        engine = load_engine(source, settings)
        started = time.perf_counter()
        presets = register_voices(engine, clips, default)
        engine.startup_ms["voices"] = 1000 * (time.perf_counter() - started)
        # One short job through every stage (lazy CUDA graphs in Mimi, cuBLAS handles,
        # SilentCipher) so that the first caller does not pay for them.
        started = time.perf_counter()
        warm = engine.generate(GenerationRequest(
            text="Warming up.", context=(presets[default],) if default != NO_VOICE else (),
            max_audio_length_ms=4 * 80))
        engine.watermarker.embed(warm.audio, SAMPLE_RATE, settings.watermark_key)
        engine.startup_ms["warm_up"] = 1000 * (time.perf_counter() - started)
        if settings.watermark_key_is_public:
            log.warning("CSM_WATERMARK_KEY is unset: watermarking with CSM's public key, which "
                        "anyone can detect; set a private key for this deployment")
        log.info("worker ready on %s in %.1f s (%s; up to %d concurrent jobs)", engine.device,
                 engine.load_ms / 1000,
                 ", ".join(f"{k} {v / 1000:.1f} s" for k, v in engine.startup_ms.items()),
                 settings.max_concurrency)
        return cls(engine, settings, presets, default, results)

    # ---- the service API ---------------------------------------------------------------
    async def speak(self, request: SpeechRequest, fixed: tuple[Segment, ...] | None = None,
                    history: tuple[Segment, ...] = (), encoder: StreamEncoder | None = None,
                    on_progress: Progress | None = None) -> AsyncIterator[Chunk]:
        """The audio of `request`: one whole file, or (`stream`) chunks as they are marked.

        `fixed` replaces the request's own voice and context with segments encoded before (a
        connection that speaks many times); `history` is earlier speech of the same
        conversation, after them (the oldest dropped first when the window runs short);
        `encoder` continues a stream the caller owns (one file across several requests) and
        is left open; `on_progress` hears of each piece of a long text as the next begins
        (`{"pieces", "pieces_done", "audio_ms"}`). Caller mistakes raise (CALLER_ERRORS) before
        the first chunk. Closing the iterator early cancels the job and frees its slot at once.
        """
        timer = Timer()
        marking = self.watermarking.marking(request.watermark, request.watermark_key)
        events: asyncio.Queue = asyncio.Queue()
        generation = await self._start(request, fixed, history, events)
        try:
            make = self._stream if request.stream else self._whole
            pieces = len(generation.request.utterances)
            async with (aclosing(self._blocks(events, timer, pieces, on_progress)) as blocks,
                        aclosing(make(request, generation, blocks, timer, marking,
                                      encoder)) as chunks):
                async for chunk in chunks:
                    yield chunk
        finally:
            generation.cancel()  # a no-op once finished; frees the slot if we were cut off

    async def _start(self, request: SpeechRequest, fixed: tuple[Segment, ...] | None,
                     history: tuple[Segment, ...], events: asyncio.Queue) -> Generation:
        """Plan the job and queue it, in a thread: decoding reference audio, Mimi-encoding it
        and tokenising a long text must not hold up other jobs' streams on the event loop."""
        loop = asyncio.get_running_loop()

        def deliver(event: object) -> None:
            if loop.is_closed():
                # No one is left to hear the job: raising from its audio callback ends it at
                # this block and frees its slot; its end event has nothing to end.
                if isinstance(event, AudioBlock):
                    raise RuntimeError("the job's event loop is closed")
                return
            loop.call_soon_threadsafe(events.put_nowait, event)

        started = asyncio.ensure_future(asyncio.to_thread(
            lambda: self.engine.start(self.plan(request, fixed, history), deliver)))
        try:
            return await asyncio.shield(started)
        except asyncio.CancelledError:
            # Cut off while the job was being queued: cancel it once it exists.
            started.add_done_callback(
                lambda f: f.exception() is None and f.result().cancel())
            raise

    def verify(self, request: VerifyRequest) -> dict[str, Any]:
        limits = self.settings.limits
        field, raw = self.caller_audio("", request, limits.max_reference_bytes)
        # SilentCipher's phase-shift search decodes the whole clip 205 times (~23 TFLOP per
        # second of audio) while holding the lock every stream's watermarking needs.
        seconds = audio_seconds(field, raw)
        if seconds > limits.max_verify_seconds:
            raise AudioInputError(
                f"{field}: {seconds:.1f} s of audio; verify_watermark reads at most "
                f"{limits.max_verify_seconds:g} s (CSM_MAX_VERIFY_SECONDS): send an excerpt "
                "(the mark repeats about every second)")
        audio, rate = read_audio(field, raw)
        found = self.watermarking.verify(audio, rate, request.watermark_key)
        return {"task": "verify_watermark", "watermarked": bool(found)}

    async def run(self, payload: Any, allow_stream: bool = True,
                  on_progress: Progress | None = None) -> AsyncIterator[dict[str, Any]]:
        """A native job's outputs (queue or HTTP): one response (or {"error"}), or stream
        chunks ending in a summary. A whole job of several pieces reports each to
        `on_progress` (a stream's chunks are its progress)."""
        async def items() -> AsyncIterator[dict[str, Any]]:
            request = parse_request(payload, self.settings.limits, self.voice_names)
            if isinstance(request, VerifyRequest):
                yield await asyncio.to_thread(self.verify, request)
                return
            if isinstance(request, ListVoicesRequest):
                yield voice_list(self.presets, self.default_voice)
                return
            stream = request.stream and allow_stream
            request = request.model_copy(update={"stream": stream})
            progress = None if stream else on_progress
            async with aclosing(self.speak(request, on_progress=progress)) as chunks:
                async for chunk in chunks:
                    yield (chunk_item(chunk, request.response_format) if stream
                           else await self.whole_answer(chunk, request))

        async with aclosing(self.guarded(items())) as answers:
            async for answer in answers:
                yield answer

    async def guarded(self, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """A job's items, its failure ending them as one {"error"} item: never a raise."""
        try:
            async with aclosing(items):
                async for item in items:
                    yield item
        except CALLER_ERRORS as e:
            yield {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - a job must never take the worker down
            yield self.failure(e)

    async def whole_answer(self, chunk: Chunk, request: SpeechRequest) -> dict[str, Any]:
        """A whole response: its audio as base64, or stored in the bucket and answered with a
        URL (`delivery` "url", or "auto" where base64 would outgrow a queue job's result)."""
        fmt = request.response_format
        if not self.stores(request, len(chunk.data)):
            return whole_response(chunk, fmt)
        started = time.perf_counter()
        stored = await asyncio.to_thread(self.results.put, chunk.data, fmt, MEDIA_TYPES[fmt])
        upload_ms = 1000 * (time.perf_counter() - started)
        log.info("stored a %d-byte result as %s in %.0f ms", len(chunk.data), stored.key,
                 upload_ms)
        return stored_response(chunk, fmt, stored, upload_ms)

    def may_store(self, request: SpeechRequest) -> bool:
        """Whether the request's answer may go to the bucket: a whole one, not kept to base64."""
        return self.results is not None and not request.stream and request.delivery != "base64"

    def stores(self, request: SpeechRequest, audio_bytes: int) -> bool:
        """Whether a whole response of `audio_bytes` goes to the bucket."""
        if not self.may_store(request):
            return False
        as_base64 = 4 * -(-audio_bytes // 3) + WHOLE_OVERHEAD_BYTES
        return request.delivery == "url" or (
            self.settings.mode == "queue" and as_base64 > self.settings.limits.max_result_bytes)

    @staticmethod
    def failure(error: BaseException) -> dict[str, Any]:
        if isinstance(error, ResultStoreError):
            log.error("%s", error)
            return {"error": str(error)}
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

    def voice(self, request: SpeechRequest) -> str:
        """The voice in the prompt: as asked, else none with the caller's own context, else the
        default voice (CSM_DEFAULT_VOICE)."""
        return request.voice or (NO_VOICE if request.context else self.default_voice)

    def context_segments(self, request: SpeechRequest) -> tuple[Segment, ...]:
        """The preset voice (if any) followed by the caller's own turns, Mimi-encoded."""
        voice = self.voice(request)
        segments = [] if voice == NO_VOICE else [self.presets[voice]]
        limits = self.settings.limits
        budget_bytes, seconds = limits.max_reference_bytes, 0.0
        for i, turn in enumerate(request.context):
            field, raw = self.caller_audio(f"context[{i}].", turn, budget_bytes)
            budget_bytes -= len(raw)
            seconds += audio_seconds(field, raw)
            if seconds > limits.max_context_seconds:
                raise AudioInputError(
                    f"{field}: context audio adds up to {seconds:.1f} s; the limit is "
                    f"{limits.max_context_seconds:g} s (CSM_MAX_CONTEXT_SECONDS)")
            codes = self.clip_codes.get(raw, lambda: self.engine.encode(*read_audio(field, raw)))
            segments.append(Segment(speaker=turn.speaker, text=turn.text, codes=codes))
        return tuple(segments)

    def caller_audio(self, where: str, audio: CallerAudio, max_bytes: int) -> tuple[str, bytes]:
        """A caller's audio file: its field's name (after `where`, e.g. "context[0].") and its
        bytes, decoded or fetched."""
        if audio.audio_url is None:
            field = f"{where}audio_base64"
            return field, decode_base64(field, audio.audio_base64, max_bytes)
        field = f"{where}audio_url"
        if self.settings.audio_urls == "off":
            raise AudioInputError(f"{field}: this worker fetches no URLs (CSM_AUDIO_URLS=off); "
                                  "send the clip as audio_base64")
        return field, fetch_audio(field, audio.audio_url, max_bytes,
                                  self.settings.limits.audio_url_timeout_s,
                                  public_only=self.settings.audio_urls == "public")

    def check_room(self, context: tuple[Segment, ...], request: SpeechRequest) -> None:
        """PromptTooLongError now if `context` leaves no room in the model's window for the
        request's first piece."""
        self.engine.conversation(context).check(self.utterances(request)[0])

    def speaker(self, request: SpeechRequest) -> int:
        """Explicit speaker, else the voice's own, else 0."""
        if request.speaker is not None:
            return request.speaker
        voice = self.voice(request)
        return self.presets[voice].speaker if voice != NO_VOICE else 0

    def utterances(self, request: SpeechRequest) -> list[Utterance]:
        """Every piece to speak, in order: long text and long turns split at sentences."""
        turns = ([(self.speaker(request), request.words)] if request.turns is None
                 else [(t.speaker, t.text) for t in request.turns])
        out = []
        for speaker, text in turns:
            # A piece of punctuation alone ("?!" left over after a full piece) has nothing to
            # speak: CSM would make noise of it.
            for piece in filter(has_words, split_text(text, PIECE_CHARS)):
                ms = request.max_audio_length_ms or min(
                    AUTO_MS_BASE + AUTO_MS_PER_CHAR * len(piece),
                    self.settings.limits.max_audio_length_ms)
                out.append(Utterance(speaker, piece, ms))
        return out

    @staticmethod
    def seeded(request: SpeechRequest) -> SpeechRequest:
        """The request with its seed: the caller's, or a random one (reported back)."""
        if request.seed is not None:
            return request
        return request.model_copy(update={"seed": secrets.randbelow(2**32)})

    def plan(self, request: SpeechRequest, fixed: tuple[Segment, ...] | None = None,
             history: tuple[Segment, ...] = ()) -> GenerationRequest:
        first, *rest = utterances = self.utterances(request)
        if request.delivery == "url" and self.results is None:
            raise RequestError("delivery: 'url' needs a bucket, and this worker has none (its "
                               "operator sets CSM_BUCKET_NAME and the BUCKET_* variables); use "
                               "'auto' or 'base64'")
        if self.settings.mode == "queue" and not self.may_store(request):
            self.check_result_size(request, utterances)
        context = self.context_segments(request) if fixed is None else fixed
        seed = self.seeded(request).seed
        return GenerationRequest(
            text=first.text, speaker=first.speaker, then=tuple(rest),
            max_audio_length_ms=first.max_audio_length_ms, context=context, history=history,
            temperature=float(request.temperature), topk=request.topk, seed=seed)

    def check_result_size(self, request: SpeechRequest, utterances: list[Utterance]) -> None:
        """Refuse, before any GPU time is spent, a queue job whose result could outgrow what
        RunPod's API returns (its audio would be lost after it was made)."""
        limit = self.settings.limits.max_result_bytes
        seconds = sum(u.max_audio_length_ms for u in utterances) / 1000
        per_second = (4 / 3 * MAX_BYTES_PER_SECOND[request.response_format]  # base64
                      + ITEM_OVERHEAD_BYTES_PER_SECOND)
        if seconds * per_second > limit:
            raise RequestError(
                f"response_format: {seconds:.0f} s of {request.response_format} audio at most "
                f"(each piece's max_audio_length_ms, added up) could come to "
                f"{seconds * per_second / 1e6:.3g} MB as base64, over the {limit / 1e6:.3g} MB a "
                f"queue job can return (CSM_MAX_RESULT_BYTES); ask for mp3 or opus (5 to 10 "
                "times smaller), a lower max_audio_length_ms, or less text per job, or use the "
                "HTTP mode, which streams without this limit"
                + ("; or ask for the whole file (stream false, delivery 'auto' or 'url'): it "
                   "goes to this worker's bucket" if self.results is not None else
                   "; or have the operator give the worker a bucket (CSM_BUCKET_NAME)"))

    # ---- engine events -> chunks -------------------------------------------------------
    @staticmethod
    async def _blocks(events: asyncio.Queue, timer: Timer, pieces: int,
                      on_progress: Progress | None) -> AsyncIterator[AudioBlock]:
        done = samples = 0
        while (block := Generation.unpack(await events.get())) is not None:
            timer.decoded()
            if on_progress is not None and block.utterance > done:
                done = block.utterance
                try:
                    on_progress({"pieces": pieces, "pieces_done": done,
                                 "audio_ms": round(1000 * samples / SAMPLE_RATE, 3)})
                except Exception:  # noqa: BLE001 - a report that fails must not fail the job
                    log.warning("a progress report failed", exc_info=True)
            samples += block.audio.numel()
            yield block

    async def _whole(self, request: SpeechRequest, generation: Generation,
                     blocks: AsyncIterator[AudioBlock], timer: Timer, marking: Marking,
                     _encoder: StreamEncoder | None) -> AsyncIterator[Chunk]:
        result = self.engine.finish(generation, [block async for block in blocks])

        def mark_and_encode() -> bytes:
            with timer.spending("watermark_ms"):
                audio = self.watermarking.whole(marking, result.audio)
            with timer.spending("encode_ms"):
                return encode_audio(audio, SAMPLE_RATE, request.response_format)

        data = await asyncio.to_thread(mark_and_encode)
        timer.audio_ready()
        samples = result.audio.shape[0]
        yield Chunk(0, 0, samples, data, final=True, codes=result.codes,
                    summary=self.summary(generation, samples, result.frames, marking, timer))

    async def _stream(self, request: SpeechRequest, generation: Generation,
                      blocks: AsyncIterator[AudioBlock], timer: Timer, marking: Marking,
                      encoder: StreamEncoder | None) -> AsyncIterator[Chunk]:
        """Watermarked chunks as the scheduler decodes them (the first with the first block,
        then as each period of the key's message is marked: see csm.watermark.
        WatermarkStream), then the rest."""
        marker = self.watermarking.stream(marking)
        owned = encoder is None
        encoder = encoder or StreamEncoder(request.response_format, SAMPLE_RATE)
        codes: list[Tensor] = []
        index = offset = 0

        def ready(mark: Callable[[], Tensor], last: bool) -> tuple[Tensor, bytes]:
            with timer.spending("watermark_ms"):
                audio = mark()
            with timer.spending("encode_ms"):
                data = encoder.push(audio) if audio.numel() else b""
                if last and owned:
                    data += encoder.close()
            return audio, data

        async for block in blocks:
            codes.append(block.codes)
            audio, data = await asyncio.to_thread(ready, lambda: marker.push(block.audio), False)
            if not audio.numel():
                continue
            timer.audio_ready()
            yield Chunk(index, offset, audio.numel(), data)
            index += 1
            offset += audio.numel()
        audio, data = await asyncio.to_thread(ready, marker.close, True)
        timer.audio_ready()
        samples = offset + audio.numel()
        frames = sum(c.shape[1] for c in codes)
        yield Chunk(index, offset, audio.numel(), data, final=True,
                    codes=torch.cat(codes, dim=1) if codes else None,
                    summary=self.summary(generation, samples, frames, marking, timer))

    def summary(self, generation: Generation, samples: int, frames: int, marking: Marking,
                timer: Timer) -> dict[str, Any]:
        seconds = samples / SAMPLE_RATE
        return {
            "sample_rate": SAMPLE_RATE,
            "duration_ms": round(1000 * seconds, 3),
            "frames": frames,
            "utterances": len(generation.request.utterances),
            "seed": generation.request.seed,
            "stop_reason": generation.stop_reason(),
            **marking.fields(samples > 0),
            "timings": timer.report(seconds, self.engine.load_ms),
        }
