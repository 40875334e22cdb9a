"""The HTTP mode over real HTTP: a uvicorn server on 127.0.0.1 in front of a Worker on the tiny
RANDOM-weight model (its audio is noise), called with the official `openai` package, httpx,
raw sockets and a real WebSocket client. Nothing of our own server is mocked.

One server for the module: concurrency 1 with one waiting request (so overload is easy to
reach), short audio, a small body limit, and per-request watermark control allowed.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from websockets.sync.client import connect as ws_connect

from worker.http_app import Runtime, create_app, serve
from worker.openai_api import openai_job
from worker.service import Worker
from worker.settings import load_settings
from worker.ws_speech import HISTORY
from http_helpers import Server, pcm, wait_idle, ws_messages
from worker_helpers import (PRIMING_SAMPLES, REPO, SAMPLE_RATE, audio_b64, decode_bytes,
                            decode_with_ffmpeg, free_port, handler_cmd, handler_env, run, stop,
                            stream_wav_frames)

CAP_MS = 8000
BODY_LIMIT = 300_000
ENV = {"CSM_DEVICE": "cpu", "CSM_MAX_AUDIO_LENGTH_MS": str(CAP_MS), "CSM_MAX_CONCURRENCY": "1",
       "CSM_MAX_QUEUED": "1", "CSM_QUEUE_TIMEOUT_S": "5", "CSM_MAX_BODY_BYTES": str(BODY_LIMIT),
       "CSM_SEND_TIMEOUT_S": "5", "CSM_ALLOW_WATERMARK_OVERRIDE": "1",
       "CSM_MAX_TEXT_CHARS": "2000"}
# Long enough that it can't finish during a test: 9 pieces of up to CAP_MS each (a WebSocket
# speaks them one by one), many seconds of work on this CPU even for one. Unmarked (allowed
# here), so its audio leaves block by block at once.
LONG_TEXT = " ".join(f"This is sentence number {i} of a long answer." for i in range(36))
LONG = {"input": LONG_TEXT, "max_audio_length_ms": CAP_MS, "watermark": False}
CALLER_KEY = [17, 200, 3, 99, 250]


@pytest.fixture(scope="module")
def runtime(tiny_model_dir) -> Runtime:
    settings = load_settings(dict(ENV, CSM_MODEL_DIR=str(tiny_model_dir)))
    return Runtime(settings, Worker.start(settings))


@pytest.fixture(scope="module")
def server(runtime) -> Iterator[Server]:
    with Server(create_app(runtime), BODY_LIMIT) as server:
        yield server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    # max_retries=0: the client would otherwise retry our 503s on its own
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0,
                         timeout=60)


def speech(**fields) -> dict:
    body = {"model": "csm-1b", "input": "Hello there.", "voice": "conversational_a",
            "response_format": "pcm", "max_audio_length_ms": 480, "seed": 5}
    body.update(fields)
    return body


# ---- health and listings ------------------------------------------------------------------------
def test_ping_models_and_voices(server, runtime):
    ping = httpx.get(f"{server.url}/ping")
    assert ping.status_code == 200 and ping.json()["status"] == "healthy"
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["csm-1b"]
    voices = httpx.get(f"{server.url}/v1/voices").json()["data"]
    assert voices == [{"id": "conversational_a", "speaker": 0},
                      {"id": "conversational_b", "speaker": 1}, {"id": "none", "speaker": None}]


def test_while_the_model_loads(runtime):
    """RunPod's contract: /ping answers 204 until the worker is ready; work waits with 503."""
    loading = Runtime(runtime.settings)
    with Server(create_app(loading), BODY_LIMIT) as server:
        assert httpx.get(f"{server.url}/ping").status_code == 204
        r = httpx.post(f"{server.url}/v1/audio/speech", json=speech())
        assert r.status_code == 503 and r.headers["Retry-After"] == "10"
        assert "still loading" in r.json()["error"]["message"]
        with ws_connect(f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream") as ws:
            assert "still loading" in json.loads(ws.recv(5))["message"]
        loading.worker = runtime.worker
        assert httpx.get(f"{server.url}/ping").status_code == 200


# ---- OpenAI's speech API -----------------------------------------------------------------------
def test_openai_client_writes_a_decodable_file(client, tmp_path):
    response = client.audio.speech.create(model="csm-1b", voice="conversational_b",
                                          input="Hello there.", response_format="wav",
                                          extra_body={"max_audio_length_ms": 480, "seed": 7})
    path = tmp_path / "hello.wav"
    response.write_to_file(path)
    raw = path.read_bytes()
    assert len(stream_wav_frames(raw)) == 480 * 24  # a streamed WAV: header sizes "unknown"
    headers = response.response.headers
    assert headers["content-type"] == "audio/wav"
    assert headers["x-csm-seed"] == "7" and headers["x-csm-watermark"] == "deployment"
    assert float(headers["x-csm-first-audio-ms"]) > 0


def test_openai_default_format_is_mp3_and_aac_is_served(client):
    mp3 = client.audio.speech.create(model="csm-1b", voice="none", input="Default format.",
                                     extra_body={"max_audio_length_ms": 480, "seed": 1})
    assert mp3.response.headers["content-type"] == "audio/mpeg"
    aac = client.audio.speech.create(model="csm-1b", voice="none", input="Default format.",
                                     response_format="aac",
                                     extra_body={"max_audio_length_ms": 480, "seed": 1})
    assert aac.response.headers["content-type"] == "audio/aac"
    for r, fmt in ((mp3, "mp3"), (aac, "aac")):
        audio, rate = decode_with_ffmpeg(r.content)
        assert rate == SAMPLE_RATE and 0 <= len(audio) - 480 * 24 <= PRIMING_SAMPLES[fmt]


def test_openai_streaming_response_arrives_in_pieces(client, runtime):
    chunks, times = [], []
    started = time.monotonic()
    with client.audio.speech.with_streaming_response.create(
            model="csm-1b", voice="conversational_a", input="Streaming speech.",
            response_format="pcm",
            extra_body={"max_audio_length_ms": 1200, "seed": 2, "watermark": False}
    ) as response:
        assert response.headers["content-type"].startswith("audio/L16")
        assert response.headers["x-csm-watermark"] == "none"
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            times.append(time.monotonic() - started)
    audio = pcm(b"".join(chunks))
    assert len(audio) == 1200 * 24
    # unmarked audio leaves as each block is decoded: the first long before the last
    assert len(chunks) >= 3 and times[0] < times[-1]
    # exactly the audio the native API answers whole for the same seed
    whole = httpx.post(f"{runtime_url(client)}/v1/generate", timeout=60, json={
        "text": "Streaming speech.", "voice": "conversational_a", "response_format": "pcm",
        "max_audio_length_ms": 1200, "seed": 2, "watermark": False}).json()
    assert base64.b64decode(whole["audio_base64"]) == b"".join(chunks)
    wait_idle(runtime)


def runtime_url(client: openai.OpenAI) -> str:
    return str(client.base_url).rstrip("/").removesuffix("/v1")


def test_openai_sse_events(server):
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", timeout=60,
                      json=speech(stream_format="sse", max_audio_length_ms=1200)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines()
                  if line.startswith("data: ")]
    *deltas, done = events
    assert {e["type"] for e in deltas} == {"speech.audio.delta"} and len(deltas) >= 2
    assert done["type"] == "speech.audio.done"
    audio = pcm(b"".join(base64.b64decode(e["audio"]) for e in deltas))
    assert len(audio) == 1200 * 24 and done["duration_ms"] == 1200
    assert done["usage"]["output_tokens"] == done["frames"] == 15
    assert done["usage"]["total_tokens"] == done["usage"]["input_tokens"] + 15
    assert done["seed"] == 5 and done["watermarked"] is True
    assert done["watermark_key_source"] == "deployment"
    t = done["timings"]
    assert 0 < t["first_audio_ms"] < t["total_ms"] and t["real_time_factor"] > 0


