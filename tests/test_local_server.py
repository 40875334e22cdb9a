"""`python handler.py --rp_serve_api` (the RunPod SDK's local API server) on 127.0.0.1.

A real subprocess with the tiny RANDOM-weight model (noise, not speech; its Mimi codebooks
made random so that every seed gives its own audio), driven over HTTP: /runsync, /run with
/stream/{id} and /status/{id}, a 200-job load test and a mixed load; examples/client.py
against it, and against a stand-in for RunPod's cloud API. The cloud's own job path (the SDK's
`handle_job`, which the local server only imitates) is run in-process at the end.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests

from worker_helpers import (REPO, SAMPLE_RATE, assert_same_audio, audio_file, decode_audio,
                            decode_bytes, handler_env, imported_handler,
                            rp_api_server, stream_wav_frames)

CAP_MS = 1200
LIMITS = {"CSM_MAX_AUDIO_LENGTH_MS": str(CAP_MS), "CSM_MAX_CONCURRENCY": "8",
          "CSM_MAX_TEXT_CHARS": "500", "CSM_LOG_LEVEL": "WARNING",
          "RUNPOD_LOG_LEVEL": "WARN"}  # the SDK logs every yield (base64 and all) at DEBUG
RESPONSE = {"audio_base64", "format", "media_type", "sample_rate", "duration_ms", "frames",
            "utterances", "seed", "stop_reason", "watermarked", "watermark_key_source", "timings"}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The server's base URL."""
    with rp_api_server(handler_env(model_dir, **LIMITS), tmp_path_factory.mktemp("server-cwd"),
                       tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


def post(url: str, path: str, body=None, session=None, timeout=120) -> requests.Response:
    return (session or requests).post(url + path, json=body, timeout=timeout)


def runsync(url, payload, session=None) -> dict:
    r = post(url, "/runsync", {"input": payload}, session)
    assert r.status_code == 200, r.text
    return r.json()


def check_wav(response: dict, ms: int) -> np.ndarray:
    assert set(response) == RESPONSE, response.keys()
    assert response["format"] == "wav" and response["sample_rate"] == SAMPLE_RATE
    audio, rate = decode_audio(response)
    assert rate == SAMPLE_RATE
    assert response["duration_ms"] == ms == 1000 * len(audio) / SAMPLE_RATE
    return audio


def joined(chunks: list[dict]) -> bytes:
    return b"".join(base64.b64decode(c["audio_base64"], validate=True) for c in chunks)


def check_stream(chunks: list[dict], fmt: str, ms: int) -> None:
    assert [c["chunk_index"] for c in chunks] == list(range(len(chunks)))
    assert [c["final"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["chunks"] == len(chunks) and chunks[-1]["duration_ms"] == ms
    total = sum(c["samples"] for c in chunks)
    assert total == ms * SAMPLE_RATE // 1000
    audio, rate = decode_bytes(joined(chunks), fmt)
    assert rate == SAMPLE_RATE and len(audio) == total


# ---- single requests -------------------------------------------------------------------------
def test_runsync_answers_a_one_element_list(server):
    body = runsync(server, {"text": "Hello over HTTP.", "max_audio_length_ms": 240, "seed": 5})
    assert body["status"] == "COMPLETED" and body["id"]
    assert isinstance(body["output"], list) and len(body["output"]) == 1
    (response,) = body["output"]
    check_wav(response, 240)
    assert response["seed"] == 5 and response["utterances"] == 1
    again = runsync(server, {"text": "Hello over HTTP.", "max_audio_length_ms": 240, "seed": 5})
    assert again["output"][0]["audio_base64"] == response["audio_base64"]


def test_runsync_other_formats(server):
    for fmt in ("flac", "ogg", "pcm"):
        (r,) = runsync(server, {"input": "Formats.", "max_audio_length_ms": 160, "seed": 1,
                                "response_format": fmt})["output"]
        audio, _ = decode_audio(r)
        assert r["format"] == fmt and len(audio) == 160 * 24


def test_runsync_bad_input_reports_the_error(server):
    body = runsync(server, {"text": "Hi.", "topk": 0})
    # The SDK's local server lists a generator's yields as they are: the error comes back as
    # the one element of `output` (the deployed service fails the job: see the end of file).
    if body["status"] == "FAILED":
        error = body["error"]
    else:
        assert body["status"] == "COMPLETED" and len(body["output"]) == 1
        assert set(body["output"][0]) == {"error"}
        error = body["output"][0]["error"]
    assert "topk" in error and "greater than or equal to 1" in error


def test_runsync_bad_input_locally_is_an_error_item(server):
    """The SDK's local server never looks inside a generator's yields (the deployed service
    does, and marks the job FAILED): locally the error comes back as the output's one item."""
    body = runsync(server, {"text": "Hi.", "speaker": 99})
    assert body["status"] == "COMPLETED"
    assert len(body["output"]) == 1 and "speaker" in body["output"][0]["error"]


def test_runsync_without_input_is_422(server):
    r = post(server, "/runsync", {"inputs": {"text": "Hi."}})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "input"]
    assert post(server, "/runsync", None).status_code == 422


def test_run_then_stream_reassembles_a_playable_file(server):
    for fmt in ("wav", "ogg"):
        r = post(server, "/run", {"input": {"text": "Streamed over HTTP.", "stream": True,
                                            "max_audio_length_ms": CAP_MS, "seed": 3,
                                            "response_format": fmt}})
        assert r.status_code == 200 and r.json()["status"] == "IN_PROGRESS"
        job_id = r.json()["id"]
        body = post(server, f"/stream/{job_id}").json()
        assert body["status"] == "COMPLETED" and body["id"] == job_id
        chunks = [item["output"] for item in body["stream"]]
        assert len(chunks) == 4  # to the first period's points at 4, 11 and 21 hops, the rest
        check_stream(chunks, fmt, CAP_MS)
        if fmt == "wav":
            assert len(stream_wav_frames(joined(chunks))) == CAP_MS * 24
        # the job is gone once streamed
        assert post(server, f"/stream/{job_id}").json()["status"] == "FAILED"


def test_run_then_status(server):
    job_id = post(server, "/run", {"input": {"text": "Status.", "max_audio_length_ms": 160,
                                             "seed": 8}}).json()["id"]
    body = post(server, f"/status/{job_id}").json()
    assert body["status"] == "COMPLETED" and len(body["output"]) == 1
    check_wav(body["output"][0], 160)


def test_runsync_streamed_job_returns_every_chunk(server):
    body = runsync(server, {"text": "All chunks.", "stream": True, "response_format": "pcm",
                            "max_audio_length_ms": CAP_MS, "seed": 4})
    assert body["status"] == "COMPLETED"
    check_stream(body["output"], "pcm", CAP_MS)


# ---- examples/client.py, the README's client ------------------------------------------------
def client(tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "examples" / "client.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


def test_the_example_client_saves_what_runsync_answers(server, tmp_path):
    done = client(tmp_path, "--url", server, "--text", "Saved by the client.", "--seed", "6",
                  "--voice", "conversational_b", "--out", "out.wav")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout[:done.stdout.rindex("}") + 1])
    assert summary["seed"] == 6 and "audio_base64" not in summary
    (response,) = runsync(server, {"text": "Saved by the client.", "seed": 6,
                                   "voice": "conversational_b", "response_format": "wav",
                                   "stream": False})["output"]
    assert (tmp_path / "out.wav").read_bytes() == base64.b64decode(response["audio_base64"])
    assert done.stdout.rstrip().endswith("wrote out.wav")


def test_the_example_client_streams_a_clone_into_a_playable_file(server, tmp_path):
    (tmp_path / "me.wav").write_bytes(audio_file(1.0, rate=16_000))
    args = ["--text", "Streamed by the client.", "--reference", "me.wav", "--format", "ogg",
            "--stream", "--out", "out.ogg"]
    refused = client(tmp_path, "--url", server, *args)
    assert refused.returncode == 2 and "--reference needs --reference-text" in refused.stderr
    done = client(tmp_path, "--url", server, *args, "--reference-text", "A tone.")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout[:done.stdout.rindex("}") + 1])
    assert summary["final"] and summary["chunks"] > 1
    audio, rate = decode_bytes((tmp_path / "out.ogg").read_bytes(), "ogg")
    assert rate == SAMPLE_RATE and 1000 * len(audio) / SAMPLE_RATE == summary["duration_ms"]


def test_the_example_client_lists_voices_and_reports_a_refusal(server, tmp_path):
    listed = client(tmp_path, "--url", server, "--list-voices")
    assert listed.returncode == 0, listed.stderr
    assert {v["name"] for v in json.loads(listed.stdout)["voices"]} == {"conversational_a",
                                                                         "conversational_b"}
    for stream in ([], ["--stream"]):
        refused = client(tmp_path, "--url", server, "--text", "Hi.", "--voice", "nobody", "--out",
                         "x.wav", *stream)
        assert refused.returncode == 1 and not (tmp_path / "x.wav").exists()
        assert refused.stderr.startswith("worker error:") and "nobody" in refused.stderr
        assert "conversational_a" in refused.stderr


class RunpodApiStandIn(BaseHTTPRequestHandler):
    """RunPod's cloud API for one endpoint, as the client meets it: a key in the header, GET
    for /status and /stream (POST refused), a /runsync that gives up waiting and a /stream
    that hands out a job's chunks over several polls. `replies` are the worker's real
    outputs."""

    replies: dict[str, list] = {}
    seen: list[tuple[str, str]] = []

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        self.seen.append((method, self.path))
        if self.headers.get("Authorization") != "Bearer test-key":
            return self._answer(401, {"error": "Unauthorized"})
        if method == "POST" and self.path in ("/v2/ep/run", "/v2/ep/runsync"):
            self.rfile.read(int(self.headers["Content-Length"]))
            return self._answer(200, {"id": "job-1", "status": "IN_QUEUE"})
        if method == "GET" and self.path == "/v2/ep/status/job-1":
            return self._answer(200, {"id": "job-1", "status": "COMPLETED",
                                      "output": self.replies["whole"]})
        if method == "GET" and self.path == "/v2/ep/stream/job-1":
            chunks = self.replies["stream"]
            part, self.replies["stream"] = chunks[:2], chunks[2:]
            return self._answer(200, {"id": "job-1", "stream": [{"output": c} for c in part],
                                      "status": "IN_PROGRESS" if chunks[2:] else "COMPLETED"})
        self._answer(405, {"detail": "Method Not Allowed"})

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def log_message(self, *args: object) -> None:
        pass


def test_the_example_client_polls_a_deployed_endpoint_as_runpods_api_wants(server, tmp_path):
    job = {"text": "Through the cloud.", "seed": 2, "response_format": "pcm"}
    whole = runsync(server, job)["output"]
    chunks = runsync(server, {**job, "stream": True, "max_audio_length_ms": CAP_MS})["output"]
    polls = -(-len(chunks) // 2)
    assert polls > 1
    RunpodApiStandIn.replies, RunpodApiStandIn.seen = {"whole": whole, "stream": chunks}, []
    api = ThreadingHTTPServer(("127.0.0.1", 0), RunpodApiStandIn)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    env = {**os.environ, "RUNPOD_API_KEY": "test-key",
           "RUNPOD_ENDPOINT_BASE_URL": f"http://127.0.0.1:{api.server_port}/v2"}
    call = ["--endpoint", "ep", "--text", job["text"], "--format", "pcm"]
    try:
        done = client(tmp_path, *call, "--out", "whole.pcm", env=env)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "whole.pcm").read_bytes() == base64.b64decode(
            whole[0]["audio_base64"])
        done = client(tmp_path, *call, "--stream", "--out", "stream.pcm", env=env)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "stream.pcm").read_bytes() == joined(chunks)
        # /runsync, then its /status; /run, then a /stream per two chunks
        assert [m for m, _ in RunpodApiStandIn.seen] == ["POST", "GET", "POST"] + ["GET"] * polls
        refused = client(tmp_path, *call, "--out", "x.pcm",
                         env={**env, "RUNPOD_API_KEY": "wrong"})
        assert refused.returncode == 1 and not (tmp_path / "x.pcm").exists()
        assert refused.stderr.startswith("unexpected reply from /runsync (HTTP 401)")
    finally:
        api.shutdown()


