"""The HTTP mode (CSM_MODE=http): FastAPI on uvicorn in front of the same Worker, one process.

Routes (README, "HTTP mode"):
- GET  /ping                    RunPod's health check: 204 while the model loads, 200 when ready
- GET  /v1/models, /v1/voices   what can be asked for
- POST /v1/generate             the native JSON API: the queue job's `input`, the same response
                                (NDJSON chunk items with `stream: true`)
- POST /v1/audio/speech         OpenAI's speech API: audio bytes as they are made, or SSE
- WS   /v1/audio/speech/stream  text in pieces, speech back as each sentence completes

Every response that makes audio holds one of the admission gate's slots while it runs; the
first chunk (or the request's error) is awaited before the status line goes out, so caller
mistakes are 400s, not broken streams, and the first-audio time can be sent as a header. A
client that disconnects, or stops reading for CSM_SEND_TIMEOUT_S, cancels its job at once.
SIGTERM drains the server before it stops (worker/shutdown.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .admission import Admission, Overloaded
from .audio_io import MEDIA_TYPES
from .chunk import Chunk
from .openai_api import error_body, models_list, parse_speech, sse, sse_events
from .responses import chunk_item
from .result_store import ResultStoreError
from .schema import ListVoicesRequest, RequestError, VerifyRequest, parse_request
from .service import CALLER_ERRORS, Worker
from .settings import Settings, StartupError
from .shutdown import UVICORN_CLOSE_S, DrainingServer, Shutdown, ShuttingDown, next_unless
from .startup import report_startup_error
from .voices import voice_list
from .ws_speech import speak_over_websocket

log = logging.getLogger("worker.http")

LOADING_RETRY_AFTER_S = 10


class Runtime:
    """What the routes share: the worker (None while it loads), the admission gate and the
    stopping state."""

    def __init__(self, settings: Settings, worker: Worker | None = None):
        self.settings = settings
        self.worker = worker
        self.broken: str | None = None  # a GPU fault: /ping reports unhealthy from then on
        http = settings.http
        self.admission = Admission(settings.max_concurrency, http.max_queued,
                                   http.queue_timeout_s)
        self.shutdown = Shutdown(http.shutdown_grace_s)
        self.sessions = 0  # WebSocket connections open (speaking or waiting for text)

    def busy(self) -> dict[str, int]:
        """What a drain waits for: slots held (a job, or a WebSocket session's sentence) and
        WebSocket sessions open."""
        return {"jobs": self.admission.running, "WebSocket sessions": self.sessions}

    async def drain(self) -> None:
        self.admission.close("the worker is shutting down; retry on another worker")
        await self.shutdown.drain(self.busy)

    def failed(self, error: Exception) -> str:
        """What to tell the caller of a fault inside the worker; after one that needs a fresh
        worker (a GPU fault), /ping reports unhealthy from then on, so RunPod replaces it."""
        if isinstance(error, ShuttingDown):
            return str(error)  # the drain's cut-off, logged once by the drain
        answer = Worker.failure(error)
        if answer.get("refresh_worker"):
            self.broken = answer["error"]
        return answer["error"]


class Refusal(Exception):
    """An HTTP answer decided before any audio left: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.headers, self.kind = status, headers or {}, kind


class ClientGone(Exception):
    """The client disconnected before the first audio was ready."""


# ---- plumbing shared by the routes ----------------------------------------------------------
def ready(runtime: Runtime) -> Worker:
    if runtime.worker is None:
        raise Refusal(503, "the model is still loading; retry shortly",
                      {"Retry-After": str(LOADING_RETRY_AFTER_S)}, "server_error")
    return runtime.worker


async def read_json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refusal(400, f"the body is not valid JSON: {e}") from None


async def admit(runtime: Runtime) -> Callable[[], None]:
    try:
        return await runtime.admission.acquire()
    except ShuttingDown as e:
        raise stopping_refusal(e) from None
    except Overloaded as e:
        raise Refusal(503, f"the server is at capacity ({e}); retry after "
                      f"{e.retry_after_s} s", {"Retry-After": str(e.retry_after_s)},
                      "server_error") from None


def stopping_refusal(error: ShuttingDown) -> Refusal:
    return Refusal(503, str(error), {"Retry-After": str(Overloaded.retry_after_s)},
                   "server_error")


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def first_item(items: AsyncIterator[Any], request: Request, runtime: Runtime) -> Any:
    """The first item of a job, raced against the client leaving; errors become Refusals."""
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        nxt = await next_unless(items, gone)  # the client left (or the server stops)
    finally:
        gone.cancel()
    if nxt.cancelled():
        raise ClientGone
    try:
        return nxt.result()
    except CALLER_ERRORS as e:
        raise Refusal(400, str(e)) from None
    except ShuttingDown as e:
        raise stopping_refusal(e) from None
    except Exception as e:  # noqa: BLE001 - answered, logged, and the worker carries on
        raise server_fault(runtime, e) from None


def server_fault(runtime: Runtime, error: Exception) -> Refusal:
    return Refusal(500, runtime.failed(error), kind="server_error")


class GuardedStream(StreamingResponse):
    """A streamed body that cancels its job when the client leaves or stops reading.

    Starlette cancels the body when the client disconnects; this also bounds each send by
    CSM_SEND_TIMEOUT_S (a reader that stalls can't hold a slot, or grow what waits for it,
    for ever: uvicorn only buffers up to its flow-control mark) and closes the body iterator
    however the response ends, so the job's slot is freed at once.
    """

    def __init__(self, content: AsyncIterator[bytes | str], send_timeout_s: float,
                 **kwargs: Any):
        super().__init__(content, **kwargs)
        self.send_timeout_s = send_timeout_s

    async def stream_response(self, send: Send) -> None:
        async def timed_send(message: Message) -> None:
            with anyio.fail_after(self.send_timeout_s):
                await send(message)

        try:
            await super().stream_response(timed_send)
        except TimeoutError:
            log.warning("a client read nothing for %g s: its job was cancelled",
                        self.send_timeout_s)
        except ShuttingDown:
            pass  # raw audio cut off by the drain: the transfer breaks off (the drain logs it)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def body_of(first: Any, items: AsyncIterator[Any], release: Callable[[], None],
                  encode: Callable[[Any], list[bytes | str]],
                  on_error: Callable[[Exception], list[bytes | str]]) -> AsyncIterator[Any]:
    """The response body: the first item, then the rest, each through `encode`; a failure
    after the status line went out is reported by `on_error` (or re-raised to abort)."""
    try:
        for part in encode(first):
            yield part
        async for item in items:
            for part in encode(item):
                yield part
    except Exception as e:  # noqa: BLE001 - the status is sent; say it in the body
        parts = on_error(e)
        if not parts:
            raise
        for part in parts:
            yield part
    finally:
        release()
        with anyio.CancelScope(shield=True):
            await items.aclose()