@pytest.mark.parametrize("fields,param,needle", [
    ({"speed": 1.5}, "speed", "only 1.0"),
    ({"instructions": "Speak cheerfully."}, "instructions", "does not follow"),
    ({"voice": "alloy"}, "voice", "conversational_a"),
    ({"response_format": "m4a"}, "response_format", "'aac'"),
    ({"model": "tts-1"}, "model", "'csm-1b'"),
    ({"stream_format": "chunks"}, "stream_format", "'sse'"),
    ({"tempo": 2}, "tempo", "unknown field"),
    ({"max_audio_length_ms": CAP_MS + 80}, "max_audio_length_ms", f"the limit is {CAP_MS}"),
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"context": [{"text": "Hi.", "speaker": 0, "audio_base64": "%%%"}]},
     "context[0].audio_base64", "not valid base64"),
])
def test_openai_errors_name_the_field(client, runtime, fields, param, needle):
    body = speech(**fields)
    kwargs = {k: body.pop(k) for k in ("model", "input", "voice")}
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(**kwargs, extra_body=body)
    assert info.value.param == param, info.value.body
    assert needle in info.value.message
    assert info.value.type == "invalid_request_error"
    wait_idle(runtime)


def test_bodies_over_the_limit_are_refused(server):
    clip = audio_b64(5.0, 44_100)  # about 440 kB as a WAV, more in base64
    r = httpx.post(f"{server.url}/v1/audio/speech",
                   json=speech(context=[{"text": "Ref.", "speaker": 0, "audio_base64": clip}]))
    assert r.status_code == 413
    assert f"over {BODY_LIMIT} bytes" in r.json()["error"]["message"]
    # the same without Content-Length (chunked upload): counted as it arrives
    data = json.dumps(speech(context=[{"text": "Ref.", "speaker": 0,
                                       "audio_base64": clip}])).encode()
    r = httpx.post(f"{server.url}/v1/generate",
                   content=(data[i:i + 65536] for i in range(0, len(data), 65536)))
    assert r.status_code == 413 and "CSM_MAX_BODY_BYTES" in r.json()["error"]