# ---- load ---------------------------------------------------------------------------------------
def test_200_jobs_none_lost_none_mixed_up(server):
    n, clients = 200, 8
    local = threading.local()

    def one(i: int):
        local.session = getattr(local, "session", None) or requests.Session()
        payload = {"text": f"Job number {i}.", "max_audio_length_ms": 160, "seed": 10_000 + i}
        return i, runsync(server, payload, local.session)

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = dict(pool.map(one, range(n)))
    elapsed = time.monotonic() - started
    assert sorted(results) == list(range(n))
    digests = {}
    for i, body in results.items():
        assert body["status"] == "COMPLETED", (i, body)
        assert len(body["output"]) == 1, (i, body["output"])
        (response,) = body["output"]
        assert response["seed"] == 10_000 + i, (i, response["seed"])  # no mix-up
        check_wav(response, 160)
        digests[i] = hashlib.sha256(response["audio_base64"].encode()).hexdigest()
    assert len(set(digests.values())) == n  # every seed its own audio
    # a job rerun alone gives the audio it got under load
    for i in (0, 77, 199):
        alone = runsync(server, {"text": f"Job number {i}.", "max_audio_length_ms": 160,
                                 "seed": 10_000 + i})
        assert_same_audio(alone["output"][0], results[i]["output"][0])
    print(f"{n} jobs through /runsync with {clients} clients in {elapsed:.1f} s")


