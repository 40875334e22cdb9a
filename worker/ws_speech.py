"""Speech over a WebSocket for text that arrives in pieces (an LLM writing its answer).

The client sends JSON messages: an optional first `{"type": "start", ...}` with the request
fields that hold for the whole connection (`voice`, `speaker`, `context`, `temperature`,
`topk`, `seed`, `max_audio_length_ms`, `response_format` (default pcm), `watermark`,
`watermark_key`), then `{"type": "text", "text": "..."}` pieces, `{"type": "flush"}` to speak
what is buffered now, and `{"type": "end"}` to speak the rest and finish.

Each sentence is spoken as soon as the text after it shows that it ended (csm.text_split
decides, so "Dr." or "3.5" never end one; a long sentence is cut at a clause), in the
connection's one voice, with the sentences spoken before it as conversation context (the
oldest dropped first when the window runs short). Text is held to a request's rules as it
arrives (no control characters, at most CSM_MAX_TEXT_CHARS waiting); a sentence with no letter
or digit is skipped. The server answers with JSON:
`ready` once configured, `sentence` (index, text) before its audio, binary messages of audio as
it is made (all of them together form one file of the chosen format), `sentence.done` with
that sentence's summary, `error` (message, param; the connection stays open unless its close
code follows), and `done` before a normal close. When the server stops (worker/shutdown.py), a
session finishes the sentence it is speaking and closes with 1012 (service restart).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosed

from csm.codec import SAMPLE_RATE
from csm.engine import PromptTooLongError
from csm.prompt import Segment
from csm.text_split import sentences, split_text

from .admission import Overloaded
from .audio_io import MEDIA_TYPES
from .openai_api import error_body
from .schema import SpeechRequest, check_characters, has_words, parse_request
from .service import CALLER_ERRORS, PIECE_CHARS, Worker
from .shutdown import ShuttingDown
from .stream_encoder import StreamEncoder

log = logging.getLogger("worker.ws")

SESSION_FIELDS = ("voice", "speaker", "context", "temperature", "topk", "seed",
                  "max_audio_length_ms", "response_format", "watermark", "watermark_key")
# Sentences kept as context for the next one (the window may hold fewer; see Worker.plan).
HISTORY = 8
POLICY_VIOLATION, SERVER_ERROR, SERVICE_RESTART, TRY_AGAIN_LATER = 1008, 1011, 1012, 1013
# Queued when the server starts stopping: wakes a speaker waiting for text to see it.
WAKE = ""


class Stalled(Exception):
    """The client read nothing for CSM_SEND_TIMEOUT_S."""


# The connection is gone (or as good as gone): stop at once, say nothing more.
GONE = (WebSocketDisconnect, ConnectionClosed, OSError, Stalled)


class Closing(Exception):
    """An error that ends the connection with this close code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def error_message(message: str) -> dict[str, Any]:
    """{"type": "error", "message", "param"}: param names the field, as OpenAI's errors do."""
    return {"type": "error", "message": message,
            "param": error_body(message)["error"]["param"]}


class TextBuffer:
    """Text not yet spoken; hands out the pieces that are complete."""

    def __init__(self) -> None:
        self.text = ""

    def add(self, piece: str) -> list[str]:
        self.text = re.sub(r"\s+", " ", self.text + piece)
        parts = sentences(self.text)
        if len(parts) < 2 and len(self.text) <= PIECE_CHARS:
            return []
        done = parts[:-1]
        rest = self.text[self.text.rfind(parts[-1]):] if parts else ""
        if len(rest) > PIECE_CHARS:  # a sentence too long to wait for: cut at a clause
            *cut, last = split_text(rest, PIECE_CHARS)
            done += cut
            rest = rest[rest.rfind(last):]
        self.text = rest
        return [piece for sentence in done for piece in split_text(sentence, PIECE_CHARS)]

    def drain(self) -> list[str]:
        rest, self.text = self.text, ""
        return split_text(rest, PIECE_CHARS) if rest.strip() else []


