"""The worker end to end on the tiny RANDOM-weight model (its audio is noise, not speech).

One Worker for the module, on the tiny folder (its random Mimi codebooks make different codes
give different audio). Audio is kept short (mostly 160-480 ms per request; the limit CAP_MS is for the default request and the
streaming tests) so each job takes a fraction of a second on a CPU.
"""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from csm.text_split import split_text
from csm.watermark import WATERMARK_SAMPLE_RATE, WatermarkStream
from worker.audio_io import MAX_BYTES_PER_SECOND, encode_audio
from worker.clip_codes import ClipCodes
from worker.schema import parse_request
from worker.service import PIECE_CHARS, Worker
from worker.settings import SettingsError, load_settings
from worker.stream_encoder import StreamEncoder
from worker_helpers import (PRIMING_SAMPLES, REPO, SAMPLE_RATE, SAMPLES_PER_FRAME,
                            assert_same_audio, audio_b64, audio_file, b64, collect, complete,
                            decode_audio, decode_bytes, decode_with_ffmpeg, run,
                            stream_wav_frames)

CAP_MS = 2400  # CSM_MAX_AUDIO_LENGTH_MS: 30 frames, over two periods of the watermark
CONTEXT_SECONDS = 30
REFERENCE_BYTES = 1_500_000
SUMMARY = {"sample_rate", "duration_ms", "frames", "utterances", "seed", "stop_reason",
           "watermarked", "watermark_key_source", "timings"}
TIMINGS = {"first_audio_ms", "first_decoded_ms", "generate_ms", "watermark_ms", "encode_ms",
           "total_ms", "real_time_factor", "load_ms"}
RESPONSE = SUMMARY | {"audio_base64", "format", "media_type"}
CHUNK = {"chunk_index", "sample_offset", "samples", "format", "sample_rate", "audio_base64",
         "final"}


@pytest.fixture(scope="module")
def worker(tiny_model_dir) -> Worker:
    model_dir = tiny_model_dir
    settings = load_settings({
        "CSM_MODEL_DIR": str(model_dir), "CSM_DEVICE": "cpu",
        "CSM_MAX_AUDIO_LENGTH_MS": str(CAP_MS), "CSM_MAX_CONCURRENCY": "8",
        "CSM_MAX_CONTEXT_SECONDS": str(CONTEXT_SECONDS),
        "CSM_MAX_REFERENCE_BYTES": str(REFERENCE_BYTES), "CSM_MAX_TEXT_CHARS": "3000"})
    return Worker.start(settings)


def one(worker, loop, payload) -> dict:
    """A non-streamed job yields exactly one item."""
    items = run(loop, collect(worker, payload))
    assert len(items) == 1, items
    return items[0]


def good(worker, loop, payload) -> dict:
    r = one(worker, loop, payload)
    assert "error" not in r, r
    assert set(r) == RESPONSE, set(r) ^ RESPONSE
    return r


def refused(worker, loop, payload, *needles) -> str:
    r = one(worker, loop, payload)
    assert set(r) == {"error"}, r
    for needle in needles:
        assert needle in r["error"], (needle, r["error"])
    still_works(worker, loop)
    return r["error"]


def still_works(worker, loop):
    r = good(worker, loop, {"text": "Still here.", "max_audio_length_ms": 160, "seed": 9})
    assert r["duration_ms"] == 160


def check_length(r: dict, ms: int) -> np.ndarray:
    """The response's audio decodes to the announced length (and `ms` was asked); AAC adds
    its encoder's priming."""
    audio, rate = decode_audio(r)
    assert rate == r["sample_rate"] == SAMPLE_RATE
    assert r["duration_ms"] == ms and r["frames"] * SAMPLES_PER_FRAME == ms * 24
    extra = len(audio) - ms * 24
    assert 0 <= extra <= (PRIMING_SAMPLES["aac"] if r["format"] == "aac" else 0), extra
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0
    return audio


# ---- happy paths ---------------------------------------------------------------------------
def test_default_request(worker, loop):
    r = good(worker, loop, {"text": "Hello from the tiny model."})
    assert (r["format"], r["media_type"], r["sample_rate"]) == ("wav", "audio/wav", 24000)
    raw = base64.b64decode(r["audio_base64"])
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE"
    # no max_audio_length_ms: 3 s + 100 ms per character, clamped to the operator's limit
    check_length(r, CAP_MS)
    assert r["utterances"] == 1 and r["stop_reason"] == "max_length"
    assert r["watermarked"] is True and r["watermark_key_source"] == "deployment"
    assert 0 <= r["seed"] < 2**32
    t = r["timings"]
    assert set(t) == TIMINGS and all(v >= 0 for v in t.values()), t
    assert t["total_ms"] > 0 and t["load_ms"] > 0 and t["watermark_ms"] > 0
    # one meaning: decoded, then all generated, then the whole file ready (= the end)
    assert t["first_decoded_ms"] <= t["generate_ms"] <= t["first_audio_ms"] <= t["total_ms"]