def test_mixed_load_all_accounted_for(server):
    jobs = []
    for i in range(36):
        kind = ("normal", "streamed", "invalid", "run+stream")[i % 4]
        seed = 20_000 + i
        if kind == "normal":
            payload = {"text": f"Mixed {i}.", "max_audio_length_ms": 160, "seed": seed}
        elif kind in ("streamed", "run+stream"):
            payload = {"text": f"Mixed {i}.", "max_audio_length_ms": 240, "seed": seed,
                       "stream": True, "response_format": ("pcm", "wav", "opus")[i % 3]}
        else:
            payload = [{"text": "Hi.", "temperature": 5},
                       {"text": "Hi.", "context": [{"text": "a", "speaker": 0,
                                                    "audio_base64": "%%%"}]},
                       {"text": "Hi.", "voice": "robot"}][i % 3]
        jobs.append((i, kind, payload))
    expected_errors = {0: "temperature", 1: "not valid base64", 2: "must be one of"}

    def one(job):
        i, kind, payload = job
        if kind == "run+stream":
            job_id = post(server, "/run", {"input": payload}).json()["id"]
            body = post(server, f"/stream/{job_id}").json()
            return i, body["status"], [item["output"] for item in body["stream"]]
        body = runsync(server, payload)
        return i, body["status"], body.get("output")

    with ThreadPoolExecutor(8) as pool:
        results = {i: (status, output) for i, status, output in pool.map(one, jobs)}
    assert sorted(results) == list(range(36))
    for i, kind, payload in jobs:
        status, output = results[i]
        assert status == "COMPLETED", (i, kind, status)
        if kind == "invalid":
            assert len(output) == 1 and set(output[0]) == {"error"}
            assert expected_errors[i % 3] in output[0]["error"]
        elif kind == "normal":
            assert len(output) == 1 and output[0]["seed"] == payload["seed"]
            check_wav(output[0], 160)
        else:
            assert output[-1]["seed"] == payload["seed"]
            check_stream(output, payload["response_format"], 240)


