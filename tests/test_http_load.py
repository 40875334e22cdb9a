"""The HTTP mode under mixed concurrent load, as a deployment meets it: whole and streamed
OpenAI requests in several formats, SSE, the native API's NDJSON, WebSocket sessions, clients
that leave mid-stream and bad requests, all at once from many clients, through a real uvicorn
server on the tiny RANDOM-weight model (its audio is noise).

Afterwards every request must have been answered as it would have been alone (a job rerun
alone gives the same audio), nothing may still hold a slot or a frame-loop row, and the server
must go on serving.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from websockets.sync.client import connect as ws_connect

from http_helpers import Server, pcm, wait_idle, ws_messages
from worker.http_app import Runtime, create_app
from worker.service import Worker
from worker.settings import load_settings
from worker_helpers import (PRIMING_SAMPLES, SAME_AUDIO, audio_b64,
                            decode_with_ffmpeg, stream_wav_frames)

# Four jobs in the frame loop at once and room for every client to wait: nothing is refused
# for capacity, so every request has an answer to check.
ENV = {"CSM_DEVICE": "cpu", "CSM_MAX_AUDIO_LENGTH_MS": "8000", "CSM_MAX_CONCURRENCY": "4",
       "CSM_MAX_QUEUED": "64", "CSM_QUEUE_TIMEOUT_S": "120", "CSM_SEND_TIMEOUT_S": "10",
       "CSM_ALLOW_WATERMARK_OVERRIDE": "1"}
CLIENTS = 12
REQUESTS = 72
KINDS = ("openai_pcm", "openai_file", "raw_stream", "sse", "ndjson", "leaves", "websocket",
         "clone", "invalid")
# Lengths that differ, so jobs leave the frame loop at different steps and rows move between
# batch buckets all the time.
LENGTHS_MS = (240, 400, 640, 160)
# A caller's reference clip: Mimi encodes it on the request's thread, beside the frame loop.
CLIP = [{"text": "A reference.", "speaker": 0, "audio_base64": audio_b64(1.0, 24_000)}]
FILE_FORMATS = ("wav", "mp3", "flac", "opus", "aac")
# About 4,500 characters at 8 s a piece: minutes of frame loop for the clients that leave, so
# a job that ran on after its client left would still be running when the rest are answered.
LONG_TEXT = " ".join(f"This is sentence number {i} of a long answer." for i in range(100))
INVALID = [({"speed": 2.0}, "speed"), ({"voice": "alloy"}, "voice"),
           ({"max_audio_length_ms": 8080}, "max_audio_length_ms")]


@pytest.fixture(scope="module")
def runtime(tiny_model_dir) -> Runtime:
    settings = load_settings(dict(ENV, CSM_MODEL_DIR=str(tiny_model_dir)))
    return Runtime(settings, Worker.start(settings))


@pytest.fixture(scope="module")
def server(runtime) -> Iterator[Server]:
    with Server(create_app(runtime), 1_000_000) as server:
        yield server


def length_ms(i: int) -> int:
    return LENGTHS_MS[i % len(LENGTHS_MS)]


def job(i: int, **fields: Any) -> dict[str, Any]:
    """Request i: its own text, seed and length, unmarked unless asked, so that its audio is
    the codes' alone and a rerun can be compared sample by sample."""
    body = {"model": "csm-1b", "input": f"Request number {i}.", "voice": "conversational_a",
            "response_format": "pcm", "max_audio_length_ms": length_ms(i), "seed": 1000 + i,
            "watermark": False}
    if KINDS[i % len(KINDS)] == "clone":
        body.update(voice="none", context=CLIP)
    body.update(fields)
    return body


def native(body: dict[str, Any]) -> dict[str, Any]:
    """The same request in the native API's fields."""
    fields = {k: v for k, v in body.items() if k not in ("model", "input")}
    return dict(fields, text=body["input"])