@pytest.mark.parametrize("fmt,media", [("wav", "audio/wav"), ("flac", "audio/flac"),
                                       ("ogg", "audio/ogg"), ("opus", "audio/ogg; codecs=opus"),
                                       ("mp3", "audio/mpeg"), ("aac", "audio/aac"),
                                       ("pcm", "audio/L16; rate=24000; channels=1")])
def test_every_response_format_decodes(worker, loop, fmt, media):
    r = good(worker, loop, {"text": "Formats.", "max_audio_length_ms": 240, "seed": 1,
                            "response_format": fmt})
    assert (r["format"], r["media_type"]) == (fmt, media)
    check_length(r, 240)
    if fmt == "pcm":
        assert len(base64.b64decode(r["audio_base64"])) == 2 * 240 * SAMPLE_RATE // 1000


def test_lossless_formats_carry_the_same_samples(worker, loop):
    payload = {"text": "Same.", "max_audio_length_ms": 160, "seed": 77}
    wav, _ = decode_audio(good(worker, loop, payload))
    flac, _ = decode_audio(good(worker, loop, dict(payload, response_format="flac")))
    pcm, _ = decode_audio(good(worker, loop, dict(payload, response_format="pcm")))
    # the same 16-bit samples, give or take rounding (libsndfile scales by 32768 on the way
    # in and out, pcm is written with 32767): within two steps
    step = 2.01 / 32767
    assert np.allclose(wav, flac, rtol=0, atol=step) and np.allclose(wav, pcm, rtol=0, atol=step)
    assert np.abs(wav).max() > 100 * step


def test_seed_reproducibility(worker, loop):
    payload = {"text": "Seeded.", "max_audio_length_ms": 240, "seed": 1234}
    a = good(worker, loop, payload)
    b = good(worker, loop, payload)
    c = good(worker, loop, dict(payload, seed=1235))
    assert a["seed"] == b["seed"] == 1234 and c["seed"] == 1235
    assert a["audio_base64"] == b["audio_base64"]
    assert a["audio_base64"] != c["audio_base64"]


def test_without_a_seed_one_is_drawn_and_reported(worker, loop):
    payload = {"text": "Unseeded.", "max_audio_length_ms": 160}
    a, b = good(worker, loop, payload), good(worker, loop, payload)
    assert a["seed"] != b["seed"]  # 1 in 2**32 to collide
    again = good(worker, loop, dict(payload, seed=a["seed"]))
    assert again["audio_base64"] == a["audio_base64"]


def test_input_alias_gives_the_same_audio_as_text(worker, loop):
    payload = {"max_audio_length_ms": 160, "seed": 5}
    a = good(worker, loop, dict(payload, text="Alias."))
    b = good(worker, loop, dict(payload, input="Alias."))
    assert a["audio_base64"] == b["audio_base64"]


def test_temperature_and_topk_reach_the_sampler(worker, loop):
    payload = {"text": "Sampling.", "max_audio_length_ms": 160, "seed": 3}
    base = good(worker, loop, payload)["audio_base64"]
    greedy = good(worker, loop, dict(payload, topk=1))["audio_base64"]
    hot = good(worker, loop, dict(payload, temperature=2.0))["audio_base64"]
    assert len({base, greedy, hot}) == 3
    # topk=1 is greedy: the seed no longer matters
    assert good(worker, loop, dict(payload, topk=1, seed=4))["audio_base64"] == greedy


@pytest.mark.parametrize("payload,speaker,preset", [
    ({}, 0, "conversational_a"),
    ({"voice": "conversational_a"}, 0, "conversational_a"),
    ({"voice": "conversational_b"}, 1, "conversational_b"),
    ({"voice": "none"}, 0, None),
    ({"voice": "conversational_b", "speaker": 7}, 7, "conversational_b"),
    ({"voice": "none", "speaker": 31}, 31, None),
    ({"speaker": 2}, 2, "conversational_a"),
])
def test_voice_and_speaker_plan(worker, payload, speaker, preset):
    plan = worker.plan(parse_request(dict(payload, text="Plan.", max_audio_length_ms=160),
                                     worker.settings.limits))
    assert plan.speaker == speaker
    expected = () if preset is None else (worker.presets[preset],)
    assert plan.context == expected


def test_voices_generate_and_differ(worker, loop):
    payload = {"text": "Voices.", "max_audio_length_ms": 160, "seed": 11}
    out = {}
    for voice in ("conversational_a", "conversational_b", "none"):
        r = good(worker, loop, dict(payload, voice=voice))
        check_length(r, 160)
        out[voice] = r["audio_base64"]
    assert len(set(out.values())) == 3  # three different prompts
    # (a speaker id alone is one token in a long prompt: on random weights it may or may not
    # change the frames, so speakers are checked on the plan above)
    r = good(worker, loop, dict(payload, voice="conversational_b", speaker=7))
    check_length(r, 160)
    # the default voice is conversational_a with its speaker 0
    assert good(worker, loop, payload)["audio_base64"] == out["conversational_a"]


@pytest.mark.parametrize("fmt,rate,channels", [("WAV", 44_100, 2), ("FLAC", 16_000, 1),
                                               ("OGG", 48_000, 2)])
