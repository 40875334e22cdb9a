"""SIGTERM in the HTTP mode (worker/shutdown.py), on `python handler.py` as RunPod starts it:
the server drains (/ping says 503, new work is refused, what runs finishes), cuts off what
outlasts CSM_SHUTDOWN_GRACE_S with a clear error, and exits with 0; a second signal stops it
at once. The tiny RANDOM-weight model: its audio is noise.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from http_helpers import pcm
from worker_helpers import free_port, handler_cmd, handler_env

# About 1,400 characters, seven pieces of up to 8 s each: far longer than any test waits.
LONG_TEXT = " ".join(f"This is sentence number {i} of a long answer." for i in range(30))
SERVICE_RESTART = 1012


class Handler:
    """`CSM_MODE=http python handler.py` with /ping on its own port, ready to serve."""

    def __init__(self, model_dir, grace_s: float):
        self.port, self.health = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = handler_env(model_dir, CSM_MODE="http", PORT=str(self.port),
                          PORT_HEALTH=str(self.health), CSM_HOST="127.0.0.1",
                          CSM_MAX_AUDIO_LENGTH_MS="8000", CSM_SHUTDOWN_GRACE_S=str(grace_s))
        self.proc = subprocess.Popen(handler_cmd(), env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.log = ""

    def __enter__(self) -> "Handler":
        deadline = time.monotonic() + 120
        while self.ping(self.health) != 200:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.finish()
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()

    def ping(self, port: int) -> int | None:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code
        except httpx.TransportError:
            return None

    def term(self) -> float:
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()

    def wait(self, seconds: float) -> int:
        self.proc.wait(seconds)
        self.finish()
        return self.proc.returncode

    def finish(self) -> str:
        if not self.log and self.proc.poll() is not None:
            self.log = self.proc.stdout.read()
        return self.log


def speech(**fields: Any) -> dict[str, Any]:
    return {"model": "csm-1b", "input": LONG_TEXT, "voice": "conversational_a",
            "response_format": "pcm", "max_audio_length_ms": 8000, "seed": 7, **fields}


# ---- the clients: each reads to the end, setting `started` at its first audio ------------------
def read_sse(h: Handler, body: dict, started: threading.Event) -> list[dict]:
    """The events, each with the time it came as `_at`."""
    events = []
    with httpx.stream("POST", f"{h.url}/v1/audio/speech", json={**body, "stream_format": "sse"},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append({**json.loads(line[6:]), "_at": time.monotonic()})
                started.set()
    return events


def read_ndjson(h: Handler, body: dict, started: threading.Event) -> list[dict]:
    lines = []
    with httpx.stream("POST", f"{h.url}/v1/generate", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line:
                lines.append(json.loads(line))
                started.set()
    return lines


def read_whole(h: Handler, body: dict, started: threading.Event) -> httpx.Response:
    """A native job answered in one piece: nothing to see until it ends (`started` at once)."""
    started.set()
    return httpx.post(f"{h.url}/v1/generate", json=body, timeout=120)


def read_raw(h: Handler, body: dict, started: threading.Event) -> tuple[bytes, Exception | None]:
    audio = b""
    try:
        with httpx.stream("POST", f"{h.url}/v1/audio/speech", json=body, timeout=120) as r:
            assert r.status_code == 200, r.read()
            for data in r.iter_bytes():
                audio += data
                started.set()
    except httpx.TransportError as e:
        return audio, e
    return audio, None


def read_ws(h: Handler, start: dict, text: str,
            started: threading.Event) -> tuple[list[dict], bytes, int | None]:
    """Sends `text` and a flush, never `end`: the session stays open until the server closes
    it. Returns the JSON messages, the audio and the close code."""
    messages, audio = [], b""
    with ws_connect(f"ws://127.0.0.1:{h.port}/v1/audio/speech/stream") as ws:
        ws.send(json.dumps({"type": "start", **start}))
        ws.send(json.dumps({"type": "text", "text": text}))
        ws.send(json.dumps({"type": "flush"}))
        try:
            while True:
                message = ws.recv(120)
                if isinstance(message, bytes):
                    audio += message
                    started.set()
                else:
                    messages.append(json.loads(message))
        except ConnectionClosed as e:
            return messages, audio, e.rcvd.code if e.rcvd else None


def read_idle_ws(h: Handler, ready: threading.Event) -> tuple[list[dict], int | None]:
    """A session that is set up and then sends nothing: the messages and the close code."""
    with ws_connect(f"ws://127.0.0.1:{h.port}/v1/audio/speech/stream") as ws:
        ws.send(json.dumps({"type": "start"}))
        messages = [json.loads(ws.recv(60))]
        ready.set()
        try:
            while True:
                messages.append(json.loads(ws.recv(120)))
        except ConnectionClosed as e:
            return messages, e.rcvd.code if e.rcvd else None


def all_started(started: list[threading.Event], readers: list[Future]) -> None:
    """Every reader has its first audio (a reader that failed first raises here)."""
    deadline = time.monotonic() + 60
    while not all(s.is_set() for s in started):
        for reader in readers:
            if reader.done():
                reader.result()
        assert time.monotonic() < deadline, "no audio within 60 s"
        time.sleep(0.05)


def wait_for(check: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def refused_while_stopping(h: Handler) -> None:
    """/ping on both ports says 503 "stopping"; a new request gets 503 and a new WebSocket
    close 1012, each saying why."""
    for port in (h.health, h.port):
        r = httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "stopping"
    r = httpx.post(f"{h.url}/v1/audio/speech", json=speech(input="Hi."), timeout=10)
    assert r.status_code == 503 and r.headers["Retry-After"] == "2"
    assert "shutting down" in r.json()["error"]["message"]
    with ws_connect(f"ws://127.0.0.1:{h.port}/v1/audio/speech/stream") as ws:
        assert "shutting down" in json.loads(ws.recv(10))["message"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
    assert closed.value.rcvd.code == SERVICE_RESTART


# ---- the tests ----------------------------------------------------------------------------------
def test_sigterm_lets_running_jobs_finish_then_exits_0(tiny_model_dir):
    """A stream and two WebSocket sessions are open when SIGTERM comes: the stream runs to its
    end; the speaking session finishes its sentence, then closes with 1012 naming the first one
    not spoken; the idle one closes with 1012 at once."""
    with ThreadPoolExecutor(3) as pool, Handler(tiny_model_dir, grace_s=60) as h:
        started = [threading.Event(), threading.Event(), threading.Event()]
        # Two pieces of up to 4 s: seconds of work left when the signal comes.
        sse = pool.submit(read_sse, h, speech(input=LONG_TEXT[:300], max_audio_length_ms=4000),
                          started[0])
        ws = pool.submit(read_ws, h, {"max_audio_length_ms": 1600, "seed": 3},
                         "One sentence here. Another one here. And a third one.", started[1])
        idle = pool.submit(read_idle_ws, h, started[2])
        all_started(started, [sse, ws, idle])
        signalled = h.term()
        wait_for(lambda: h.ping(h.health) == 503)
        refused_while_stopping(h)

        events = sse.result(60)
        done = events[-1]
        assert done["type"] == "speech.audio.done" and done["utterances"] == 2
        assert done["_at"] > signalled
        audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
        assert len(pcm(audio)) == round(done["duration_ms"] * 24)

        messages, ws_audio, code = ws.result(60)
        begun = [m["index"] for m in messages if m["type"] == "sentence"]
        finished = [m for m in messages if m["type"] == "sentence.done"]
        assert 1 <= len(begun) < 3 and [m["index"] for m in finished] == begun
        assert len(pcm(ws_audio)) == round(sum(m["duration_ms"] for m in finished) * 24)
        assert messages[-1]["type"] == "error" and code == SERVICE_RESTART
        assert f"sentences from index {len(begun)} on were not spoken" in messages[-1]["message"]
        messages, code = idle.result(60)
        assert [m["type"] for m in messages] == ["ready", "error"] and code == SERVICE_RESTART
        assert "sentences from index 0 on were not spoken" in messages[-1]["message"]

        assert h.wait(30) == 0, h.log[-4000:]
    assert time.monotonic() - signalled < 30
    assert "stopping: no new jobs" in h.log and "cutting off" not in h.log


def test_jobs_that_outlast_the_grace_period_are_cut_off_with_an_error(tiny_model_dir):
    """Five long jobs, a 1 s grace: SSE ends with an `error` event, NDJSON with an error line,
    the WebSocket with close 1012, a whole answer is a 503, raw audio breaks off; the process
    exits 0 within seconds."""
    with ThreadPoolExecutor(5) as pool, Handler(tiny_model_dir, grace_s=1) as h:
        started = [threading.Event() for _ in range(5)]
        sse = pool.submit(read_sse, h, speech(), started[0])
        native = {"text": LONG_TEXT, "voice": "conversational_a", "response_format": "pcm",
                  "max_audio_length_ms": 8000, "seed": 8, "stream": True}
        ndjson = pool.submit(read_ndjson, h, native, started[1])
        raw = pool.submit(read_raw, h, speech(), started[2])
        ws = pool.submit(read_ws, h, {"max_audio_length_ms": 8000}, LONG_TEXT[:200],
                         started[3])
        whole = pool.submit(read_whole, h, {**native, "stream": False}, started[4])
        all_started(started, [sse, ndjson, raw, ws, whole])
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{h.health}/ping").json()["running"] == 5)
        signalled = h.term()

        cut_off = "cut off after the 1 s it is given to finish (CSM_SHUTDOWN_GRACE_S)"
        events = sse.result(30)
        assert events[-1]["type"] == "error" and cut_off in events[-1]["error"]["message"]
        assert all(e["type"] == "speech.audio.delta" for e in events[:-1])
        lines = ndjson.result(30)
        assert cut_off in lines[-1]["error"] and all("audio_base64" in x for x in lines[:-1])
        audio, error = raw.result(30)
        assert isinstance(error, httpx.RemoteProtocolError) and audio
        messages, _, code = ws.result(30)
        assert code == SERVICE_RESTART and cut_off in messages[-1]["message"]
        answer = whole.result(30)
        assert answer.status_code == 503 and cut_off in answer.json()["error"]

        assert h.wait(30) == 0, h.log[-4000:]
    # 1 s of grace, then at most 2 s for the cut-off jobs to end and 3 s for uvicorn.
    assert time.monotonic() - signalled < 8
    assert "cutting off 5 jobs, 1 WebSocket sessions still running after 1 s" in h.log


def test_a_second_sigterm_stops_at_once(tiny_model_dir):
    with ThreadPoolExecutor(1) as pool, Handler(tiny_model_dir, grace_s=60) as h:
        started = threading.Event()
        raw = pool.submit(read_raw, h, speech(), started)
        all_started([started], [raw])
        h.term()
        wait_for(lambda: h.ping(h.health) == 503)
        signalled = h.term()
        assert h.wait(30) == -signal.SIGTERM, h.log[-4000:]
        assert time.monotonic() - signalled < 6  # uvicorn's own 3 s, then it cancels the job
        assert isinstance(raw.result(30)[1], httpx.RemoteProtocolError)