def test_server_still_serves_after_the_load(server):
    body = runsync(server, {"text": "Still up.", "max_audio_length_ms": 80, "seed": 1})
    assert body["status"] == "COMPLETED"
    check_wav(body["output"][0], 80)


# ---- the deployed service's job path, in-process --------------------------------------------
@pytest.fixture(scope="module")
def cloud_handler(model_dir):
    """handler.py as the deployed worker imports it (RUNPOD_WEBHOOK_GET_JOB set)."""
    env = dict(LIMITS, CSM_MODEL_DIR=str(model_dir), CSM_DEVICE="cpu",
               RUNPOD_WEBHOOK_GET_JOB="http://127.0.0.1:9/unused")
    with imported_handler(env) as module:
        yield module


@pytest.fixture
def sent(monkeypatch):
    """What the SDK's handle_job would post back to RunPod: results and stream items."""
    from runpod.serverless.modules import rp_job
    from runpod.serverless.modules.rp_logger import RunPodLogger

    monkeypatch.setattr(RunPodLogger(), "level", "WARN")
    record = {"result": [], "stream": []}

    async def send_result(session, job_data, job, is_stream=False):
        record["result"].append(job_data)

    async def stream_result(session, job_data, job):
        record["stream"].append(job_data)

    monkeypatch.setattr(rp_job, "send_result", send_result)
    monkeypatch.setattr(rp_job, "stream_result", stream_result)
    return record