def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent(server):
    """A Content-Length over CSM_MAX_BODY_BYTES is answered 413 at once: the server neither
    waits for nor reads a body it would refuse."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: 1000000000\r\n\r\n")
        answer = s.recv(65536)  # no body was sent: a server waiting for it times out here
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert f"over {BODY_LIMIT} bytes".encode() in answer


@pytest.mark.parametrize("content, needle", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "the body must be a JSON object, got list"),
    (b'{"model": "csm-1b", "voice": "conversational_a"}', "input: required"),
], ids=["not-json", "not-an-object", "no-input"])
def test_a_speech_body_that_is_no_request_is_a_400(server, content, needle):
    r = httpx.post(f"{server.url}/v1/audio/speech", content=content)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


# ---- per-request watermark control (allowed on this server) ----------------------------------
def test_watermark_control_is_reported_and_keys_never_logged(server, caplog):
    caplog.set_level("DEBUG")
    off = httpx.post(f"{server.url}/v1/audio/speech", timeout=60, json=speech(watermark=False))
    assert off.status_code == 200 and off.headers["x-csm-watermark"] == "none"
    own = httpx.post(f"{server.url}/v1/generate", timeout=60, json={
        "text": "Mine.", "max_audio_length_ms": 160, "seed": 1, "watermark_key": CALLER_KEY})
    assert own.json()["watermarked"] is True
    assert own.json()["watermark_key_source"] == "caller"
    marked = httpx.post(f"{server.url}/v1/generate", timeout=60, json={
        "text": "Mine.", "max_audio_length_ms": 160, "seed": 1}).json()
    assert marked["watermark_key_source"] == "deployment"
    assert marked["audio_base64"] != own.json()["audio_base64"]  # a different key
    unmarked = httpx.post(f"{server.url}/v1/generate", timeout=60, json={
        "text": "Mine.", "max_audio_length_ms": 160, "seed": 1, "watermark": False}).json()
    assert unmarked["watermarked"] is False and unmarked["watermark_key_source"] is None
    r = httpx.post(f"{server.url}/v1/generate", json={
        "text": "Mine.", "watermark": False, "watermark_key": CALLER_KEY})
    assert r.status_code == 400 and "watermark_key" in r.json()["error"]
    for text in ("17, 200, 3, 99, 250", "17,200,3,99,250", "[17, 200"):
        assert text not in caplog.text


# ---- the native JSON API -----------------------------------------------------------------------
def test_native_api_answers_like_the_queue(server):
    r = httpx.post(f"{server.url}/v1/generate", timeout=60,
                   json={"text": "Native.", "max_audio_length_ms": 240, "seed": 3})
    body = r.json()
    assert r.status_code == 200 and body["format"] == "wav" and body["duration_ms"] == 240
    assert {"audio_base64", "media_type", "seed", "timings", "watermarked"} <= set(body)
    with httpx.stream("POST", f"{server.url}/v1/generate", timeout=60, json={
            "text": "Native.", "max_audio_length_ms": 1200, "seed": 3, "stream": True,
            "response_format": "pcm", "watermark": False}) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        items = [json.loads(line) for line in r.iter_lines() if line]
    assert [i["chunk_index"] for i in items] == list(range(len(items))) and len(items) >= 2
    assert items[-1]["final"] is True and items[-1]["chunks"] == len(items)
    assert sum(len(base64.b64decode(i["audio_base64"])) for i in items) == 2 * 1200 * 24
    r = httpx.post(f"{server.url}/v1/generate", json={"text": "Hi.", "topk": 0})
    assert r.status_code == 400 and r.json()["error"].startswith("topk:")
    r = httpx.post(f"{server.url}/v1/generate", json={"task": "list_voices"})
    assert r.status_code == 200 and r.json()["default"] == "conversational_a"
    assert [v["name"] for v in r.json()["voices"]] == ["conversational_a", "conversational_b"]
    # clips under 0.84 s: SilentCipher's phase search is slow on a CPU (see test_worker)
    r = httpx.post(f"{server.url}/v1/generate", timeout=60, json={
        "task": "verify_watermark", "audio_base64": audio_b64(0.3, 24_000)})
    assert r.status_code == 200 and set(r.json()) == {"task", "watermarked"}
    r = httpx.post(f"{server.url}/v1/generate", json={
        "task": "verify_watermark", "audio_base64": "%%%"})
    assert r.status_code == 400 and "not valid base64" in r.json()["error"]


# ---- disconnects and overload ------------------------------------------------------------------
def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, runtime):
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", timeout=60,
                      json=speech(**LONG)) as r:
        reading = r.iter_bytes()
        assert next(reading) and runtime.admission.running == 1
        assert runtime.worker.engine.scheduler.active_jobs == 1
    wait_idle(runtime)  # closed after its first block: cancelled, not finished


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/v1/generate"])
def test_a_client_that_leaves_before_the_first_audio_frees_its_slot(server, runtime, path):
    """Streamed, or whole (the native API without `stream`: its first item is the whole
    job, so only cancelling the wait for it frees the slot in time)."""
    native = {"text": LONG_TEXT, "max_audio_length_ms": CAP_MS, "watermark": False}
    body = json.dumps(speech(**LONG) if path == "/v1/audio/speech" else native).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        deadline = time.monotonic() + 5
        while not runtime.worker.engine.scheduler.active_jobs:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    wait_idle(runtime)


def test_a_client_that_stops_reading_is_cut_off_and_frees_its_slot(server, runtime):
    """A reader that stalls (a tiny receive window, then nothing read) holds its job only
    until a send has waited CSM_SEND_TIMEOUT_S (5 s here): then the job is cancelled and the
    slot freed, while the connection is still open."""
    body = json.dumps(speech(**dict(LONG, response_format="pcm"))).encode()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", server.port))
        s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        assert s.recv(12) == b"HTTP/1.1 200"  # the audio has begun; now read nothing more
        stalled_s = seconds_until_freed(runtime)
        wait_idle(runtime)
    assert 5 <= stalled_s < 15, stalled_s


def seconds_until_freed(runtime: Runtime) -> float:
    """How long the slot a stalled reader holds stays held (a failure past 60 s)."""
    started = time.monotonic()
    while runtime.admission.running and time.monotonic() - started < 60:
        time.sleep(0.1)
    assert runtime.admission.running == 0, "a stalled reader kept its slot for 60 s"
    return time.monotonic() - started


def test_overload_waits_then_is_a_503_with_retry_after_never_a_hang(server, runtime):
    """One slot, one waiting place: the next request waits for the slot, the one after it is
    refused at once; when the slot frees, the waiting one gets it."""
    results = {}
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", timeout=60,
                      json=speech(**LONG)) as busy:
        reading = busy.iter_bytes()  # kept: a dropped iterator closes the stream
        next(reading)  # the stream holds the one slot

        def waiter() -> None:
            results["waited"] = httpx.post(f"{server.url}/v1/audio/speech", timeout=30,
                                           json=speech(watermark=False))

        thread = threading.Thread(target=waiter)
        thread.start()
        deadline = time.monotonic() + 5
        while runtime.admission.waiting == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        full = httpx.post(f"{server.url}/v1/audio/speech", json=speech(), timeout=30)
        assert time.monotonic() - started < 1  # refused at once, not queued
    thread.join(30)  # the busy stream closed above: its slot went to the waiter
    assert full.status_code == 503 and full.headers["Retry-After"] == "2", full.text
    assert "at capacity" in full.json()["error"]["message"]
    assert full.json()["error"]["type"] == "server_error"
    waited = results["waited"]
    assert waited.status_code == 200 and len(pcm(waited.content)) == 480 * 24
    wait_idle(runtime)


# ---- the WebSocket -------------------------------------------------------------------------------
def test_websocket_speaks_each_sentence_as_it_completes(server, runtime):
    with ws_connect(f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream") as ws:
        ws.send(json.dumps({"type": "start", "voice": "conversational_b", "seed": 4,
                            "max_audio_length_ms": 160, "response_format": "wav"}))
        ready, _ = ws_messages(ws, "ready")
        assert ready[-1] == {"type": "ready", "format": "wav", "media_type": "audio/wav",
                             "sample_rate": 24000, "voice": "conversational_b", "speaker": 1}
        for piece in ("Hello", " there", ".", " How are"):
            ws.send(json.dumps({"type": "text", "text": piece}))
        # the first sentence is spoken before the text goes on
        first, audio = ws_messages(ws, "sentence.done")
        assert [m["type"] for m in first] == ["sentence", "sentence.done"]
        assert first[0] == {"type": "sentence", "index": 0, "text": "Hello there."}
        assert first[1]["duration_ms"] == 160 and first[1]["watermarked"] is True
        ws.send(json.dumps({"type": "text", "text": " you? Dr. Smith is"}))
        ws.send(json.dumps({"type": "text", "text": " here."}))
        ws.send(json.dumps({"type": "end"}))
        rest, more = ws_messages(ws, "done")
        texts = [m["text"] for m in rest if m["type"] == "sentence"]
        assert texts == ["How are you?", "Dr. Smith is here."]  # "Dr." ended nothing
        assert rest[-1] == {"type": "done", "sentences": 3, "duration_ms": 480.0}
        # every binary message together: one WAV file, one header
        assert len(stream_wav_frames(audio + more)) == 3 * 160 * 24
    wait_idle(runtime)


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_a_websocket_in_a_compressed_format_sends_one_whole_file(server, runtime, fmt):
    """An encoder that holds bytes back (FFmpeg's FLAC, libsndfile's Ogg pages) sends them when
    the connection ends: every binary message together decodes to all of the speech."""
    with ws_connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "start", "max_audio_length_ms": 160, "seed": 3,
                            "response_format": fmt}))
        ready, _ = ws_messages(ws, "ready")
        assert ready[-1]["format"] == fmt
        ws.send(json.dumps({"type": "text", "text": "Hello there. How are you?"}))
        ws.send(json.dumps({"type": "end"}))
        messages, audio = ws_messages(ws, "done")
    assert messages[-1] == {"type": "done", "sentences": 2, "duration_ms": 320.0}
    # a streamed FLAC's length says "unknown": libsndfile can't read it, FFmpeg can
    samples, rate = decode_with_ffmpeg(audio) if fmt == "flac" else decode_bytes(audio, fmt)
    assert rate == SAMPLE_RATE and len(samples) == 2 * 160 * 24
    wait_idle(runtime)


def test_websocket_sentences_are_spoken_with_the_ones_before_as_context(server, runtime):
    """The second sentence of a connection is conditioned on the first (its text and codes):
    spoken alone, with the same seed and settings, it sounds different; the same connection
    again sounds the same."""
    def spoken(text: str) -> list[bytes]:
        with ws_connect(f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream") as ws:
            ws.send(json.dumps({"type": "start", "seed": 8, "max_audio_length_ms": 240,
                                "response_format": "pcm", "watermark": False}))
            ws_messages(ws, "ready")
            ws.send(json.dumps({"type": "text", "text": text}))
            ws.send(json.dumps({"type": "end"}))
            sentences = []
            for _ in range(text.count("?") + text.count(".")):
                messages, audio = ws_messages(ws, "sentence.done")
                assert messages[-1]["type"] == "sentence.done", messages
                sentences.append(audio)
            return sentences

    after_first = spoken("Hello there. How are you?")
    assert spoken("Hello there. How are you?") == after_first
    (alone,) = spoken("How are you?")
    assert len(alone) == len(after_first[1]) == 240 * 24 * 2
    assert alone != after_first[1]
    wait_idle(runtime)


def test_a_websocket_keeps_its_last_eight_sentences_as_context(server, runtime, monkeypatch):
    """A connection may speak for hours: what it keeps of its past is bounded."""
    engine, histories = runtime.worker.engine, []
    start = engine.start

    def spy(request, deliver=None):
        histories.append([segment.text for segment in request.history])
        return start(request, deliver)

    monkeypatch.setattr(engine, "start", spy)
    texts = [f"Sentence {i}." for i in range(11)]
    with ws_connect(f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream") as ws:
        ws.send(json.dumps({"type": "start", "max_audio_length_ms": 80, "watermark": False}))
        ws.send(json.dumps({"type": "text", "text": " ".join(texts) + " "}))
        ws.send(json.dumps({"type": "end"}))
        messages, _ = ws_messages(ws, "done")
        assert messages[-1]["sentences"] == 11
    assert histories == [texts[max(0, i - HISTORY):i] for i in range(11)]
    wait_idle(runtime)


def test_websocket_errors_are_clear(server, runtime):
    url = f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream"
    with ws_connect(url) as ws:
        ws.send(json.dumps({"type": "start", "topk": 0}))
        error = json.loads(ws.recv(10))
        assert error["type"] == "error" and error["param"] == "topk"
        with pytest.raises(Exception) as closed:
            ws.recv(10)
        assert closed.value.rcvd.code == 1008
    with ws_connect(url) as ws:
        ws.send(json.dumps({"type": "shout", "text": "Hi."}))
        error = json.loads(ws.recv(10))
        assert error["param"] == "type" and "start, text, flush or end" in error["message"]
        ws.send("not json")
        assert "not valid JSON" in json.loads(ws.recv(10))["message"]


def test_a_websocket_whose_context_fills_the_window_is_refused_at_start(server, runtime):
    """Every sentence is spoken after the session's voice and context: if they leave no room
    for even a short one, `start` is refused, not each sentence later."""
    words = "and then we talked about it for a long time " * 45  # 1,980 characters
    turn = {"text": words, "speaker": 0, "audio_base64": audio_b64(0.2, 8000)}
    with ws_connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "start", "context": [turn] * 5, "watermark": False}))
        messages, _ = ws_messages(ws, "error")
        error = messages[-1]
        assert error["type"] == "error" and error["param"] == "context", error
        assert error["message"].startswith("context: leaves no room for a sentence: the prompt "
                                           "(text plus context) takes"), error
        with pytest.raises(Exception) as closed:
            ws.recv(10)
        assert closed.value.rcvd.code == 1008
    with ws_connect(ws_url(server)) as ws:  # with room for its sentences, the same start is fine
        ws.send(json.dumps({"type": "start", "context": [turn] * 2, "watermark": False,
                            "max_audio_length_ms": 80}))
        ws_messages(ws, "ready")
        ws.send(json.dumps({"type": "text", "text": "Hello there. "}))
        ws.send(json.dumps({"type": "end"}))
        messages, _ = ws_messages(ws, "done")
        assert messages[-1]["sentences"] == 1, messages
    wait_idle(runtime)


def ws_url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream"


def test_websocket_text_is_held_to_the_rules_of_a_request(server, runtime):
    """A bad piece of text is an error that drops that piece, never the connection; what a
    request refuses (a control character, too much text) is refused here too, and a sentence
    of punctuation alone is skipped, not spoken as noise."""
    with ws_connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "start", "max_audio_length_ms": 80, "watermark": False}))
        ws_messages(ws, "ready")
        for text, param, needle in [
                (5, "text", "text: must be a string"),
                ("Bad\u0000 one. ", "text", "control character U+0000"),
                ("x" * 2001, "text", "2001 characters would wait to be spoken; the limit is 2000")]:
            ws.send(json.dumps({"type": "text", "text": text}))
            error = json.loads(ws.recv(10))
            assert error["type"] == "error" and error["param"] == param, error
            assert needle in error["message"], error
        ws.send(json.dumps({"type": "text", "text": "... !!! Hello there. ?! "}))
        ws.send(json.dumps({"type": "end"}))
        messages, audio = ws_messages(ws, "done")
    assert [m["text"] for m in messages if m["type"] == "sentence"] == ["Hello there."]
    assert messages[-1] == {"type": "done", "sentences": 1, "duration_ms": 80.0}
    assert len(audio) == 80 * 24 * 2
    wait_idle(runtime)


def test_a_websocket_may_speak_more_than_the_text_limit_over_its_life(server, runtime):
    """CSM_MAX_TEXT_CHARS (2000 here) caps the text waiting to be spoken, not what a
    connection speaks in all: text spoken no longer counts."""
    sentence = "This sentence is here to add up to more text than the limit allows. "  # 68
    with ws_connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "start", "max_audio_length_ms": 80, "watermark": False}))
        ws_messages(ws, "ready")
        for _ in range(3):  # 3 x 1360 characters, each batch spoken before the next is sent
            ws.send(json.dumps({"type": "text", "text": sentence * 20}))
            ws.send(json.dumps({"type": "flush"}))
            for _ in range(20):
                messages, _ = ws_messages(ws, "sentence.done")
                assert messages[-1]["type"] == "sentence.done", messages
        ws.send(json.dumps({"type": "end"}))
        messages, _ = ws_messages(ws, "done")
    assert messages[-1]["sentences"] == 60
    wait_idle(runtime)


@pytest.mark.parametrize("first, second, needle", [
    ({"type": "start", "speed": 1.5}, None, "speed: unknown field in start"),
    ({"type": "start"}, {"type": "start"}, "start: only as the first message"),
    (b"\x00\x01", None, "messages must be JSON text"),
    ([1, 2], None, "a message must be a JSON object"),
], ids=["unknown-field", "second-start", "binary", "not-an-object"])
def test_websocket_protocol_errors_close_with_1008(server, runtime, first, second, needle):
    with ws_connect(ws_url(server)) as ws:
        for message in (first, second):
            if isinstance(message, bytes):
                ws.send(message)
            elif message is not None:
                ws.send(json.dumps(message))
        messages, _ = ws_messages(ws, "error")
        assert messages[-1]["type"] == "error" and needle in messages[-1]["message"], messages
        with pytest.raises(Exception) as closed:
            ws.recv(10)
        assert closed.value.rcvd.code == 1008
    wait_idle(runtime)


def test_websocket_speaks_a_long_sentence_before_it_ends(server, runtime):
    """A sentence longer than a piece (220 characters) is cut at a clause and spoken before
    its end arrives: an LLM's run-on sentence doesn't hold up the audio."""
    clauses = [f"clause number {i} goes on for a while" for i in range(12)]
    with ws_connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "start", "max_audio_length_ms": 80, "watermark": False}))
        ws.send(json.dumps({"type": "text", "text": ", ".join(clauses)}))  # no end yet
        messages, _ = ws_messages(ws, "sentence.done")
        spoken = [m["text"] for m in messages if m["type"] == "sentence"]
        assert len(spoken) == 1 and 0 < len(spoken[0]) <= 220, spoken
        assert spoken[0].endswith(",") and ", ".join(clauses).startswith(spoken[0])
        ws.send(json.dumps({"type": "end"}))
        rest, _ = ws_messages(ws, "done")
    said = spoken + [m["text"] for m in rest if m["type"] == "sentence"]
    assert " ".join(said) == ", ".join(clauses)  # every word once, in order
    wait_idle(runtime)


@pytest.mark.parametrize("asks", ["a sentence", "its reference clip encoded"])
def test_a_websocket_meeting_a_full_server_closes_with_1013(server, runtime, monkeypatch, asks):
    """The one slot busy and the one waiting place taken: neither a sentence nor the Mimi
    encoding of a `start`'s reference clip (GPU work too) can wait, so the connection is told
    to come back (1013), nothing is encoded, and the slot's holder is untouched."""
    encoded = []
    segment = runtime.worker.engine.segment
    monkeypatch.setattr(runtime.worker.engine, "segment",
                        lambda *args: encoded.append(None) or segment(*args))
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", timeout=60,
                      json=speech(**LONG)) as busy:
        reading = busy.iter_bytes()
        next(reading)
        waiter = threading.Thread(target=lambda: httpx.post(
            f"{server.url}/v1/audio/speech", timeout=30, json=speech(watermark=False)))
        waiter.start()
        deadline = time.monotonic() + 5
        while runtime.admission.waiting == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with ws_connect(ws_url(server)) as ws:
            if asks == "a sentence":
                ws.send(json.dumps({"type": "text", "text": "Hello there."}))
                ws.send(json.dumps({"type": "flush"}))
            else:
                ws.send(json.dumps({"type": "start", "context": [
                    {"text": "Ref.", "speaker": 0, "audio_base64": audio_b64(1.0, 24_000)}]}))
            messages, _ = ws_messages(ws, "error")
            # configured (ready) only once its clips are encoded: never here
            ready = ["ready"] if asks == "a sentence" else []
            assert [m["type"] for m in messages] == [*ready, "error"], messages
            assert "at capacity" in messages[-1]["message"], messages
            with pytest.raises(Exception) as closed:
                ws.recv(10)
            assert closed.value.rcvd.code == 1013
        assert runtime.admission.running == 1 and next(reading)  # the stream goes on
    waiter.join(30)
    assert encoded == []
    wait_idle(runtime)