async def streamed(runtime: Runtime, request: Request, items: AsyncIterator[Any],
                   release: Callable[[], None],
                   respond: Callable[[Any], Awaitable[Response]]) -> Response:
    """Wait for the first item (or refuse), then let `respond` build the response; the slot
    and the job are released when a streamed body ends, or here otherwise."""
    streaming = False
    try:
        first = await first_item(items, request, runtime)
        response = await respond(first)
        streaming = isinstance(response, GuardedStream)
        return response
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; nothing is sent
    finally:
        if not streaming:
            release()
            with anyio.CancelScope(shield=True):
                await items.aclose()


def refusal_response(error: Refusal, openai: bool) -> JSONResponse:
    body = error_body(str(error), error.kind) if openai else {"error": str(error)}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


class BodyLimit:
    """Refuses request bodies over CSM_MAX_BODY_BYTES (413), announced or streamed."""

    class TooLarge(Exception):
        pass

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        announced = dict(scope["headers"]).get(b"content-length", b"0")
        if announced.isdigit() and int(announced) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyLimit.TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except BodyLimit.TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = (f"the request body is over {self.max_bytes} bytes (CSM_MAX_BODY_BYTES); send "
                   "less reference audio")
        error = Refusal(413, message)
        await refusal_response(error, scope["path"].startswith("/v1/audio"))(scope, receive, send)


# ---- the apps ----------------------------------------------------------------------------------
def health_app(runtime: Runtime) -> FastAPI:
    """Only /ping: what RunPod polls on PORT_HEALTH when it differs from PORT."""
    app = FastAPI(openapi_url=None)
    app.add_api_route("/ping", ping_route(runtime), methods=["GET"])
    return app


def ping_route(runtime: Runtime) -> Callable[[], Awaitable[Response]]:
    async def route() -> Response:
        return ping(runtime)

    return route


def ping(runtime: Runtime) -> Response:
    if runtime.broken:
        return JSONResponse({"status": "unhealthy", "error": runtime.broken}, status_code=503)
    if runtime.shutdown.stopping:
        return JSONResponse({"status": "stopping", "running": runtime.admission.running},
                            status_code=503)
    if runtime.worker is None:
        return Response(status_code=204)  # RunPod: initializing
    return JSONResponse({"status": "healthy", "running": runtime.admission.running,
                         "waiting": runtime.admission.waiting})


