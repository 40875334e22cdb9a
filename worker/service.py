"""The worker's jobs: request -> schema -> engine -> encoded response, and never a crash.

Built once per process (`Worker.start`): the model loads and the preset voices are
Mimi-encoded at start-up, so a job only pays for its own work.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import soundfile as sf
import torch

from csm.codec import SAMPLE_RATE
from csm.engine import Engine, GenerationRequest, GenerationResult, PromptTooLongError
from csm.presets import PRESETS
from csm.prompt import Segment

from .audio_io import (AudioInputError, MEDIA_TYPES, decode_base64, encode_audio,
                       read_audio, to_base64)
from .schema import GenerateRequest, RequestError, VerifyRequest, parse_request
from .settings import Settings

log = logging.getLogger("worker")

# Without a caller limit, stop at about 100 ms per character plus 3 s: enough for slow speech,
# and a bound on the long silent tails CSM sometimes produces instead of its end frame.
AUTO_MS_PER_CHAR = 100
AUTO_MS_BASE = 3000


class Worker:
    def __init__(self, engine: Engine, settings: Settings, presets: dict[str, Segment]):
        self.engine = engine
        self.settings = settings
        self.presets = presets

    @classmethod
    def start(cls, settings: Settings) -> "Worker":
        engine = Engine.load(settings.model_dir, device=settings.device)
        presets = {}
        for name, preset in PRESETS.items():
            audio, rate = sf.read(settings.model_dir / preset.wav, dtype="float32", always_2d=True)
            presets[name] = engine.segment(preset.speaker, preset.transcript,
                                           torch.from_numpy(audio.mean(axis=1)), rate)
        if settings.watermark_key_is_public:
            log.warning("CSM_WATERMARK_KEY is unset: watermarking with CSM's public key, which "
                        "anyone can detect; set a private key for this deployment")
        log.info("worker ready on %s in %.1f s", engine.device, engine.load_ms / 1000)
        return cls(engine, settings, presets)

    def handle(self, payload: Any) -> dict[str, Any]:
        """One job's `input` -> a response dict, or {"error": ...}; the worker stays up."""
        try:
            request = parse_request(payload, self.settings.limits)
            if isinstance(request, VerifyRequest):
                return self.verify(request)
            return self.generate(request)
        except (RequestError, AudioInputError, PromptTooLongError) as e:
            return {"error": str(e)}
        except torch.cuda.OutOfMemoryError:
            log.exception("out of GPU memory")
            return {"error": "the GPU ran out of memory on this job; retry it, or ask for "
                             "shorter audio or context", "refresh_worker": True}
        except RuntimeError as e:
            if "CUDA" in str(e) or "cuda" in str(e):
                log.exception("CUDA failure")
                return {"error": "a GPU fault ended this job; the worker restarts, retry it",
                        "refresh_worker": True}
            log.exception("job failed")
            return {"error": f"internal error ({type(e).__name__}); the job was not completed"}
        except Exception as e:  # noqa: BLE001 - a job must never take the worker down
            log.exception("job failed")
            return {"error": f"internal error ({type(e).__name__}); the job was not completed"}

    def context_segments(self, request: GenerateRequest) -> list[Segment]:
        """The preset voice (if any) followed by the caller's own turns, Mimi-encoded."""
        voice = request.voice or ("none" if request.context else "conversational_a")
        segments = [] if voice == "none" else [self.presets[voice]]
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
        return segments

    def speaker(self, request: GenerateRequest) -> int:
        """Explicit speaker, else the preset voice's own, else 0."""
        if request.speaker is not None:
            return request.speaker
        voice = request.voice or ("none" if request.context else "conversational_a")
        return PRESETS[voice].speaker if voice != "none" else 0

    def max_audio_ms(self, request: GenerateRequest, text: str) -> int:
        if request.max_audio_length_ms is not None:
            return request.max_audio_length_ms
        auto = AUTO_MS_BASE + AUTO_MS_PER_CHAR * len(text)
        return min(auto, self.settings.limits.max_audio_length_ms)

    def generate(self, request: GenerateRequest) -> dict[str, Any]:
        started = time.perf_counter()
        context = tuple(self.context_segments(request))
        text = request.words
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        result = self.engine.generate(GenerationRequest(
            text=text, speaker=self.speaker(request), context=context,
            max_audio_length_ms=self.max_audio_ms(request, text),
            temperature=float(request.temperature), topk=request.topk, seed=seed,
            watermark_key=self.settings.watermark_key))
        return self.response(request, result, started)

    def response(self, request: GenerateRequest, result: GenerationResult,
                 started: float) -> dict[str, Any]:
        encode_start = time.perf_counter()
        data = encode_audio(result.audio, result.sample_rate, request.response_format)
        timings = {k: round(v, 3) for k, v in result.timings_ms.items()}
        timings["encode_ms"] = round(1000 * (time.perf_counter() - encode_start), 3)
        timings["job_ms"] = round(1000 * (time.perf_counter() - started), 3)
        timings["load_ms"] = round(self.engine.load_ms, 3)
        return {
            "audio_base64": to_base64(data),
            "format": request.response_format,
            "media_type": MEDIA_TYPES[request.response_format],
            "sample_rate": result.sample_rate,
            "duration_ms": round(result.duration_ms, 3),
            "frames": result.frames,
            "seed": result.seed,
            "stop_reason": result.stop_reason,
            "watermarked": result.watermarked,
            "timings": timings,
        }

    def verify(self, request: VerifyRequest) -> dict[str, Any]:
        raw = decode_base64("audio_base64", request.audio_base64,
                            self.settings.limits.max_reference_bytes)
        audio, rate = read_audio("audio_base64", raw)
        found = self.engine.watermarker.verify(audio, rate, self.settings.watermark_key)
        return {"task": "verify_watermark", "watermarked": bool(found)}