def test_context_voice_cloning(worker, loop, fmt, rate, channels):
    clip = audio_b64(1.0, rate, channels, fmt)
    ctx = [{"text": "A reference line.", "speaker": 4, "audio_base64": clip}]
    payload = {"text": "Cloned.", "speaker": 4, "max_audio_length_ms": 160, "seed": 21}
    r = good(worker, loop, dict(payload, context=ctx))
    check_length(r, 160)
    plan = worker.plan(parse_request(dict(payload, context=ctx), worker.settings.limits))
    assert len(plan.context) == 1 and plan.context[0].speaker == 4  # voice none with context
    assert plan.context[0].codes.shape[1] == 13  # 1 s at 12.5 frames/s, rounded up
    bare = good(worker, loop, dict(payload, voice="none"))
    assert bare["audio_base64"] != r["audio_base64"]  # the context reached the prompt
    with_a = worker.plan(parse_request(dict(payload, context=ctx, voice="conversational_a"),
                                       worker.settings.limits))
    assert with_a.context[0] is worker.presets["conversational_a"] and len(with_a.context) == 2


def test_context_accepts_a_data_url(worker, loop):
    url = "data:audio/wav;base64," + audio_b64(0.5, 22_050)
    r = good(worker, loop, {"text": "Data URL.", "max_audio_length_ms": 160, "seed": 1,
                            "context": [{"text": "Ref.", "speaker": 0, "audio_base64": url}]})
    check_length(r, 160)


# ---- refusals through the worker ----------------------------------------------------------
def ctx(audio_base64: str, text: str = "Reference.") -> dict:
    return {"text": text, "speaker": 0, "audio_base64": audio_base64}


def job(*context) -> dict:
    return {"text": "After a refusal.", "max_audio_length_ms": 160, "seed": 1,
            "context": list(context)}


def test_schema_refusal_through_the_worker(worker, loop):
    refused(worker, loop, {"text": "Hi.", "topk": 0, "tempo": 1}, "topk", "1", "tempo",
            "unknown field")
    refused(worker, loop, {"text": "Hi.", "max_audio_length_ms": CAP_MS + 1},
            f"max_audio_length_ms: {CAP_MS + 1}; the limit is {CAP_MS}")
    refused(worker, loop, None, "input must be a JSON object")


def test_invalid_base64(worker, loop):
    refused(worker, loop, job(ctx("this is *not* base64!")), "context[0].audio_base64",
            "not valid base64")


def test_non_audio_bytes(worker, loop):
    refused(worker, loop, job(ctx(b64(b"definitely not a sound file " * 40))),
            "context[0].audio_base64", "not a readable audio file")


def test_silent_audio(worker, loop):
    silent = audio_b64(1.0, 24_000, amplitude=0.0)
    refused(worker, loop, job(ctx(audio_b64(0.5)), ctx(silent)), "context[1].audio_base64",
            "silent")


def test_audio_with_nan_samples(worker, loop):
    """A float WAV may carry NaN: Mimi would turn it into NaN codes' noise, or worse."""
    samples = np.full(24_000, 0.25, dtype=np.float32)
    samples[100] = np.nan
    buffer = io.BytesIO()
    sf.write(buffer, samples, 24_000, format="WAV", subtype="FLOAT")
    refused(worker, loop, job(ctx(b64(buffer.getvalue()))), "context[0].audio_base64",
            "NaN or infinite samples")


def test_empty_audio(worker, loop):
    refused(worker, loop, job(ctx(audio_b64(0.0, 24_000))), "context[0].audio_base64",
            "empty")


def test_a_one_sample_clip_is_too_short_not_silent(worker, loop):
    one_sample = b64(audio_file(1 / 24_000, 24_000, amplitude=0.5))
    err = refused(worker, loop, job(ctx(one_sample)), "context[0].audio_base64",
                  "0.04 ms long", "the minimum is 80 ms")
    assert "silent" not in err


def test_unreadable_audio_error_carries_no_python_repr(worker, loop):
    err = refused(worker, loop, job(ctx(b64(b"RIFF but not a wave file" * 30))),
                  "context[0].audio_base64", "not a readable audio file")
    assert "0x" not in err and "<" not in err and "BytesIO" not in err


def test_mp3_context_is_accepted_as_the_readme_and_errors_say(worker, loop):
    from worker.audio_io import READABLE_FORMATS

    clip = audio_b64(1.0, 44_100, 1, "MP3", subtype="MPEG_LAYER_III")
    r = good(worker, loop, {"text": "From an MP3.", "max_audio_length_ms": 160, "seed": 2,
                            "context": [ctx(clip)]})
    check_length(r, 160)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "MP3" in READABLE_FORMATS and READABLE_FORMATS in readme


@pytest.mark.parametrize("text,needle", [
    ("\u0000\u0000", "control character U+0000"),
    ("Hello\u0007 there", "control character U+0007"),
    ("... !!! ???", "nothing to speak"),
    ("\U0001F600\U0001F600", "nothing to speak"),
])
def test_text_with_nothing_speakable_is_refused(worker, loop, text, needle):
    refused(worker, loop, {"text": text}, "text", needle)
    refused(worker, loop, {"turns": [{"text": "Fine.", "speaker": 0},
                                     {"text": text, "speaker": 1}]}, "turns[1].text", needle)