def test_a_websocket_client_that_stops_reading_frees_its_slot(server, runtime):
    """As over HTTP: a client that reads nothing for CSM_SEND_TIMEOUT_S (5 s here) has its
    speech cancelled and its slot freed."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    with ws_connect(ws_url(server), sock=sock, max_queue=1, ping_interval=None) as ws:
        ws.send(json.dumps({"type": "start", "max_audio_length_ms": CAP_MS, "watermark": False}))
        ws.send(json.dumps({"type": "text", "text": LONG_TEXT}))
        ws.send(json.dumps({"type": "flush"}))
        deadline = time.monotonic() + 10
        while not runtime.admission.running:  # speaking has begun; now read nothing
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stalled_s = seconds_until_freed(runtime)
    wait_idle(runtime)
    assert 5 <= stalled_s < 15, stalled_s


def test_websocket_disconnect_frees_the_slot(server, runtime):
    with ws_connect(f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream") as ws:
        ws.send(json.dumps({"type": "start", "max_audio_length_ms": CAP_MS, "watermark": False}))
        ws.send(json.dumps({"type": "text", "text": LONG_TEXT}))
        ws.send(json.dumps({"type": "flush"}))
        while not isinstance(ws.recv(30), bytes):  # speaking has begun
            pass
        assert runtime.admission.running == 1
    wait_idle(runtime)


# ---- a GPU fault -----------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["speech", "native", "websocket"])
def test_a_gpu_fault_makes_ping_unhealthy_whichever_route_met_it(tiny_model_dir, route):
    """RunPod replaces a load-balanced worker whose /ping fails; every route that meets a GPU
    fault must say so there, or a worker whose jobs all fail keeps getting traffic. Its own
    server: the fault is for good."""
    settings = load_settings(dict(ENV, CSM_MODEL_DIR=str(tiny_model_dir)))
    runtime = Runtime(settings, Worker.start(settings))
    runtime.worker.engine.model.frame_step = lambda *a: (_ for _ in ()).throw(
        RuntimeError("CUDA error: an illegal memory access was encountered"))
    with Server(create_app(runtime), BODY_LIMIT) as server:
        assert httpx.get(f"{server.url}/ping").status_code == 200
        if route == "websocket":
            with ws_connect(f"ws://127.0.0.1:{server.port}/v1/audio/speech/stream") as ws:
                ws.send(json.dumps({"type": "text", "text": "Hello there. "}))
                ws.send(json.dumps({"type": "end"}))
                messages = [json.loads(ws.recv(20)) for _ in range(3)]
                assert [m["type"] for m in messages] == ["ready", "sentence", "error"]
                assert "the GPU failed" in messages[2]["message"]
                with pytest.raises(Exception) as closed:
                    ws.recv(10)
                assert closed.value.rcvd.code == 1011
        else:
            path, body = (("/v1/audio/speech", speech()) if route == "speech" else
                          ("/v1/generate", {"text": "Hello there.", "max_audio_length_ms": 480}))
            answer = httpx.post(f"{server.url}{path}", json=body, timeout=30)
            assert answer.status_code == 500 and "the GPU failed" in answer.text
        ping = httpx.get(f"{server.url}/ping")
        assert ping.status_code == 503 and ping.json()["status"] == "unhealthy"
        assert "the GPU failed" in ping.json()["error"]
    runtime.worker.engine.close()


MID_STREAM = {  # route: (path, body) of a streamed request, unmarked so audio leaves at once
    "ndjson": ("/v1/generate", {"text": "Hello there.", "max_audio_length_ms": CAP_MS,
                                "stream": True, "response_format": "pcm", "watermark": False}),
    "sse": ("/v1/audio/speech", speech(stream_format="sse", max_audio_length_ms=CAP_MS,
                                       watermark=False)),
    "audio": ("/v1/audio/speech", speech(max_audio_length_ms=CAP_MS, watermark=False)),
}


@pytest.mark.parametrize("route", list(MID_STREAM))
def test_a_gpu_fault_after_the_status_line_ends_the_body_with_the_error(tiny_model_dir, route):
    """Once 200 and some audio went out, a fault can only be told in the body: NDJSON and SSE
    end with an error item, raw audio breaks off (never a body that looks complete), and
    /ping turns unhealthy. Its own server: the fault is for good."""
    settings = load_settings(dict(ENV, CSM_MODEL_DIR=str(tiny_model_dir)))
    runtime = Runtime(settings, Worker.start(settings))
    model, steps = runtime.worker.engine.model, []
    frame_step = model.frame_step

    def fails_after_two_blocks(*args):
        steps.append(None)
        if len(steps) > 8:  # CHECK_EVERY = 4 frames a block
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return frame_step(*args)

    model.frame_step = fails_after_two_blocks
    path, body = MID_STREAM[route]
    with Server(create_app(runtime), BODY_LIMIT) as server:
        with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=30) as r:
            assert r.status_code == 200
            if route == "audio":
                received = []
                with pytest.raises(httpx.RemoteProtocolError):
                    for part in r.iter_bytes():
                        received.append(part)
                assert 0 < len(b"".join(received)) < 2 * CAP_MS * 24
            else:
                lines = [line for line in r.iter_lines() if line]
        if route == "ndjson":
            *audio, last = [json.loads(line) for line in lines]
            assert audio and all(not item["final"] for item in audio)
            assert set(last) == {"error"} and "the GPU failed" in last["error"]
        elif route == "sse":
            *audio, last = [json.loads(line[len("data: "):]) for line in lines]
            assert audio and {e["type"] for e in audio} == {"speech.audio.delta"}
            assert last["type"] == "error" and "the GPU failed" in last["error"]["message"]
        ping = httpx.get(f"{server.url}/ping")
        assert ping.status_code == 503 and "the GPU failed" in ping.json()["error"]
    runtime.worker.engine.close()


# ---- the queue mode's OpenAI jobs ---------------------------------------------------------------
def test_queue_openai_jobs(runtime):
    worker = runtime.worker
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        async def answers(payload):
            return [item async for item in openai_job(worker, payload)]

        job = {"openai_route": "/v1/audio/speech",
               "openai_input": speech(stream_format="sse", max_audio_length_ms=480)}
        events = run(loop, answers(job))
        assert all(isinstance(e, str) and e.startswith("data: ") for e in events)
        *deltas, done = [json.loads(e[len("data: "):]) for e in events]
        assert done["type"] == "speech.audio.done" and done["duration_ms"] == 480
        audio = b"".join(base64.b64decode(d["audio"]) for d in deltas)
        assert len(audio) == 2 * 480 * 24
        (whole,) = run(loop, answers(dict(job, openai_input=speech())))
        assert whole["format"] == "pcm" and whole["duration_ms"] == 480
        assert len(base64.b64decode(whole["audio_base64"])) == 2 * 480 * 24
        (models,) = run(loop, answers({"openai_route": "/v1/models"}))
        assert models["data"][0]["id"] == "csm-1b"
        (error,) = run(loop, answers({"openai_route": "/v1/chat/completions"}))
        assert "openai_route" in error["error"] and "/v1/audio/speech" in error["error"]
        (error,) = run(loop, answers(dict(job, openai_input=speech(speed=2))))
        assert error["error"].startswith("speed:")
    finally:
        loop.close()


# ---- `CSM_MODE=http python handler.py`: the process RunPod starts -------------------------------
def test_handler_serves_http_with_health_on_its_own_port(tiny_model_dir):
    """The model loads after the ports open: /ping on PORT_HEALTH says 204, then 200."""
    port, health = free_port(), free_port()
    env = handler_env(tiny_model_dir, CSM_MODE="http", PORT=str(port), PORT_HEALTH=str(health),
                      CSM_HOST="127.0.0.1", CSM_MAX_AUDIO_LENGTH_MS="480",
                      CSM_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(handler_cmd(), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        codes = []
        deadline = time.monotonic() + 120
        while not codes or codes[-1] != 200:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
            try:
                codes.append(httpx.get(f"http://127.0.0.1:{health}/ping").status_code)
            except httpx.ConnectError:
                pass
            time.sleep(0.1)
        assert set(codes) <= {204, 200} and 204 in codes  # "initializing" while it loaded
        r = httpx.post(f"http://127.0.0.1:{port}/v1/audio/speech", timeout=60, json=speech())
        assert r.status_code == 200 and len(pcm(r.content)) == 480 * 24
        # the health port serves /ping only
        assert httpx.get(f"http://127.0.0.1:{health}/v1/models").status_code == 404
    finally:
        stop(proc)
    assert proc.returncode in (0, -15)


def test_serve_returns_1_when_the_model_cannot_load(tmp_path):
    """What `python handler.py` exits with, so that RunPod restarts the worker (run here in a
    thread: uvicorn only takes over signals in the main thread)."""
    settings = load_settings({"CSM_MODEL_DIR": str(tmp_path / "missing"), "CSM_MODE": "http",
                              "PORT": str(free_port()), "CSM_HOST": "127.0.0.1"})
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=serve(settings)))
    thread.start()
    thread.join(60)
    assert result == {"code": 1}


def test_the_websocket_example_client_saves_a_wav(server, tmp_path):
    out = tmp_path / "hello.wav"
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "ws_client.py"), "--url",
         f"ws://127.0.0.1:{server.port}", "--text", "Hello there. How are you?", "--seed", "1",
         "--max-audio-length-ms", "160", "--word-delay", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "speaking 0: 'Hello there.'" in done.stdout and "done: 2 sentences" in done.stdout
    assert len(stream_wav_frames(out.read_bytes())) == 2 * 160 * 24
