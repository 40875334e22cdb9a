"""Random and malformed payloads against the worker: every job ends in one well-formed answer.

The property: whatever the `input`, the worker yields dicts that JSON can carry, and the last
is either {"error": <non-empty text>} (alone) or a response (audio_base64, or watermarked for
verify_watermark). Nothing raises out of `Worker.run`, no refusal is an "internal error"
(a payload the schema should have refused, or a crash), and a payload built valid succeeds.

Runs on the tiny RANDOM-weight model (noise, not speech) with tight limits, so the rare valid
generations are at most a few hundred milliseconds of audio.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import string
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.schema import FORMATS, VOICES
from worker.service import Worker
from worker.settings import load_settings
from worker_helpers import audio_b64, b64, collect, complete, imported_handler, run

CAP_MS = 240
LIMITS_ENV = {"CSM_MAX_AUDIO_LENGTH_MS": str(CAP_MS), "CSM_MAX_TEXT_CHARS": "400",
              "CSM_MAX_CONTEXT_TURNS": "2", "CSM_MAX_CONTEXT_SECONDS": "2",
              "CSM_MAX_REFERENCE_BYTES": "200000", "CSM_MAX_TURNS": "3",
              "CSM_MAX_CONCURRENCY": "2", "CSM_DEVICE": "cpu",
              # A clip of ~0.84 s or more sets off SilentCipher's phase-shift search, minutes
              # on this CPU: the fuzzing's time must not hang on which clips it draws.
              "CSM_MAX_VERIFY_SECONDS": "0.8"}
FUZZ = settings(max_examples=1500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def worker(tiny_model_dir) -> Worker:
    return Worker.start(load_settings(dict(LIMITS_ENV, CSM_MODEL_DIR=str(tiny_model_dir))))


# ---- audio the strategies pick from (made once) --------------------------------------------
CLIP_WAV = audio_b64(0.25, 16_000)  # under CSM_MAX_VERIFY_SECONDS
CLIP_OGG = audio_b64(0.3, 44_100, 2, "OGG")
CLIP_FLAC = audio_b64(0.2, 8_000, 1, "FLAC")
VALID_CLIPS = [CLIP_WAV, CLIP_OGG, CLIP_FLAC, "data:audio/wav;base64," + CLIP_WAV]
BAD_CLIPS = [
    audio_b64(0.25, 16_000, amplitude=0.0),  # silent
    audio_b64(2.5, 8_000),  # over CSM_MAX_CONTEXT_SECONDS and CSM_MAX_VERIFY_SECONDS
    "A" * 300_000,  # over CSM_MAX_REFERENCE_BYTES (checked before decoding)
    CLIP_WAV[:-7],  # truncated base64
    b64(base64.b64decode(CLIP_WAV)[:60]),  # a WAV header and almost no data
    b64(b"ID3\x03\x00garbage" * 10),
    "data:,", "data:audio/wav;base64,", "====", "",
]

# ---- strategies -----------------------------------------------------------------------------
WORDS = string.ascii_letters + string.digits + " .,!?'-" + "éüßçñ语言データ"
# Something to speak: at least one letter or digit (punctuation alone is refused).
valid_text = st.text(WORDS, min_size=1, max_size=40).filter(lambda s: any(c.isalnum() for c in s))
any_text = st.one_of(
    st.text(max_size=40),  # unicode, control characters, whitespace
    st.sampled_from(["", " ", "\n\t", "\x00", "\x1c", "\u2028", "\u200b", "\ufeff", "...",
                     "x" * 401, "Dr. Smith. 3.5 e.g. (ok.) \"Hi.\" Yes!"]),
)
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(),
              st.integers(min_value=-2**80, max_value=2**80), st.floats(),
              st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]),
              st.text(max_size=20), st.binary(max_size=20).map(b64)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
clip = st.one_of(st.sampled_from(VALID_CLIPS), st.sampled_from(BAD_CLIPS),
                 st.binary(max_size=200).map(b64), st.text(max_size=40), junk)
# Links refused before any connection (a loopback or private host, another scheme, not a URL):
# nothing here may wait on DNS or on a network this machine lacks.
LINKS = ["http://127.0.0.1:9/a.wav", "https://10.0.0.1/a.wav", "http://[::1]/a.wav",
         "file:///etc/passwd", "ftp://1.2.3.4/a", "https://", "http:// x", "a.wav", "",
         "http://x:abc/a.wav", "http://1.2.3.4:99999/a", "http://[::1/a.wav",
         "http://" + "a" * 64 + ".com/a.wav"]
link = st.one_of(st.sampled_from(LINKS), junk)


VALID = {
    "speaker": st.integers(0, 31),
    "voice": st.sampled_from(VOICES),
    "max_audio_length_ms": st.integers(80, CAP_MS),
    "temperature": st.floats(0.05, 2.0),
    "topk": st.integers(1, 256),
    "seed": st.integers(0, 2**32 - 1),
    "response_format": st.sampled_from(FORMATS),
    "stream": st.booleans(),
    "task": st.sampled_from(["generate", "verify_watermark"]),
    "delivery": st.sampled_from(["auto", "base64", "url"]),
}
EDGES = {
    "speaker": [-1, 32, 31.0, True, "0"],
    "voice": ["Conversational_A", "", "none "],
    "max_audio_length_ms": [79, CAP_MS + 1, 0, 80.0],
    "temperature": [0, 0.0, 2.0001, -1, "0.9", True],
    "topk": [0, 257, 50.0, False],
    "seed": [-1, 2**32, 2**64, 1.5],
    "response_format": ["WAV", "aac", "", "pcm16"],
    "stream": ["true", 1, 0],
    "task": ["verify", "", "Generate"],
    "delivery": ["URL", "", "s3", True],
}
FIELD = {k: st.one_of(VALID[k], junk, st.sampled_from(EDGES[k])) for k in VALID}
FIELD.update({"text": st.one_of(valid_text, any_text, junk),
              "input": st.one_of(valid_text, any_text, junk),
              "audio_base64": clip, "audio_url": link})
turn = st.fixed_dictionaries({"text": st.one_of(valid_text, any_text, junk),
                              "speaker": FIELD["speaker"]},
                             optional={"audio_base64": clip, "voice": junk})
FIELD["turns"] = st.one_of(st.lists(turn, max_size=4), junk)
context_item = st.fixed_dictionaries(
    {"text": st.one_of(valid_text, any_text, junk), "speaker": FIELD["speaker"],
     "audio_base64": clip},
    optional={"audio_url": link, "lang": junk, "seed": junk})
linked_item = st.fixed_dictionaries(
    {"text": valid_text, "speaker": FIELD["speaker"], "audio_url": link})
FIELD["context"] = st.one_of(st.lists(st.one_of(context_item, linked_item, junk), max_size=3),
                             junk)

random_dict = st.fixed_dictionaries({}, optional=FIELD).flatmap(
    lambda d: st.dictionaries(st.text(max_size=10), junk, max_size=2).map(
        lambda extra: {**extra, **d}))


@st.composite
def valid_payload(draw) -> dict:
    """A request the contract accepts, and short enough to run quickly."""
    if draw(st.integers(0, 9)) == 0:
        return {"task": "verify_watermark", "audio_base64": draw(st.sampled_from(VALID_CLIPS))}
    kind = draw(st.sampled_from(["text", "input", "turns"]))
    if kind == "turns":
        payload = {"turns": draw(st.lists(st.fixed_dictionaries(
            {"text": valid_text, "speaker": st.integers(0, 31)}), min_size=1, max_size=2))}
    else:
        payload = {kind: draw(valid_text)}
        if draw(st.booleans()):
            payload["speaker"] = draw(st.integers(0, 31))
    optional = {k: VALID[k] for k in ("voice", "temperature", "topk", "seed",
                                      "response_format", "stream")}
    payload.update(draw(st.fixed_dictionaries({}, optional=optional)))
    payload["max_audio_length_ms"] = draw(st.integers(80, 160))
    if draw(st.integers(0, 3)) == 0:
        payload["context"] = [{"text": draw(valid_text), "speaker": draw(st.integers(0, 31)),
                               "audio_base64": draw(st.sampled_from(VALID_CLIPS))}]
    return payload


@st.composite
def linked_payload(draw) -> dict:
    """A valid request but for its context clip, given as a link that must be refused."""
    payload = {"text": draw(valid_text), "max_audio_length_ms": 80,
               "context": [{"text": draw(valid_text), "speaker": draw(st.integers(0, 31)),
                            "audio_url": draw(st.sampled_from(LINKS))}]}
    return payload


@st.composite
def mutated(draw) -> dict:
    """A valid payload with one to three fields made invalid, removed or added."""
    payload = dict(draw(valid_payload()))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "replace", "replace", "remove", "unknown"]))
        if action == "replace":
            key = draw(st.sampled_from(sorted(FIELD)))
            bad = st.sampled_from(EDGES[key]) if key in EDGES else FIELD[key]
            payload[key] = draw(st.one_of(junk, bad))
        elif action == "remove" and payload:
            payload.pop(draw(st.sampled_from(sorted(payload))))
        else:
            payload[draw(st.text(min_size=1, max_size=10))] = draw(junk)
    return payload


def pick(choice: int) -> st.SearchStrategy:
    # one in 40 is built valid and most mutated ones are refused: valid generations stay
    # around one example in twenty, so that 1500 examples run in under a minute
    if choice == 0:
        return st.tuples(st.just("valid"), valid_payload())
    if choice == 1:
        return st.tuples(st.just("linked"), linked_payload())
    if choice <= 4:
        return st.tuples(st.just("junk"), junk)
    if choice <= 14:
        return st.tuples(st.just("random"), random_dict)
    return st.tuples(st.just("mutated"), mutated())


payloads = st.integers(0, 39).flatmap(pick)


def check_answer(items: list, payload) -> str:
    """The property, for one job's items; returns the outcome's name."""
    assert items, f"no answer for {payload!r}"
    json.dumps(items, allow_nan=False)  # the SDK must be able to send every item
    for item in items:
        assert isinstance(item, dict), item
    last = items[-1]
    if "error" in last:
        assert len(items) == 1, items
        assert set(last) == {"error"}, last  # refresh_worker only for GPU faults
        assert isinstance(last["error"], str) and last["error"].strip()
        assert not last["error"].startswith("internal error"), (payload, last)
        return "error"
    for item in items[:-1]:
        assert item.get("final") is False and "error" not in item, item
    if "watermarked" in last and "audio_base64" not in last:
        assert last == {"task": "verify_watermark", "watermarked": last["watermarked"]}
        assert isinstance(last["watermarked"], bool)
        return "verify"
    assert isinstance(last["audio_base64"], str) and last["audio_base64"]
    assert 0 < last["duration_ms"] and last["sample_rate"] == 24_000
    return "stream" if "chunk_index" in last else "audio"


def test_every_payload_gets_one_well_formed_answer(worker, loop):
    """The property over 1500 payloads, then a guard on the fuzzing itself: it generated
    audio, streamed, verified and refused (one test, so it holds however it is selected)."""
    stats: Counter = Counter()

    @FUZZ
    @given(case=payloads, whole=st.booleans())
    def one_payload(case, whole):
        kind, payload = case
        if whole:
            items = [run(loop, complete(worker, payload))]
        else:
            items = run(loop, collect(worker, payload))
        outcome = check_answer(items, payload)
        stats[f"{kind}:{outcome}"] += 1
        if kind == "linked":  # refused by field, whatever is wrong with the link
            assert outcome == "error" and items[-1]["error"].startswith("context[0]"), items
        if kind == "valid":
            assert outcome != "error", (payload, items[-1])
            if whole:
                assert "chunk_index" not in items[-1]
        # finished or refused: no job holds a slot once its answer is out
        assert worker.engine.scheduler.active_jobs == 0

    one_payload()
    print(dict(stats))
    total = sum(stats.values())
    assert total >= 1500
    generated = sum(v for k, v in stats.items() if k.endswith((":audio", ":stream")))
    assert generated >= 20 and stats["valid:audio"] >= 10
    assert sum(v for k, v in stats.items() if k.endswith(":stream")) >= 3
    assert sum(v for k, v in stats.items() if k.endswith(":verify")) >= 3
    assert sum(v for k, v in stats.items() if k.endswith(":error")) >= total // 2
    assert stats["linked:error"] >= 10
    # and the worker is still healthy afterwards
    r = run(loop, complete(worker, {"text": "After the storm.",
                                            "max_audio_length_ms": 160, "seed": 1}))
    assert "error" not in r and r["duration_ms"] == 160
    deadline = loop.time() + 5
    while worker.engine.scheduler.active_jobs and loop.time() < deadline:
        run(loop, asyncio.sleep(0.02))
    assert worker.engine.scheduler.active_jobs == 0


# ---- text that JSON can carry but Unicode can't -----------------------------------------------
@pytest.mark.parametrize("payload", [
    {"text": "Hi \ud800 there.", "max_audio_length_ms": 80},
    {"text": "Hi.", "max_audio_length_ms": 80,
     "context": [{"text": "\udfff", "speaker": 0, "audio_base64": CLIP_WAV}]},
])
def test_lone_surrogates_are_refused_by_field(worker, loop, payload):
    r = run(loop, complete(worker, payload))
    assert set(r) == {"error"}
    assert not r["error"].startswith("internal error"), r["error"]
    assert "text" in r["error"]


# ---- the handler's own functions --------------------------------------------------------------
@pytest.fixture(scope="module")
def handler_module(tiny_model_dir):
    """handler.py imported in-process (it loads settings and a Worker at import)."""
    with imported_handler(dict(LIMITS_ENV, CSM_MODEL_DIR=str(tiny_model_dir),
                               CSM_LOG_LEVEL="WARNING")) as module:
        yield module


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(case=payloads, with_input=st.integers(0, 9))
def test_handler_functions_answer_every_job(handler_module, loop, case, with_input):
    _, payload = case
    job = {"id": "fuzz", "input": payload} if with_input else {"id": "fuzz"}

    async def stream_all():
        return [item async for item in handler_module.stream_handler(job)]

    streamed = run(loop, stream_all())
    check_answer(streamed, payload)
    whole = run(loop, handler_module.test_input_handler(job))
    check_answer([whole], payload)
    if not with_input:
        assert "input must be a JSON object" in whole["error"]
    assert ("error" in whole) == ("error" in streamed[-1])
    assert handler_module.config.get("refresh_worker") is not True


def test_handler_answers_openai_jobs(handler_module, loop):
    """RunPod's /openai/v1 path: SSE strings when streamed, one native response otherwise."""
    body = {"model": "csm-1b", "input": "Hi.", "voice": "none", "response_format": "pcm",
            "stream_format": "sse", "max_audio_length_ms": 160, "seed": 1}
    job = {"id": "oa", "input": {"openai_route": "/v1/audio/speech", "openai_input": body}}

    async def stream_all():
        return [item async for item in handler_module.stream_handler(job)]

    events = run(loop, stream_all())
    assert events and all(isinstance(e, str) and e.startswith("data: ") for e in events)
    done = json.loads(events[-1][len("data: "):])
    assert done["type"] == "speech.audio.done" and done["duration_ms"] == 160
    whole = run(loop, handler_module.test_input_handler(job))
    assert whole["format"] == "pcm" and whole["duration_ms"] == 160 and whole["seed"] == 1