def test_line_breaks_and_tabs_are_fine(worker, loop):
    r = good(worker, loop, {"text": "Line one.\r\n\tLine two.", "max_audio_length_ms": 160})
    check_length(r, 160)


def test_context_seconds_add_up_over_turns(worker, loop):
    refused(worker, loop, job(ctx(audio_b64(16, 8000)), ctx(audio_b64(15, 8000))),
            "context[1].audio_base64", "adds up to 31.0 s", f"the limit is {CONTEXT_SECONDS} s",
            "CSM_MAX_CONTEXT_SECONDS")


def test_too_many_reference_bytes(worker, loop):
    big = audio_file(8.5, 48_000, 2)  # 1.63 MB
    assert len(big) > REFERENCE_BYTES
    refused(worker, loop, job(ctx(b64(big))), "context[0].audio_base64",
            f"the limit is {REFERENCE_BYTES} bytes", "CSM_MAX_REFERENCE_BYTES")


def test_reference_bytes_add_up_over_turns(worker, loop):
    half = audio_b64(4.5, 48_000, 2)  # about 0.86 MB each: the second is over the budget
    refused(worker, loop, job(ctx(half), ctx(half)), "context[1].audio_base64",
            "CSM_MAX_REFERENCE_BYTES")


def test_prompt_too_long_for_the_window(worker, loop):
    # 20 s of audio (250 frames) and long transcripts (each within the text limit): well over
    # 2048 positions
    words = "and then we talked about it for a long time " * 66
    turns = [ctx(audio_b64(20, 8000), words)] + [ctx(audio_b64(0.2, 8000), words)] * 2
    err = refused(worker, loop, job(*turns), "positions", "2048", "max_audio_length_ms=160")
    assert "shorten the context" in err


def test_watermark_fields_are_refused_unless_the_operator_allows_them(worker, loop):
    refused(worker, loop, {"text": "Hi.", "watermark": False}, "watermark:",
            "CSM_ALLOW_WATERMARK_OVERRIDE")
    refused(worker, loop, {"text": "Hi.", "watermark_key": [1, 2, 3, 4, 5]}, "watermark_key:",
            "CSM_ALLOW_WATERMARK_OVERRIDE")
    refused(worker, loop, {"task": "verify_watermark", "audio_base64": audio_b64(0.3),
                           "watermark_key": [1, 2, 3, 4, 5]}, "watermark_key:",
            "CSM_ALLOW_WATERMARK_OVERRIDE")


@pytest.mark.parametrize("error, answer", [
    (RuntimeError("CUDA error: an illegal memory access was encountered"),
     {"error": "a GPU fault ended this job; the worker restarts, retry it",
      "refresh_worker": True}),
    (ValueError("an unforeseen bug"),
     {"error": "internal error (ValueError); the job was not completed"}),
], ids=["cuda-error", "bug"])
def test_a_fault_outside_the_frame_loop_is_one_clear_answer(worker, loop, monkeypatch,
                                                            error, answer):
    """Mimi encoding a caller's reference clip runs outside the frame loop: a CUDA error
    there asks RunPod for a fresh worker all the same; any other fault is one {"error"}
    naming its kind (never its text: it may quote the caller's data), and the worker goes on."""
    def fails(*args):
        raise error

    monkeypatch.setattr(worker.engine.codec, "encode", fails)
    clip = audio_b64(0.5, 24_000)
    assert one(worker, loop, job({"text": "Ref.", "speaker": 0, "audio_base64": clip})) == answer
    monkeypatch.undo()
    still_works(worker, loop)