def handle(module, payload) -> None:
    from runpod.serverless.modules import rp_job

    asyncio.run(rp_job.handle_job(None, module.config, {"id": "cloud-1", "input": payload}))


def test_deployed_service_uses_the_streaming_handler(cloud_handler):
    assert cloud_handler.config["handler"] is cloud_handler.stream_handler
    assert cloud_handler.config["return_aggregate_stream"] is True
    assert cloud_handler.config["concurrency_modifier"](1) == 8


def test_deployed_service_fails_a_bad_job(cloud_handler, sent):
    handle(cloud_handler, {"text": "Hi.", "seed": -1})
    assert sent["stream"] == []
    (result,) = sent["result"]
    assert set(result) == {"error"} and "seed" in result["error"]  # FAILED, with the reason


def test_deployed_service_answers_a_good_job(cloud_handler, sent):
    handle(cloud_handler, {"text": "Hi.", "max_audio_length_ms": 160, "seed": 1})
    (result,) = sent["result"]
    assert set(result) == {"output"} and len(result["output"]) == 1
    check_wav(result["output"][0], 160)
    assert "stopPod" not in result


def test_deployed_service_streams_and_aggregates(cloud_handler, sent):
    handle(cloud_handler, {"text": "Hi.", "max_audio_length_ms": CAP_MS, "seed": 1,
                           "stream": True, "response_format": "pcm"})
    streamed = [item["output"] for item in sent["stream"]]
    (result,) = sent["result"]
    assert result["output"] == streamed
    check_stream(streamed, "pcm", CAP_MS)


def test_deployed_service_posts_a_long_jobs_progress(cloud_handler, sent, monkeypatch):
    """Each piece of a long whole job reaches RunPod's job-done route as IN_PROGRESS, through
    the SDK's own progress_update (its HTTP post to RunPod is the stand-in)."""
    from runpod.serverless.modules import rp_progress

    progress = []

    async def send_result(session, job_data, job, is_stream=False):
        progress.append((job["id"], job_data))

    monkeypatch.setattr(rp_progress, "send_result", send_result)
    monkeypatch.setenv("RUNPOD_WEBHOOK_GET_JOB", "http://127.0.0.1:9/unused")  # as deployed
    sentence = "The quick brown fox jumps over the lazy dog near the river bank at dawn. "
    handle(cloud_handler, {"text": (sentence * 6).strip(), "max_audio_length_ms": 80,
                           "seed": 2})
    (result,) = sent["result"]
    pieces = result["output"][0]["utterances"]
    deadline = time.monotonic() + 10  # each report is posted from a thread of its own
    while len(progress) < pieces - 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pieces >= 2 and sorted(data["output"]["pieces_done"] for _, data in progress) == \
        list(range(1, pieces))
    assert all(job_id == "cloud-1" and data["status"] == "IN_PROGRESS"
               and data["output"]["pieces"] == pieces for job_id, data in progress)


def test_deployed_service_asks_for_a_new_worker_after_a_gpu_fault(model_dir, sent):
    """The handler turns the worker's restart request into the SDK's `refresh_worker`, which
    RunPod reads as `stopPod`. Its own import: the fault is for good."""
    env = dict(LIMITS, CSM_MODEL_DIR=str(model_dir), CSM_DEVICE="cpu",
               RUNPOD_WEBHOOK_GET_JOB="http://127.0.0.1:9/unused")
    with imported_handler(env) as module:
        module.worker.engine.model.frame_step = lambda *a: (_ for _ in ()).throw(
            RuntimeError("CUDA error: an illegal memory access was encountered"))
        try:
            handle(module, {"text": "Hi.", "max_audio_length_ms": 160})
        finally:
            module.worker.engine.close()
    (result,) = sent["result"]
    assert result.get("stopPod") is True
    assert "the GPU failed" in result["error"] and "restarts" in result["error"]