class Session:
    def __init__(self, websocket: WebSocket, worker: Worker, runtime: Any):
        self.websocket = websocket
        self.worker = worker
        self.runtime = runtime
        self.sending = asyncio.Lock()
        self.buffer = TextBuffer()
        self.template: SpeechRequest | None = None
        self.fixed: tuple[Segment, ...] = ()
        self.history: list[Segment] = []
        self.encoder: StreamEncoder | None = None
        self.queued_chars = 0  # text handed to the speaker, not yet spoken
        self.sentences = self.spoken = self.samples = 0  # begun, spoken, audio samples sent

    async def send(self, message: dict[str, Any] | bytes) -> None:
        """One message; a client that stops reading can't hold its slot for ever."""
        async with self.sending:
            try:
                async with asyncio.timeout(self.worker.settings.http.send_timeout_s):
                    if isinstance(message, bytes):
                        await self.websocket.send_bytes(message)
                    else:
                        await self.websocket.send_text(json.dumps(message))
            except TimeoutError:
                raise Stalled from None

    async def error(self, message: str) -> None:
        await self.send(error_message(message))

    # ---- configuration ---------------------------------------------------------------------
    async def configure(self, fields: dict[str, Any]) -> None:
        unknown = sorted(set(fields) - set(SESSION_FIELDS))
        if unknown:
            raise Closing(f"{unknown[0]}: unknown field in start; the accepted fields are "
                          f"{', '.join(SESSION_FIELDS)}", POLICY_VIOLATION)
        # Checked as a request's fields are (a placeholder text stands in for the sentences).
        payload = {"response_format": "pcm", **fields, "text": "(connection)", "stream": True}
        try:
            template = parse_request(payload, self.worker.settings.limits,
                                     self.worker.voice_names)
            self.worker.watermarking.marking(template.watermark, template.watermark_key)
            # Mimi-encoding the caller's clips is GPU work like a sentence's: it takes a slot.
            release = await self.slot() if template.context else (lambda: None)
            try:
                self.fixed = await asyncio.to_thread(self.fixed_context, template)
            finally:
                release()
        except CALLER_ERRORS as e:
            raise Closing(str(e), POLICY_VIOLATION) from None
        self.template = template.model_copy(update={
            "voice": self.worker.voice(template), "speaker": self.worker.speaker(template),
            "context": []})
        self.encoder = StreamEncoder(template.response_format, SAMPLE_RATE)
        await self.send({"type": "ready", "format": template.response_format,
                         "media_type": MEDIA_TYPES[template.response_format],
                         "sample_rate": SAMPLE_RATE, "voice": self.template.voice,
                         "speaker": self.template.speaker})

    def fixed_context(self, template: SpeechRequest) -> tuple[Segment, ...]:
        """The voice and context every sentence is spoken after, encoded once. Refused now
        (PromptTooLongError) if they leave no room for even a short sentence: every sentence
        would be refused later, one by one."""
        fixed = self.worker.context_segments(template)
        try:
            # The template's text is a placeholder of 12 characters: a short sentence.
            self.worker.check_room(fixed, template)
        except PromptTooLongError as e:
            raise PromptTooLongError(f"context: leaves no room for a sentence: {e}") from None
        return fixed

    # ---- speaking ----------------------------------------------------------------------------
    async def speak_all(self, work: asyncio.Queue) -> None:
        """Speaks queued pieces in order until None; then finishes the file and says done.
        Once the server stops, it speaks no further piece: the file ends where it is."""
        while (text := await work.get()) is not None:
            if self.runtime.shutdown.stopping:
                await self.finish_file()
                raise Closing(f"the worker is shutting down: sentences from index "
                              f"{self.sentences} on were not spoken; reconnect to speak them",
                              SERVICE_RESTART)
            await self.speak(text)
            self.queued_chars -= len(text)
        await self.finish_file()
        await self.send({"type": "done", "sentences": self.spoken,
                         "duration_ms": round(1000 * self.samples / SAMPLE_RATE, 3)})
        await self.websocket.close()

    async def finish_file(self) -> None:
        tail = self.encoder.close() if self.encoder else b""
        if tail:
            await self.send(tail)

    async def slot(self) -> Callable[[], None]:
        """One of the server's job slots (its release), or Closing with 1013 when it is full."""
        try:
            return await self.runtime.admission.acquire()
        except ShuttingDown as e:
            raise Closing(str(e), SERVICE_RESTART) from None
        except Overloaded as e:
            raise Closing(f"the server is at capacity ({e}); reconnect after "
                          f"{e.retry_after_s} s", TRY_AGAIN_LATER) from None

    async def speak(self, text: str) -> None:
        index, self.sentences = self.sentences, self.sentences + 1
        release = await self.slot()
        try:
            request = self.template.model_copy(update={"text": text})
            await self.send({"type": "sentence", "index": index, "text": text})
            chunks = self.runtime.shutdown.until_cut_off(self.worker.speak(
                request, fixed=self.fixed, history=tuple(self.history), encoder=self.encoder))
            async with aclosing(chunks):
                async for chunk in chunks:
                    if chunk.data:
                        await self.send(chunk.data)
                    self.samples += chunk.samples
                    if chunk.final:
                        final = chunk
        except CALLER_ERRORS as e:
            await self.error(f"{e} (sentence {index}, not spoken)")
            return
        except GONE:
            raise
        except ShuttingDown as e:
            raise Closing(str(e), SERVICE_RESTART) from None
        except Exception as e:  # noqa: BLE001 - reported; the worker carries on
            raise Closing(self.runtime.failed(e), SERVER_ERROR) from None
        finally:
            release()
        self.spoken += 1
        if final.codes is not None:
            self.history = [*self.history, Segment(request.speaker, text, final.codes.cpu())]
            self.history = self.history[-HISTORY:]
        await self.send({"type": "sentence.done", "index": index, **final.summary})