@pytest.mark.parametrize("fmt", sorted(MAX_BYTES_PER_SECOND))
def test_no_encoder_exceeds_the_bytes_per_second_a_result_is_sized_by(fmt):
    """The queue mode refuses a job from its worst case (below): that holds only while no
    format encodes to more than MAX_BYTES_PER_SECOND, whole or streamed. White noise at full
    scale is the hardest input for a codec."""
    noise = (torch.rand(3 * SAMPLE_RATE, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    encoder = StreamEncoder(fmt, SAMPLE_RATE)
    streamed = sum(len(encoder.push(noise[i:i + 7680])) for i in range(0, len(noise), 7680))
    streamed += len(encoder.close())
    whole = len(encode_audio(noise, SAMPLE_RATE, fmt))
    header = 1_000  # a container's header and an encoder's priming
    assert max(whole, streamed) <= 3 * MAX_BYTES_PER_SECOND[fmt] + header, (whole, streamed)


def test_a_queue_job_whose_result_could_outgrow_runpods_limit_is_refused_at_once(
        worker, loop, monkeypatch):
    """RunPod's API refuses a job's result over about 20 MB, and the audio made for it is then
    lost: the queue mode refuses such a job before spending GPU time on it, from its worst
    case (every piece at its max_audio_length_ms, the format's most bytes per second), and
    says what to change. The HTTP mode streams without the limit."""
    limits = replace(worker.settings.limits, max_result_bytes=200_000)
    monkeypatch.setattr(worker, "settings", replace(worker.settings, limits=limits))
    started = worker.engine.start
    monkeypatch.setattr(worker.engine, "start", lambda *a: pytest.fail("the job was started"))
    turns = [{"text": f"Turn {i}.", "speaker": 0} for i in range(4)]  # up to 4 x 0.8 s
    big = {"turns": turns, "max_audio_length_ms": 800, "seed": 1, "response_format": "wav"}
    for payload in (big, dict(big, stream=True)):
        (answer,) = run(loop, collect(worker, payload))
        error = answer["error"]
        assert error.startswith("response_format: 3 s of wav audio at most"), error
        assert "0.208 MB as base64, over the 0.2 MB a queue job can return" in error, error
        assert "CSM_MAX_RESULT_BYTES" in error and "mp3 or opus" in error
    monkeypatch.setattr(worker.engine, "start", started)
    small = good(worker, loop, dict(big, response_format="opus"))  # 3.2 s of opus: 27 kB
    assert len(small["audio_base64"]) < limits.max_result_bytes
    monkeypatch.setattr(worker, "settings", replace(worker.settings, mode="http"))
    assert "audio_base64" in one(worker, loop, dict(big, max_audio_length_ms=160))


# ---- callers' reference clips, kept ---------------------------------------------------------
@pytest.fixture
def encodes(worker, monkeypatch):
    """A fresh cache of two clips, and a count of the Mimi encodes the worker runs."""
    monkeypatch.setattr(worker, "clip_codes", ClipCodes(2))
    calls = []
    encode = worker.engine.encode
    monkeypatch.setattr(worker.engine, "encode", lambda *a: calls.append(1) or encode(*a))
    return calls


def cloned(clip: str, text: str = "Reference.", speaker: int = 0) -> dict:
    return {"text": "Cloned.", "max_audio_length_ms": 160, "seed": 4,
            "context": [{"text": text, "speaker": speaker, "audio_base64": clip}]}


def test_a_clip_sent_again_is_not_encoded_again(worker, loop, encodes):
    clip = audio_b64(0.6, 22_050)
    first = good(worker, loop, cloned(clip))
    assert len(encodes) == 1
    again = good(worker, loop, cloned(clip))
    assert len(encodes) == 1 and again["audio_base64"] == first["audio_base64"]
    # the codes are the audio's alone: another transcript or speaker with the same file hits
    good(worker, loop, cloned(clip, text="Other words.", speaker=3))
    assert len(encodes) == 1
    worker.clip_codes = ClipCodes(0)  # no cache: encoded every time, the same audio
    assert good(worker, loop, cloned(clip))["audio_base64"] == first["audio_base64"]
    assert len(encodes) == 2


def test_the_clip_cache_keeps_the_latest_and_no_refused_clip(worker, loop, encodes):
    a, b, c = (audio_b64(0.3, 16_000, amplitude=x) for x in (0.2, 0.3, 0.4))
    for clip in (a, b, a, c):  # c pushes out b, the least recently used
        good(worker, loop, cloned(clip))
    assert len(encodes) == 3 and len(worker.clip_codes) == 2
    good(worker, loop, cloned(a))
    good(worker, loop, cloned(b))
    assert len(encodes) == 4
    silent = audio_b64(0.3, 16_000, amplitude=0.0)
    for _ in range(2):  # refused for the same reason every time, never kept
        refused(worker, loop, cloned(silent), "context[0].audio_base64: the audio is silent")
    assert len(worker.clip_codes) == 2


def test_the_clip_cache_benchmark_runs(tiny_model_dir):
    """`python -m bench.clip_cache`, which BENCHMARKS.md quotes, still runs and reports both."""
    done = subprocess.run([sys.executable, "-m", "bench.clip_cache", "--model-dir",
                           str(tiny_model_dir), "--reps", "1", "--seconds", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if " ms (medians of 1" in line]
    assert [line.split(":")[0] for line in lines] == ["encoded each time", "codes kept"], lines


def test_the_clip_cache_size_is_the_operators():
    assert load_settings({}).clip_cache_entries == 64
    assert load_settings({"CSM_CLIP_CACHE_ENTRIES": "0"}).clip_cache_entries == 0
    for setting in ("CSM_CLIP_CACHE_ENTRIES", "CSM_MAX_QUEUED"):
        with pytest.raises(SettingsError) as refused_setting:
            load_settings({setting: "-1"})
        assert str(refused_setting.value) == (f"{setting} must be a whole number (0 or more), "
                                              "got '-1'")


# ---- verify_watermark ----------------------------------------------------------------------
# Clips stay under 0.84 s here: on longer ones SilentCipher's phase-shift search runs its
# decoder 205 times over the whole clip, minutes per second of audio on this CPU.
def test_verify_reads_at_most_its_limit_of_audio(worker, loop):
    # 10.5 s of WAV at 8 kHz is 168 kB, well inside CSM_MAX_REFERENCE_BYTES: the length decides
    for clip in (audio_b64(10.5, 8_000), audio_b64(12, 44_100, 2, "OGG")):
        refused(worker, loop, {"task": "verify_watermark", "audio_base64": clip},
                "audio_base64:", "s of audio", "at most 10 s", "CSM_MAX_VERIFY_SECONDS")


def test_verify_watermark(worker, loop):
    made = good(worker, loop, {"text": "Mark.", "max_audio_length_ms": 240, "seed": 2})
    r = one(worker, loop, {"task": "verify_watermark", "audio_base64": made["audio_base64"]})
    assert set(r) == {"task", "watermarked"} and r["task"] == "verify_watermark"
    assert isinstance(r["watermarked"], bool)
    r = one(worker, loop, {"task": "verify_watermark",
                           "audio_base64": audio_b64(0.5, 44_100, 2, "FLAC")})
    assert set(r) == {"task", "watermarked"} and isinstance(r["watermarked"], bool)
    refused(worker, loop, {"task": "verify_watermark", "audio_base64": b64(b"nope" * 50)},
            "audio_base64", "not a readable audio file")


# ---- streaming -----------------------------------------------------------------------------
# Streamed audio is watermarked in periods of the key (21 hops at 44.1 kHz, ~0.975 s), the
# first one also at fixed points before its end (csm.watermark.WatermarkStream.FIRST_PERIOD:
# 4 and 11 hops), so chunks end there, less what the resamplers hold: the first with the first
# block, the last with the rest (README, "Chunk sizes and the watermark").
def mark_points(samples: int) -> np.ndarray:
    """Where the stream's chunks may end, in samples at 24 kHz, up to `samples`."""
    period = WatermarkStream.PERIOD
    at_44k = ([leaves for _, leaves in WatermarkStream.FIRST_PERIOD]
              + [p * period for p in range(2, samples // 20_000 + 2)])
    points = np.array(at_44k) * SAMPLE_RATE / WATERMARK_SAMPLE_RATE
    return points[points <= samples]


def stream(worker, loop, payload) -> list[dict]:
    items = run(loop, collect(worker, dict(payload, stream=True)))
    assert items and "error" not in items[-1], items[-1]
    for i, item in enumerate(items):
        assert set(item) == (CHUNK if i < len(items) - 1 else CHUNK | SUMMARY | {"chunks"})
        assert item["chunk_index"] == i and item["final"] is (i == len(items) - 1)
        assert item["format"] == payload.get("response_format", "wav")
        assert item["sample_rate"] == SAMPLE_RATE
    offsets = np.cumsum([0] + [item["samples"] for item in items])
    assert [item["sample_offset"] for item in items] == list(offsets[:-1])
    last = items[-1]
    assert last["chunks"] == len(items)
    assert last["duration_ms"] == 1000 * offsets[-1] / SAMPLE_RATE
    assert last["frames"] * SAMPLES_PER_FRAME == offsets[-1]
    return items


def stream_bytes(items) -> bytes:
    return b"".join(base64.b64decode(i["audio_base64"], validate=True) for i in items)


def test_stream_chunks_end_at_the_watermarks_marking_points(worker, loop):
    payload = {"text": "Streaming.", "max_audio_length_ms": CAP_MS, "seed": 8,
               "response_format": "pcm"}
    items = stream(worker, loop, payload)
    sizes = [i["samples"] for i in items]
    assert sum(sizes) == CAP_MS * 24
    ends = np.cumsum(sizes[:-1])
    points = mark_points(CAP_MS * 24)
    # every chunk ends at a point, less what the resamplers still hold (under 1,000 samples)
    held = points[:len(ends)] - ends  # chunk i ends at point i
    assert len(ends) == len(points) == 4 and ((held > 0) & (held < 1000)).all(), (ends, points)
    assert sizes[0] < 0.2 * SAMPLE_RATE  # the first block's 4 hops, not a period
    last = items[-1]
    assert last["duration_ms"] == CAP_MS and last["seed"] == 8 and last["utterances"] == 1
    assert last["watermarked"] is True and last["stop_reason"] == "max_length"
    assert 0 < last["timings"]["first_audio_ms"] < last["timings"]["total_ms"]
    # the same audio as the job answered whole, but for the watermark's own residual
    streamed, _ = decode_bytes(stream_bytes(items), "pcm")
    whole, _ = decode_audio(good(worker, loop, payload))
    assert len(streamed) == len(whole)
    assert np.abs(streamed - whole).max() < 0.05 * np.abs(whole).max()


def test_short_stream_is_one_final_chunk(worker, loop):
    # 3 frames: short of the watermark's first marking point (6 hops at 44.1 kHz, ~3.6 frames)
    items = stream(worker, loop, {"text": "Short.", "max_audio_length_ms": 240, "seed": 8})
    assert len(items) == 1 and items[0]["samples"] == 240 * 24
    raw = stream_bytes(items)
    assert len(stream_wav_frames(raw)) == 240 * 24


@pytest.mark.parametrize("fmt", ["wav", "pcm", "ogg", "opus", "flac", "mp3", "aac"])
def test_streamed_bytes_make_one_file_of_the_announced_length(worker, loop, fmt):
    payload = {"text": "Whole file.", "max_audio_length_ms": 1120, "seed": 4,
               "response_format": fmt}
    items = stream(worker, loop, payload)
    assert len(items) == 4  # to the first period's points at 4, 11 and 21 hops, the rest
    raw = stream_bytes(items)
    total = items[-1]["sample_offset"] + items[-1]["samples"]
    assert total == 1120 * 24
    # FFmpeg's streams have no length header (FLAC says "unknown"): FFmpeg reads them
    audio, rate = (decode_with_ffmpeg(raw) if fmt in ("flac", "mp3", "aac")
                   else decode_bytes(raw, fmt))
    assert rate == SAMPLE_RATE
    assert 0 <= len(audio) - total <= PRIMING_SAMPLES.get(fmt, 0), (len(audio), total)
    if fmt == "wav":
        assert len(stream_wav_frames(raw)) == total
    if fmt == "pcm":
        assert len(raw) == 2 * total


def test_run_without_streaming_answers_a_streamed_request_whole(worker, loop):
    r = run(loop, complete(worker, {"text": "Whole.", "max_audio_length_ms": 240, "seed": 6,
                                    "stream": True}))
    assert set(r) == RESPONSE
    check_length(r, 240)


# ---- several utterances --------------------------------------------------------------------
def test_dialogue_turns(worker, loop):
    r = good(worker, loop, {"turns": [{"text": "Hi, how are you?", "speaker": 0},
                                      {"text": "Fine, thanks.", "speaker": 1}],
                            "max_audio_length_ms": 160, "seed": 12})
    assert r["utterances"] == 2
    check_length(r, 320)  # the limit applies per turn


def test_dialogue_turns_stream(worker, loop):
    items = stream(worker, loop, {"turns": [{"text": "One.", "speaker": 0},
                                            {"text": "Two.", "speaker": 1},
                                            {"text": "Three.", "speaker": 0}],
                                  "max_audio_length_ms": 160, "seed": 12,
                                  "response_format": "pcm"})
    assert items[-1]["utterances"] == 3 and items[-1]["duration_ms"] == 480
    assert len(stream_bytes(items)) == 2 * 480 * 24


def test_long_text_is_spoken_in_pieces(worker, loop):
    sentence = ("The quick brown fox jumps over the lazy dog near the river bank at dawn, "
                "while the birds sing. ")
    text = (sentence * 11).strip()
    assert 900 <= len(text) <= 1100
    pieces = split_text(text, PIECE_CHARS)
    assert len(pieces) > 1
    r = good(worker, loop, {"text": text, "max_audio_length_ms": 80, "seed": 13})
    assert r["utterances"] == len(pieces) > 1
    check_length(r, 80 * len(pieces))


def test_a_long_whole_job_reports_each_piece_as_the_next_begins(worker, loop):
    """What RunPod's /status shows while a long job runs (handler.py posts each report)."""
    sentence = "The quick brown fox jumps over the lazy dog near the river bank at dawn. "
    payload = {"text": (sentence * 8).strip(), "max_audio_length_ms": 80, "seed": 13}
    pieces = len(split_text(payload["text"], PIECE_CHARS))
    reports: list[dict] = []
    (answer,) = run(loop, collect(worker, payload, on_progress=reports.append))
    assert answer["utterances"] == pieces >= 3
    assert reports == [{"pieces": pieces, "pieces_done": done, "audio_ms": 80.0 * done}
                       for done in range(1, pieces)]
    # a stream's chunks are its progress; a report that fails fails nothing
    assert run(loop, collect(worker, dict(payload, stream=True), on_progress=reports.append))
    assert len(reports) == pieces - 1

    def broken(report: dict) -> None:
        raise RuntimeError("the status route is down")

    (again,) = run(loop, collect(worker, payload, on_progress=broken))
    assert again["audio_base64"] == answer["audio_base64"]


def test_a_piece_of_punctuation_alone_is_not_spoken(worker):
    """A full piece followed by "?!" leaves that as a piece of its own, with nothing to speak
    (CSM would make noise of it): the job is the full piece alone."""
    first = "word " * 43 + "end."  # 219 characters: no room for " ?!" beside it
    assert split_text(f"{first} ?!", PIECE_CHARS) == [first, "?!"]
    plan = worker.plan(parse_request({"text": f"{first} ?!", "seed": 1}, worker.settings.limits))
    assert (plan.text, plan.then) == (first, ())


# ---- concurrency ---------------------------------------------------------------------------
CONCURRENT = [
    {"text": "First of six.", "max_audio_length_ms": 160, "seed": 100},
    {"text": "Second of six, a little longer.", "max_audio_length_ms": 480, "seed": 101,
     "voice": "conversational_b"},
    {"input": "Third.", "max_audio_length_ms": 240, "seed": 102, "voice": "none",
     "response_format": "pcm"},
    {"text": "Fourth.", "max_audio_length_ms": 320, "seed": 103, "temperature": 0.5,
     "topk": 10, "response_format": "flac"},
    {"turns": [{"text": "Fifth.", "speaker": 0}, {"text": "Yes.", "speaker": 1}],
     "max_audio_length_ms": 160, "seed": 104},
    {"text": "Sixth.", "max_audio_length_ms": 160, "seed": 100},
]


def test_concurrent_jobs_equal_the_same_jobs_alone(worker, loop):
    alone = [good(worker, loop, p) for p in CONCURRENT]

    async def together():
        return await asyncio.gather(*(complete(worker, p) for p in CONCURRENT))

    gathered = run(loop, together())
    for payload, solo, batched in zip(CONCURRENT, alone, gathered):
        assert "error" not in batched, batched
        assert batched["seed"] == payload["seed"] and batched["format"] == solo["format"]
        assert batched["duration_ms"] == solo["duration_ms"]
        assert_same_audio(batched, solo)
    assert worker.engine.scheduler.active_jobs == 0


def test_concurrent_jobs_with_refusals_mixed_in(worker, loop):
    payloads = [{"text": "Fine.", "max_audio_length_ms": 160, "seed": 1},
                {"text": "Bad.", "topk": 999},
                {"text": "Fine too.", "max_audio_length_ms": 160, "seed": 2, "stream": True},
                job(ctx("%%%")),
                {"task": "verify_watermark", "audio_base64": audio_b64(0.3)}]

    async def together():
        return await asyncio.gather(*(collect(worker, p) for p in payloads))

    fine, bad, streamed, bad_ctx, verified = run(loop, together())
    assert "audio_base64" in fine[0] and "error" not in fine[0]
    assert "topk" in bad[0]["error"] and "not valid base64" in bad_ctx[0]["error"]
    assert streamed[-1]["final"] is True and streamed[-1]["duration_ms"] == 160
    assert set(verified[0]) == {"task", "watermarked"}


# ---- cancellation --------------------------------------------------------------------------
# A job long enough that it can't finish on its own during the test: 8 turns of CAP_MS each.
LONG_JOB = {"turns": [{"text": f"Turn number {i}.", "speaker": i % 2} for i in range(8)],
            "max_audio_length_ms": CAP_MS, "seed": 1}


def wait_idle(worker, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while worker.engine.scheduler.active_jobs and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.engine.scheduler.active_jobs == 0


def test_closing_a_stream_frees_its_slot(worker, loop):
    async def first_chunk_then_close():
        gen = worker.run(dict(LONG_JOB, stream=True))
        first = await gen.__anext__()
        busy = worker.engine.scheduler.active_jobs
        await gen.aclose()
        return first, busy

    started = time.monotonic()
    first, busy = run(loop, first_chunk_then_close())
    assert first["chunk_index"] == 0 and first["final"] is False
    assert busy == 1  # the job was still generating when it was cut off
    wait_idle(worker, 3.0)  # freed at the next block, long before 19 s of audio were made
    assert time.monotonic() - started < 10
    still_works(worker, loop)
    wait_idle(worker, 3.0)


def test_a_job_whose_event_loop_closed_frees_its_slot(worker, loop):
    """A caller's event loop closed under a running job (a process shutting down, a harness
    that drops its loop without closing its generators): no one is left to hear the job, so
    it must end at its next block, not draw its frames for no one."""
    own_loop = asyncio.new_event_loop()
    gen = worker.run(dict(LONG_JOB, stream=True))  # held: never finalised, as when abandoned
    first = own_loop.run_until_complete(gen.__anext__())
    assert first["chunk_index"] == 0 and worker.engine.scheduler.active_jobs == 1
    own_loop.close()
    wait_idle(worker, 3.0)  # the rest of 19 s of audio would take far longer
    still_works(worker, loop)
    del gen


def test_a_cancelled_task_frees_its_slot(worker, loop):
    async def cancel_mid_job():
        task = asyncio.ensure_future(complete(worker, LONG_JOB))
        while not worker.engine.scheduler.active_jobs:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(loop, cancel_mid_job())
    wait_idle(worker, 3.0)
    still_works(worker, loop)


def test_a_task_cancelled_while_its_job_is_planned_cancels_the_job(worker, loop, monkeypatch):
    """Cut off while its job is still being planned (reference audio decoded and encoded,
    text tokenised: in a thread that can't be stopped), the job must be cancelled as soon as
    it exists, not draw its frames for no one."""
    planning, release, plan = threading.Event(), threading.Event(), worker.plan

    def slow_plan(*args):
        planning.set()
        release.wait(10)
        return plan(*args)

    monkeypatch.setattr(worker, "plan", slow_plan)

    async def cancel_while_planning() -> bool:
        task = asyncio.ensure_future(complete(worker, LONG_JOB))
        while not planning.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        deadline = time.monotonic() + 3  # the event loop runs on, as a server's does
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            scheduler = worker.engine.scheduler
            if not scheduler.pending and not scheduler.active_jobs:
                return True
        return False

    assert run(loop, cancel_while_planning()), "the job ran on after its caller was gone"
    still_works(worker, loop)