def create_app(runtime: Runtime) -> FastAPI:
    settings = runtime.settings
    app = FastAPI(title="CSM-1B text to speech", summary="Sesame CSM-1B on RunPod")
    app.add_middleware(BodyLimit, max_bytes=settings.http.max_body_bytes)

    @app.exception_handler(Refusal)
    async def refused(request: Request, error: Refusal) -> JSONResponse:
        return refusal_response(error, request.url.path.startswith("/v1/audio"))

    app.add_api_route("/ping", ping_route(runtime), methods=["GET"])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return models_list()

    @app.get("/v1/voices")
    async def voices() -> dict[str, Any]:
        worker = ready(runtime)
        listed = [{"id": name, "speaker": worker.presets[name].speaker}
                  for name in sorted(worker.presets)]
        return {"object": "list", "data": [*listed, {"id": "none", "speaker": None}]}

    @app.post("/v1/generate")
    async def generate(request: Request) -> Response:
        worker = ready(runtime)
        try:
            parsed = parse_request(await read_json(request), settings.limits,
                                   worker.voice_names)
        except RequestError as e:
            raise Refusal(400, str(e)) from None
        if isinstance(parsed, ListVoicesRequest):
            return JSONResponse(voice_list(worker.presets, worker.default_voice))
        if isinstance(parsed, VerifyRequest):
            release = await admit(runtime)
            try:
                return JSONResponse(await asyncio.to_thread(worker.verify, parsed))
            except CALLER_ERRORS as e:
                raise Refusal(400, str(e)) from None
            finally:
                release()
        release = await admit(runtime)
        fmt = parsed.response_format
        items = runtime.shutdown.until_cut_off(worker.speak(parsed))

        async def respond(first: Chunk) -> Response:
            if not parsed.stream:
                try:
                    return JSONResponse(await worker.whole_answer(first, parsed))
                except ResultStoreError as e:
                    raise server_fault(runtime, e) from None

            def line(chunk: Chunk) -> list[str]:
                return [json.dumps(chunk_item(chunk, fmt)) + "\n"]

            def failed(error: Exception) -> list[str]:
                return [json.dumps({"error": str(server_fault(runtime, error))}) + "\n"]

            return GuardedStream(body_of(first, items, release, line, failed),
                                 settings.http.send_timeout_s,
                                 media_type="application/x-ndjson")

        return await streamed(runtime, request, items, release, respond)

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        worker = ready(runtime)
        try:
            parsed, stream_format = parse_speech(await read_json(request), worker)
            marking = worker.watermarking.marking(parsed.watermark, parsed.watermark_key)
        except RequestError as e:
            raise Refusal(400, str(e)) from None
        release = await admit(runtime)
        received = asyncio.get_running_loop().time()
        items = runtime.shutdown.until_cut_off(worker.speak(parsed))

        async def respond(first: Chunk) -> Response:
            first_ms = 1000 * (asyncio.get_running_loop().time() - received)
            headers = {"X-CSM-Seed": str(parsed.seed),
                       "X-CSM-Watermark": marking.source or "none",
                       "X-CSM-Sample-Rate": "24000",
                       "X-CSM-First-Audio-Ms": f"{first_ms:.1f}"}
            if stream_format == "sse":
                def events(chunk: Chunk) -> list[str]:
                    return sse_events(chunk, parsed, worker)

                def failed(error: Exception) -> list[str]:
                    body = error_body(str(server_fault(runtime, error)), "server_error")
                    return [sse({"type": "error", **body})]

                return GuardedStream(body_of(first, items, release, events, failed),
                                     settings.http.send_timeout_s, headers=headers,
                                     media_type="text/event-stream")

            def audio(chunk: Chunk) -> list[bytes]:
                return [chunk.data] if chunk.data else []

            def broken_off(error: Exception) -> list[bytes]:
                runtime.failed(error)  # /ping must hear of a GPU fault all the same
                return []  # raw audio has no way to say it: the transfer breaks off instead

            return GuardedStream(body_of(first, items, release, audio, broken_off),
                                 settings.http.send_timeout_s, headers=headers,
                                 media_type=MEDIA_TYPES[parsed.response_format])

        return await streamed(runtime, request, items, release, respond)

    @app.websocket("/v1/audio/speech/stream")
    async def speech_stream(websocket: WebSocket) -> None:
        await speak_over_websocket(websocket, runtime)

    return app


# ---- the server --------------------------------------------------------------------------------
def serve(settings: Settings) -> int:
    """Serve until stopped; the model loads after the port is open (/ping says 204 till then).
    Returns the process exit status: 1 when the model could not be loaded."""
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    runtime = Runtime(settings)
    http = settings.http
    apps = [health_app(runtime)] if http.health_port != http.port else []
    servers = [server(uvicorn.Config(app, host=http.host, port=port,
                                     ws_max_size=http.max_body_bytes,
                                     timeout_graceful_shutdown=UVICORN_CLOSE_S,
                                     log_level=settings.log_level.lower()))
               for server, app, port in [*((uvicorn.Server, a, http.health_port) for a in apps),
                                         (DrainingServer, create_app(runtime), http.port)]]
    # The main server starts last, so the signal handlers it installs are the ones that stop it.
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    try:
        runtime.worker = await asyncio.to_thread(Worker.start, settings)
    except StartupError as e:
        report_startup_error(e)
        code = 1
    except Exception:
        log.exception("the model could not be loaded; stopping")
        code = 1
    else:
        code = 0
        servers[-1].drain_on_signal(runtime.drain)
        await tasks[-1]  # until the main server stops
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    if runtime.worker is not None:
        # The frame loop stops before the process exits: a step still running in its thread
        # while the interpreter shuts down aborts the process ("terminate called without an
        # active exception", exit -6) instead of the 0 a clean stop gives.
        await asyncio.to_thread(runtime.worker.engine.close)
    return code