def send(server: Server, i: int) -> tuple[str, Any]:
    """Request i, of kind KINDS[i % 9]; what it got back, in a form to check."""
    kind = KINDS[i % len(KINDS)]
    url = server.url
    if kind == "openai_pcm":  # the OpenAI client, whole, watermarked as by default
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
        body = job(i, watermark=True)
        response = client.audio.speech.create(
            model=body["model"], voice=body["voice"], input=body["input"],
            response_format="pcm", extra_body={k: body[k] for k in
                                               ("max_audio_length_ms", "seed", "watermark")})
        return kind, response.content
    if kind == "openai_file":
        fmt = FILE_FORMATS[i // len(KINDS) % len(FILE_FORMATS)]
        r = httpx.post(f"{url}/v1/audio/speech", json=job(i, response_format=fmt), timeout=120)
        return kind, (r.status_code, fmt, r.content)
    if kind == "raw_stream":
        with httpx.stream("POST", f"{url}/v1/audio/speech", json=job(i), timeout=120) as r:
            return kind, (r.status_code, b"".join(r.iter_bytes()))
    if kind == "sse":
        with httpx.stream("POST", f"{url}/v1/audio/speech", timeout=120,
                          json=job(i, stream_format="sse")) as r:
            events = [json.loads(line[len("data: "):]) for line in r.iter_lines()
                      if line.startswith("data: ")]
        return kind, events
    if kind == "ndjson":
        with httpx.stream("POST", f"{url}/v1/generate", timeout=120,
                          json=native(job(i, stream=True))) as r:
            return kind, [json.loads(line) for line in r.iter_lines() if line]
    if kind == "leaves":  # reads its first audio of a long answer, then hangs up
        with httpx.stream("POST", f"{url}/v1/audio/speech", timeout=120,
                          json=job(i, input=LONG_TEXT, max_audio_length_ms=8000)) as r:
            return kind, (r.status_code, len(next(r.iter_bytes())))
    if kind == "websocket":
        with ws_connect(f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream",
                        open_timeout=120) as ws:
            ws.send(json.dumps({"type": "start", "voice": "conversational_b", "seed": 1000 + i,
                                "max_audio_length_ms": 160, "response_format": "wav",
                                "watermark": False}))
            ws_messages(ws, "ready")
            ws.send(json.dumps({"type": "text", "text": f"First of {i}. Second of {i}."}))
            ws.send(json.dumps({"type": "end"}))
            return kind, ws_messages(ws, "done")
    if kind == "clone":
        r = httpx.post(f"{url}/v1/audio/speech", json=job(i), timeout=120)
        return kind, (r.status_code, r.content)
    fields, field = INVALID[i // len(KINDS) % len(INVALID)]
    r = httpx.post(f"{url}/v1/audio/speech", json=job(i, **fields), timeout=120)
    return kind, (r.status_code, field, r.json())


def alone(server: Server, i: int) -> np.ndarray:
    """Request i's 16-bit samples, asked for again with nothing beside it."""
    kind = KINDS[i % len(KINDS)]
    fields = {"watermark": True} if kind == "openai_pcm" else {}
    r = httpx.post(f"{server.url}/v1/audio/speech", json=job(i, **fields), timeout=120)
    assert r.status_code == 200, r.text
    return pcm(r.content)


def assert_same(loaded: np.ndarray, solo: np.ndarray, what: str) -> None:
    assert loaded.shape == solo.shape, what
    steps = np.abs(loaded.astype(np.int32) - solo.astype(np.int32)).max()
    assert steps <= SAME_AUDIO * 32767, (what, steps)


def test_mixed_http_load_is_answered_as_if_alone(server, runtime):
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda i: send(server, i), range(REQUESTS)))
    elapsed = time.monotonic() - started
    wait_idle(runtime, 5)  # the clients that left freed their slots and rows

    compare = {}  # request -> its audio under load, to hold against a rerun alone
    for i, (kind, got) in enumerate(results):
        what = f"request {i} ({kind})"
        if kind == "openai_pcm":
            compare[i] = pcm(got)
        elif kind == "openai_file":
            status, fmt, raw = got
            assert status == 200, (what, raw[:200])
            # streamed, so FFmpeg reads them (libsndfile can't read a FLAC without a length);
            # Opus is 48 kHz; MP3 and AAC add priming the decoder can't trim (worker_helpers)
            audio, rate = decode_with_ffmpeg(raw)
            expected = length_ms(i) * rate // 1000
            assert expected <= len(audio) <= expected + PRIMING_SAMPLES.get(fmt, 0), (what, fmt)
        elif kind in ("raw_stream", "clone"):
            status, raw = got
            assert status == 200, what
            compare[i] = pcm(raw)
        elif kind == "sse":
            *deltas, done = got
            assert done["type"] == "speech.audio.done" and done["seed"] == 1000 + i, what
            compare[i] = pcm(b"".join(base64.b64decode(e["audio"]) for e in deltas))
        elif kind == "ndjson":
            assert got[-1]["final"] is True and got[-1]["seed"] == 1000 + i, what
            compare[i] = pcm(b"".join(base64.b64decode(c["audio_base64"]) for c in got))
        elif kind == "leaves":
            status, first_bytes = got
            assert status == 200 and first_bytes > 0, what
        elif kind == "websocket":
            messages, audio = got
            assert [m["text"] for m in messages if m["type"] == "sentence"] == [
                f"First of {i}.", f"Second of {i}."], what
            assert messages[-1] == {"type": "done", "sentences": 2, "duration_ms": 320.0}, what
            assert len(stream_wav_frames(audio)) == 2 * 160 * 24, what
        else:
            status, field, body = got
            assert status == 400 and body["error"]["param"] == field, (what, body)

    # Every job's audio is its own (no two seeds alike) and what it gets alone.
    assert len({a.tobytes() for a in compare.values()}) == len(compare)
    for i, audio in compare.items():
        assert len(audio) == length_ms(i) * 24, f"request {i}"
    for i in sorted(compare)[::3]:
        assert_same(compare[i], alone(server, i), f"request {i} ({KINDS[i % len(KINDS)]})")

    assert httpx.get(f"{server.url}/ping").status_code == 200
    wait_idle(runtime)
    print(f"{REQUESTS} mixed HTTP requests from {CLIENTS} clients in {elapsed:.1f} s")
