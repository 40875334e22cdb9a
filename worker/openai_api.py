"""OpenAI's speech API (`POST /v1/audio/speech`) on top of the service.

The body is OpenAI's (`model`, `input`, `voice`, `response_format`, `speed`, `instructions`,
`stream_format`) plus CSM's own fields as extras (`speaker`, `context`, `temperature`,
`topk`, `seed`, `max_audio_length_ms`, `watermark`, `watermark_key`). What CSM cannot do is
refused by field with what is allowed, never ignored: a `speed` other than 1, `instructions`,
an unknown model, voice or format. The same request reaches a queue worker as a job input
`{"openai_route": "/v1/audio/speech", "openai_input": {...}}` (RunPod's `/openai/v1/...` path).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from .chunk import Chunk
from .responses import to_base64
from .schema import FORMATS, RequestError, SpeechRequest, parse_request

if TYPE_CHECKING:
    from .service import Worker

MODEL_ID = "csm-1b"
MODELS = (MODEL_ID, "sesame/csm-1b")
SPEECH_ROUTE = "/v1/audio/speech"
MODELS_ROUTE = "/v1/models"
STREAM_FORMATS = ("audio", "sse")
EXTRAS = ("speaker", "context", "temperature", "topk", "seed", "max_audio_length_ms",
          "watermark", "watermark_key")
FIELDS = ("model", "input", "voice", "response_format", "speed", "instructions",
          "stream_format", *EXTRAS)
_FIELD = re.compile(r"[A-Za-z_][\w.\[\]]*")


def models_list() -> dict[str, Any]:
    return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0,
                                        "owned_by": "sesame"}]}


def parse_speech(body: Any, worker: "Worker") -> tuple[SpeechRequest, str]:
    """An OpenAI speech body -> (a streamed SpeechRequest with its seed, stream_format)."""
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(f"{unknown[0]}: unknown field; the accepted fields are "
                           f"{', '.join(FIELDS)}")
    model = body.get("model")
    if model not in MODELS:
        raise RequestError(f"model: {model!r} is not served here; use {MODEL_ID!r} "
                           "(GET /v1/models)")
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, int | float) or speed != 1:
        raise RequestError(f"speed: CSM-1B speaks at its own pace; only 1.0 is supported, "
                           f"got {speed!r}")
    if body.get("instructions"):
        raise RequestError("instructions: CSM-1B does not follow style instructions; remove "
                           "the field (a context turn of the voice you want steers it)")
    stream_format = body.get("stream_format", "audio")
    if stream_format not in STREAM_FORMATS:
        raise RequestError(f"stream_format: must be one of {STREAM_FORMATS}, got "
                           f"{stream_format!r}")
    fmt = body.get("response_format", "mp3")  # OpenAI's default
    if fmt not in FORMATS:
        raise RequestError(f"response_format: must be one of {FORMATS}, got {fmt!r}")
    payload = {"input": body.get("input"), "response_format": fmt, "stream": True,
               **{k: body[k] for k in ("voice", *EXTRAS) if k in body}}
    if payload["input"] is None:
        raise RequestError("input: required (the text to speak)")
    request = parse_request(payload, worker.settings.limits, worker.voice_names)
    return worker.seeded(request), stream_format


def error_body(message: str, kind: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape; `param` is the field the message starts with, if any."""
    head = message.split(":", 1)[0]
    param = head if ":" in message and _FIELD.fullmatch(head) else None
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event)}\n\n"


def sse_events(chunk: Chunk, request: SpeechRequest, worker: "Worker") -> list[str]:
    """OpenAI's `speech.audio.delta` for the chunk's audio, and `speech.audio.done` after the
    last (with usage, and CSM's summary: seed, timings, watermark)."""
    events = [sse({"type": "speech.audio.delta", "audio": to_base64(chunk.data)})]
    if chunk.final:
        events.append(sse({"type": "speech.audio.done", "usage": usage(chunk, request, worker),
                           **chunk.summary}))
    return events


def usage(chunk: Chunk, request: SpeechRequest, worker: "Worker") -> dict[str, int]:
    """Text tokens in, audio frames (one model step per 80 ms) out."""
    text_tokens = len(worker.engine.tokenizer.encode_turn(0, request.words)) - 2
    frames = chunk.summary["frames"]
    return {"input_tokens": text_tokens, "output_tokens": frames,
            "total_tokens": text_tokens + frames}


async def openai_job(worker: "Worker", payload: dict[str, Any],
                     allow_stream: bool = True) -> AsyncIterator[dict[str, Any] | str]:
    """A queue job with `openai_route`: `/v1/models`, or `/v1/audio/speech` answered as SSE
    strings (`stream_format: "sse"`) or as one native response (audio as base64: a queue job
    returns JSON, never raw bytes)."""
    async def items() -> AsyncIterator[dict[str, Any] | str]:
        route = payload.get("openai_route")
        if route == MODELS_ROUTE:
            yield models_list()
            return
        if route != SPEECH_ROUTE:
            raise RequestError(f"openai_route: {route!r} is not served; use {SPEECH_ROUTE!r} "
                               f"or {MODELS_ROUTE!r}")
        request, stream_format = parse_speech(payload.get("openai_input"), worker)
        streamed = stream_format == "sse" and allow_stream
        request = request.model_copy(update={"stream": streamed})
        async with aclosing(worker.speak(request)) as chunks:
            async for chunk in chunks:
                if streamed:
                    for event in sse_events(chunk, request, worker):
                        yield event
                else:
                    yield await worker.whole_answer(chunk, request)

    async with aclosing(worker.guarded(items())) as answers:
        async for answer in answers:
            yield answer
