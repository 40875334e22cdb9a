"""Results too large to return, stored in a bucket and answered with a URL (worker/result_store.py).

The bucket is a stand-in (moto's S3 server, the `s3_endpoint` fixture); the worker's real
boto3 client uploads to it over HTTP and the tests fetch the presigned URLs it hands back
with plain HTTP GETs, as a caller would. The model is the tiny RANDOM-weight one: its audio is
noise, not speech; the tests check what is stored and returned, never how it sounds.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from dataclasses import replace
from urllib.parse import parse_qs, urlparse

import boto3
import pytest
import requests

from http_helpers import Server
from worker.http_app import Runtime, create_app
from worker.openai_api import openai_job
from worker.result_store import CHECK_BODY, CHECK_OBJECT, ResultStore
from worker.service import Worker
from worker.settings import BucketSettings, SettingsError, StartupError, load_settings
from worker_helpers import (REPO, SAMPLE_RATE, collect, decode_audio, decode_bytes, free_port,
                            handler_env, rp_api_server, run, start_up_error)

BUCKET = "csm-results"
SECRET = "s3cr3t-bucket-key"
LIMIT = 60_000  # CSM_MAX_RESULT_BYTES here
# 160 ms of wav is 7.7 kB (10 kB as base64): it fits. 1.6 s is 77 kB (102 kB as base64): it
# doesn't, and its worst case (1.6 s at wav's 48 kB/s) is refused without a bucket.
SMALL = {"text": "Small enough.", "max_audio_length_ms": 160, "seed": 3}
BIG = {"text": "Too big to return.", "max_audio_length_ms": 1600, "seed": 4}
SUMMARY = {"sample_rate", "duration_ms", "frames", "utterances", "seed", "stop_reason",
           "watermarked", "watermark_key_source", "timings"}
STORED = SUMMARY | {"audio_url", "audio_url_expires_at", "audio_bytes", "format", "media_type"}


def store_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="test-key-id", aws_secret_access_key=SECRET)


def bucket_env(endpoint: str, name: str = BUCKET, **extra: str) -> dict[str, str]:
    return {"CSM_BUCKET_NAME": name, "BUCKET_ENDPOINT_URL": endpoint,
            "BUCKET_ACCESS_KEY_ID": "test-key-id", "BUCKET_SECRET_ACCESS_KEY": SECRET,
            "CSM_BUCKET_REGION": "us-east-1", **extra}


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    client = store_client(s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def worker(tiny_model_dir, s3_endpoint, bucket) -> Worker:
    return Worker.start(load_settings({
        "CSM_MODEL_DIR": str(tiny_model_dir), "CSM_DEVICE": "cpu",
        "CSM_MAX_AUDIO_LENGTH_MS": "2400", "CSM_MAX_RESULT_BYTES": str(LIMIT),
        **bucket_env(s3_endpoint)}))


def one(worker, loop, payload) -> dict:
    (answer,) = run(loop, collect(worker, payload))
    return answer


def keys(bucket) -> list[str]:
    return [o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def fetched(answer: dict) -> bytes:
    """The audio behind a stored answer's URL, fetched as a caller would: no keys."""
    reply = requests.get(answer["audio_url"], timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["Content-Type"] == answer["media_type"]
    assert len(reply.content) == answer["audio_bytes"]
    return reply.content


# ---- the queue mode ------------------------------------------------------------------------
def test_a_whole_result_too_large_to_return_is_stored_and_fetched_by_its_url(
        worker, loop, bucket, monkeypatch):
    before = set(keys(bucket))
    answer = one(worker, loop, BIG)
    assert set(answer) == STORED, answer
    assert answer["audio_bytes"] * 4 / 3 > LIMIT and answer["watermarked"] is True
    assert answer["timings"]["upload_ms"] > 0
    raw = fetched(answer)
    audio, rate = decode_bytes(raw, "wav")
    assert rate == SAMPLE_RATE and len(audio) == answer["duration_ms"] * SAMPLE_RATE // 1000
    (key,) = set(keys(bucket)) - before
    today = dt.datetime.now(dt.timezone.utc)
    assert key.startswith(f"csm/{today:%Y-%m-%d}/") and key.endswith(".wav")
    expires = dt.datetime.fromisoformat(answer["audio_url_expires_at"])
    assert abs((expires - today).total_seconds() - 24 * 3600) < 60  # the default: a day
    # What the bucket holds is the response itself: the same job answered inline (the HTTP
    # mode has no size limit) carries the same file.
    monkeypatch.setattr(worker, "settings", replace(worker.settings, mode="http"))
    inline = one(worker, loop, BIG)
    assert "audio_url" not in inline
    assert decode_audio(inline)[0].tobytes() == audio.tobytes()


def test_a_result_that_fits_stays_inline(worker, loop, bucket):
    before = keys(bucket)
    answer = one(worker, loop, SMALL)
    assert "audio_base64" in answer and "audio_url" not in answer, answer
    assert keys(bucket) == before


def test_delivery_url_stores_even_a_small_result(worker, loop):
    answer = one(worker, loop, dict(SMALL, delivery="url", response_format="flac"))
    assert set(answer) == STORED and answer["media_type"] == "audio/flac"
    audio, _ = decode_bytes(fetched(answer), "flac")
    assert len(audio) == 160 * SAMPLE_RATE // 1000


def test_delivery_base64_keeps_the_limit_and_spends_no_gpu_time(worker, loop, monkeypatch):
    monkeypatch.setattr(worker.engine, "start", lambda *a: pytest.fail("the job was started"))
    error = one(worker, loop, dict(BIG, delivery="base64"))["error"]
    assert "over the 0.06 MB a queue job can return (CSM_MAX_RESULT_BYTES)" in error, error
    assert "delivery 'auto' or 'url'" in error


def test_a_streamed_job_keeps_the_limit_and_is_told_of_the_bucket(worker, loop):
    error = one(worker, loop, dict(BIG, stream=True))["error"]
    assert "CSM_MAX_RESULT_BYTES" in error and "goes to this worker's bucket" in error, error
    error = one(worker, loop, dict(SMALL, stream=True, delivery="url"))["error"]
    assert error.startswith("delivery: 'url' is for whole responses"), error
    error = one(worker, loop, dict(SMALL, delivery="ftp"))["error"]
    assert error.startswith("delivery: must be one of 'auto', 'base64' or 'url'"), error


def test_the_openai_route_of_the_queue_stores_too(worker, loop):
    job = {"openai_route": "/v1/audio/speech",
           "openai_input": {"model": "csm-1b", "input": BIG["text"], "response_format": "wav",
                            "max_audio_length_ms": 1600, "seed": 4}}
    (answer,) = run(loop, _items(openai_job(worker, job)))
    assert set(answer) == STORED, answer
    assert len(decode_bytes(fetched(answer), "wav")[0]) == answer["duration_ms"] * 24


async def _items(answers) -> list:
    return [a async for a in answers]


def test_a_failed_upload_is_one_clear_error_and_the_worker_carries_on(worker, loop, monkeypatch):
    gone = ResultStore(worker.results.client, replace(worker.results.settings, name="gone"))
    monkeypatch.setattr(worker, "results", gone)
    answer = one(worker, loop, BIG)
    assert answer == {"error": "the audio was made but could not be stored in bucket 'gone' "
                               "(no such bucket); retry the job"}, answer
    assert "audio_base64" in one(worker, loop, SMALL)


def test_without_a_bucket_the_limit_holds_and_url_is_refused(worker, loop, monkeypatch):
    monkeypatch.setattr(worker, "results", None)
    error = one(worker, loop, dict(SMALL, delivery="url"))["error"]
    assert error.startswith("delivery: 'url' needs a bucket, and this worker has none"), error
    assert "CSM_BUCKET_NAME" in error
    error = one(worker, loop, BIG)["error"]
    assert "CSM_MAX_RESULT_BYTES" in error and "give the worker a bucket" in error, error


# ---- the HTTP mode ---------------------------------------------------------------------------
def test_the_http_mode_stores_only_when_asked(worker, loop, monkeypatch):
    """Its responses have no size limit: auto answers inline; a URL only on request, also
    through the route, whose failed upload is a 500 with the same clear message."""
    settings = replace(worker.settings, mode="http")
    monkeypatch.setattr(worker, "settings", settings)
    assert "audio_base64" in one(worker, loop, BIG)
    with Server(create_app(Runtime(settings, worker)), 1 << 20) as server:
        reply = requests.post(f"{server.url}/v1/generate", json=dict(SMALL, delivery="url"),
                              timeout=60)
        assert reply.status_code == 200, reply.text
        assert set(reply.json()) == STORED
        assert len(decode_bytes(fetched(reply.json()), "wav")[0]) == 160 * 24
        monkeypatch.setattr(worker, "results", ResultStore(
            worker.results.client, replace(worker.results.settings, name="gone")))
        reply = requests.post(f"{server.url}/v1/generate", json=dict(SMALL, delivery="url"),
                              timeout=60)
        assert reply.status_code == 500
        assert reply.json() == {"error": "the audio was made but could not be stored in bucket "
                                         "'gone' (no such bucket); retry the job"}


# ---- the store itself ------------------------------------------------------------------------
def test_a_stored_result_has_a_signed_url_that_expires(s3_endpoint, bucket):
    store = ResultStore.connect(BucketSettings(
        name=BUCKET, endpoint_url=s3_endpoint, region="us-east-1",
        access_key_id="test-key-id", secret_access_key=SECRET, prefix="jobs/", url_ttl_s=600))
    # connecting wrote its check: a write is what the store needs (no right to list)
    check = bucket.get_object(Bucket=BUCKET, Key="jobs/" + CHECK_OBJECT)["Body"].read()
    assert check == CHECK_BODY
    stored = store.put(b"ID3 not really mp3", "mp3", "audio/mpeg")
    assert stored.key.startswith("jobs/") and stored.key.endswith(".mp3")
    query = parse_qs(urlparse(stored.url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Expires"] == ["600"]
    assert SECRET not in stored.url
    reply = requests.get(stored.url, timeout=30)
    assert reply.content == b"ID3 not really mp3" and reply.headers["Content-Type"] == "audio/mpeg"
    assert bucket.head_object(Bucket=BUCKET, Key=stored.key)["ContentLength"] == 18


def test_a_bucket_that_cant_be_used_stops_the_start_before_the_weights_load(
        tiny_model_dir, s3_endpoint, monkeypatch, caplog):
    monkeypatch.setattr("worker.service.load_engine",
                        lambda *a: pytest.fail("the weights loaded before the bucket answered"))
    message = start_up_error(tiny_model_dir, monkeypatch, caplog,
                             **bucket_env(s3_endpoint, name="no-such-bucket"))
    assert message.startswith("the worker cannot start: CSM_BUCKET_NAME: bucket "
                              f"'no-such-bucket' at {s3_endpoint} can't be used (no such "
                              "bucket)"), message
    assert SECRET not in message
    for bad, needle in [({"BUCKET_ENDPOINT_URL": "https://exa mple.com"}, "Invalid endpoint"),
                        ({"CSM_BUCKET_REGION": "us east"}, "region_name 'us east'"),
                        ({"CSM_BUCKET_NAME": "Bad_Bucket!"}, "Invalid bucket name")]:
        caplog.clear()
        message = start_up_error(tiny_model_dir, monkeypatch, caplog,
                                 **{**bucket_env(s3_endpoint), **bad})
        assert needle in message and "\n" not in message, message
    closed = f"http://127.0.0.1:{free_port()}"
    caplog.clear()
    message = start_up_error(tiny_model_dir, monkeypatch, caplog, **bucket_env(closed))
    assert f"bucket '{BUCKET}' at {closed} can't be used (Could not connect" in message, message


# ---- settings --------------------------------------------------------------------------------
def test_bucket_settings_are_read_with_their_defaults():
    assert load_settings({}).bucket is None
    bucket = load_settings({"CSM_BUCKET_NAME": "b", "CSM_BUCKET_PREFIX": "tts",
                            "BUCKET_ACCESS_KEY_ID": "id",
                            "BUCKET_SECRET_ACCESS_KEY": SECRET}).bucket
    assert bucket == BucketSettings(name="b", access_key_id="id", secret_access_key=SECRET,
                                    prefix="tts/", url_ttl_s=86400)
    assert SECRET not in repr(bucket)


@pytest.mark.parametrize("env, message", [
    ({"BUCKET_ENDPOINT_URL": "https://s3.example.com"},
     "BUCKET_ENDPOINT_URL is set but CSM_BUCKET_NAME is not"),
    ({"CSM_BUCKET_NAME": "b", "BUCKET_ENDPOINT_URL": "s3.example.com"},
     "BUCKET_ENDPOINT_URL must be an http(s) URL"),
    ({"CSM_BUCKET_NAME": "b", "BUCKET_ACCESS_KEY_ID": "id"},
     "BUCKET_SECRET_ACCESS_KEY is unset: give both bucket keys, or neither"),
    ({"CSM_BUCKET_NAME": "b", "BUCKET_SECRET_ACCESS_KEY": SECRET},
     "BUCKET_ACCESS_KEY_ID is unset"),
    ({"CSM_BUCKET_NAME": "b", "CSM_RESULT_URL_TTL_S": "604801"},
     "CSM_RESULT_URL_TTL_S must be at most 604800"),
    ({"CSM_BUCKET_NAME": "b", "CSM_RESULT_URL_TTL_S": "0"},
     "CSM_RESULT_URL_TTL_S must be a positive"),
])
def test_bucket_settings_that_cant_work_are_refused(env, message):
    with pytest.raises(SettingsError) as refused:
        load_settings(env)
    assert str(refused.value).startswith(message), refused.value
    assert SECRET not in str(refused.value) and isinstance(refused.value, StartupError)


# ---- the whole way: `python handler.py --rp_serve_api` and the README's client ----------------
def test_the_example_client_saves_a_stored_result(tiny_model_dir, s3_endpoint, bucket,
                                                  tmp_path):
    env = handler_env(tiny_model_dir, CSM_MAX_AUDIO_LENGTH_MS="1600",
                      CSM_MAX_RESULT_BYTES=str(LIMIT), CSM_LOG_LEVEL="WARNING",
                      RUNPOD_LOG_LEVEL="WARN", **bucket_env(s3_endpoint))
    with rp_api_server(env, tmp_path, tmp_path / "server.log") as url:
        (answer,) = requests.post(f"{url}/runsync", json={"input": BIG}, timeout=120).json()[
            "output"]
        assert set(answer) == STORED, answer
        done = subprocess.run(
            [sys.executable, str(REPO / "examples" / "client.py"), "--url", url, "--text",
             BIG["text"], "--seed", "4", "--out", "out.wav"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout[:done.stdout.rindex("}") + 1])
    assert "audio_url" in summary and summary["seed"] == 4
    saved = (tmp_path / "out.wav").read_bytes()
    assert saved == fetched(summary) and len(saved) == summary["audio_bytes"]
    assert len(decode_bytes(saved, "wav")[0]) == summary["duration_ms"] * 24