async def speak_over_websocket(websocket: WebSocket, runtime: Any) -> None:
    await websocket.accept()
    if runtime.worker is None:
        await websocket.send_text(json.dumps(error_message(
            "the model is still loading; reconnect shortly")))
        await websocket.close(TRY_AGAIN_LATER)
        return
    if runtime.shutdown.stopping:
        await websocket.send_text(json.dumps(error_message(
            "the worker is shutting down; connect again (to another worker)")))
        await websocket.close(SERVICE_RESTART)
        return
    session = Session(websocket, runtime.worker, runtime)
    work: asyncio.Queue = asyncio.Queue()
    reading = asyncio.create_task(read_all(session, work))
    speaking = asyncio.create_task(session.speak_all(work))
    stop = asyncio.create_task(runtime.shutdown.asked.wait())
    stop.add_done_callback(lambda done: done.cancelled() or work.put_nowait(WAKE))
    runtime.sessions += 1
    try:
        # Reading ends at `end` (speaking then finishes the rest), or either fails first.
        await asyncio.wait({reading, speaking}, return_when=asyncio.FIRST_EXCEPTION)
        for task in (reading, speaking):
            if task.done():
                task.result()
        await speaking
    except Closing as e:
        await session.error(str(e))
        await websocket.close(e.code)
    except Stalled:
        log.warning("a WebSocket client read nothing for %g s: its speech was cancelled",
                    runtime.settings.http.send_timeout_s)
    except GONE:
        pass  # the client left: stop speaking at once (below)
    finally:
        for task in (reading, speaking, stop):
            task.cancel()  # cancels the sentence being spoken, freeing its slot
        await asyncio.gather(reading, speaking, stop, return_exceptions=True)
        runtime.sessions -= 1


async def read_all(session: Session, work: asyncio.Queue) -> None:
    """Reads messages until `end`, queueing each piece of text as it becomes speakable."""
    while True:
        message = await receive(session.websocket)
        kind = message.pop("type", None)
        if kind == "start" and session.template is None:
            await session.configure(message)
        elif kind == "start":
            raise Closing("start: only as the first message", POLICY_VIOLATION)
        elif kind in ("text", "flush", "end"):
            if session.template is None:
                await session.configure({})
            await take(session, work, kind, message)
            if kind == "end":
                work.put_nowait(None)
                return
        else:
            await session.error(f"type: must be start, text, flush or end, got {kind!r}")


async def receive(websocket: WebSocket) -> dict[str, Any]:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("text") is None:
        raise Closing("messages must be JSON text (type start, text, flush or end)",
                      POLICY_VIOLATION)
    try:
        parsed = json.loads(message["text"])
    except json.JSONDecodeError as e:
        raise Closing(f"a message is not valid JSON: {e}", POLICY_VIOLATION) from None
    if not isinstance(parsed, dict):
        raise Closing("a message must be a JSON object", POLICY_VIOLATION)
    return parsed


async def take(session: Session, work: asyncio.Queue, kind: str, message: dict[str, Any]) -> None:
    """Queues what a text, flush or end message makes ready to speak."""
    if kind == "text":
        text = message.get("text")
        if not isinstance(text, str):
            await session.error("text: must be a string")
            return
        try:
            check_characters(text)
        except ValueError as e:
            await session.error(f"text: {e} (this text was dropped)")
            return
        waiting = len(session.buffer.text) + session.queued_chars + len(text)
        limit = session.worker.settings.limits.max_text_chars
        if waiting > limit:
            await session.error(f"text: {waiting} characters would wait to be spoken; the "
                                f"limit is {limit} (send less ahead of the speech)")
            return
        pieces = session.buffer.add(text)
    else:
        pieces = session.buffer.drain()
    # A sentence of punctuation alone ("...") has nothing to speak: CSM would make noise.
    for piece in filter(has_words, pieces):
        session.queued_chars += len(piece)
        work.put_nowait(piece)
