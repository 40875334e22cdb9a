"""The request contract (worker.schema) and the settings (worker.settings): pure and fast.

Every refusal is checked by its TEXT: the caller must be told which field is wrong and what
the limit is.
"""

from __future__ import annotations

import pytest

from worker.schema import (FORMATS, MAX_SEED, MAX_SPEAKER, VOICES, SpeechRequest,
                           RequestError, VerifyRequest, parse_request)
from worker.settings import DEFAULT_MODEL_DIR, Limits, SettingsError, load_settings

LIMITS = Limits(max_text_chars=100, max_context_turns=2, max_context_seconds=10.0,
                max_reference_bytes=1000, max_audio_length_ms=2000, max_turns=3)
CTX = {"text": "an earlier turn", "speaker": 0, "audio_base64": "UklGRg=="}


def ok(payload: dict, limits: Limits = LIMITS):
    return parse_request(payload, limits)


def refused(payload, *needles: str, limits: Limits = LIMITS) -> str:
    with pytest.raises(RequestError) as info:
        parse_request(payload, limits)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# ---- happy paths -------------------------------------------------------------------------
def test_minimal_request_gets_the_documented_defaults():
    r = ok({"text": "Hello."})
    assert isinstance(r, SpeechRequest)
    assert (r.task, r.text, r.input, r.turns, r.words) == ("generate", "Hello.", None, None,
                                                         "Hello.")
    assert (r.speaker, r.voice, r.context, r.max_audio_length_ms, r.seed) == (
        None, None, [], None, None)
    assert (r.temperature, r.topk, r.response_format, r.stream) == (0.9, 50, "wav", False)


def test_every_field_at_once():
    r = ok({"task": "generate", "text": "Hi.", "speaker": 3, "voice": "none",
            "context": [CTX], "max_audio_length_ms": 2000, "temperature": 2, "topk": 256,
            "seed": MAX_SEED, "response_format": "ogg", "stream": True})
    assert (r.speaker, r.voice, r.max_audio_length_ms, r.temperature, r.topk, r.seed) == (
        3, "none", 2000, 2, 256, MAX_SEED)
    assert (r.response_format, r.stream) == ("ogg", True)
    assert r.context[0].text == "an earlier turn" and r.context[0].audio_base64 == "UklGRg=="


def test_input_is_an_alias_of_text():
    r = ok({"input": "Hello."})
    assert r.words == "Hello." and r.text is None


def test_turns():
    r = ok({"turns": [{"text": "Hi.", "speaker": 0}, {"text": "Hey.", "speaker": 1}]})
    assert [(t.speaker, t.text) for t in r.turns] == [(0, "Hi."), (1, "Hey.")]
    assert r.words is None


@pytest.mark.parametrize("field,values", [
    ("speaker", [0, 1, MAX_SPEAKER]),
    ("temperature", [1e-6, 0.5, 1, 2, 2.0]),
    ("topk", [1, 50, 256]),
    ("seed", [0, 1, MAX_SEED]),
    ("max_audio_length_ms", [80, 81, 2000]),
    ("voice", list(VOICES)),
    ("response_format", list(FORMATS)),
    ("stream", [True, False]),
])
def test_field_accepts_its_whole_range(field, values):
    for value in values:
        payload = {"text": "Hi.", field: value}
        assert getattr(ok(payload), field) == value


def test_explicit_nulls_mean_default():
    r = ok({"text": "Hi.", "input": None, "turns": None, "speaker": None, "voice": None,
            "seed": None, "max_audio_length_ms": None})
    assert r.words == "Hi." and r.seed is None


def test_limits_are_inclusive():
    ok({"text": "x" * 100})
    ok({"text": "Hi.", "context": [CTX, CTX]})
    ok({"turns": [{"text": "a" * 50, "speaker": 0}, {"text": "b" * 50, "speaker": 1},
                  {"text": "c", "speaker": 2}]}, limits=Limits(max_text_chars=101, max_turns=3))


def test_verify_watermark_request():
    r = ok({"task": "verify_watermark", "audio_base64": "UklGRg=="})
    assert isinstance(r, VerifyRequest) and r.audio_base64 == "UklGRg=="


# ---- text / input / turns ----------------------------------------------------------------
@pytest.mark.parametrize("payload", [{}, {"voice": "none"}, {"text": None}])
def test_missing_text(payload):
    refused(payload, "exactly one of text, input", "turns")


@pytest.mark.parametrize("field", ["text", "input"])
@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
def test_empty_text(field, value):
    refused({field: value}, "text", "must not be empty")


def test_text_and_input_together():
    refused({"text": "a", "input": "b"}, "exactly one of", "got text, input")


def test_text_and_turns_together():
    refused({"text": "a", "turns": [{"text": "b", "speaker": 0}]}, "got text, turns")


def test_turns_refusals():
    refused({"turns": []}, "turns", "must not be empty")
    refused({"turns": [{"text": "a", "speaker": 0}], "speaker": 1}, "speaker",
            "not allowed with turns")
    refused({"turns": [{"text": " ", "speaker": 0}]}, "turns[0].text", "must not be empty")
    refused({"turns": [{"text": "a"}]}, "turns[0].speaker", "required")
    refused({"turns": [{"text": "a", "speaker": 32}]}, "turns[0].speaker", "31")
    refused({"turns": [{"text": "a", "speaker": 0, "voice": "none"}]}, "turns[0].voice",
            "unknown field")
    refused({"turns": "a"}, "turns", "valid list")


# ---- types -------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,needle", [
    ("speaker", "1", "valid integer"),
    ("speaker", True, "valid integer"),
    ("speaker", 1.0, "valid integer"),
    ("topk", "50", "valid integer"),
    ("topk", False, "valid integer"),
    ("topk", 50.0, "valid integer"),
    ("seed", "42", "valid integer"),
    ("seed", True, "valid integer"),
    ("seed", 42.0, "valid integer"),
    ("max_audio_length_ms", "1000", "valid integer"),
    ("max_audio_length_ms", True, "valid integer"),
    ("max_audio_length_ms", 1000.0, "valid integer"),
    ("temperature", "0.9", "valid number"),
    ("temperature", True, "valid"),
    ("stream", "true", "valid boolean"),
    ("stream", 1, "valid boolean"),
    ("text", 5, "valid string"),
    ("text", ["a"], "valid string"),
    ("input", 5, "valid string"),
    ("voice", 1, "must be one of"),
    ("response_format", 1, "must be one of"),
    ("context", "x", "valid list"),
    ("context", {"text": "a"}, "valid list"),
])
def test_wrong_types_name_the_field(field, value, needle):
    payload = {"text": "Hi.", field: value} if field not in ("text", "input") else {field: value}
    message = refused(payload, field, needle)
    assert message.startswith(field), message


@pytest.mark.parametrize("field,value,needle", [
    ("temperature", 0, "greater than 0"),
    ("temperature", 0.0, "greater than 0"),
    ("temperature", -1, "greater than 0"),
    ("temperature", 2.0001, "less than or equal to 2"),
    ("temperature", float("nan"), "temperature"),
    ("temperature", float("inf"), "less than or equal to 2"),
    ("topk", 0, "greater than or equal to 1"),
    ("topk", 257, "less than or equal to 256"),
    ("speaker", -1, "greater than or equal to 0"),
    ("speaker", 32, "less than or equal to 31"),
    ("seed", -1, "greater than or equal to 0"),
    ("seed", 2**32, "less than or equal to 4294967295"),
    ("seed", 10**40, "less than or equal to 4294967295"),
    ("max_audio_length_ms", 79, "greater than or equal to 80"),
    ("max_audio_length_ms", 0, "greater than or equal to 80"),
    ("max_audio_length_ms", 2001, "the limit is 2000"),
])
def test_out_of_range_numbers(field, value, needle):
    message = refused({"text": "Hi.", field: value}, field, needle)
    assert message.startswith(field), message


def test_max_audio_length_limit_comes_from_limits():
    ok({"text": "Hi.", "max_audio_length_ms": 5000}, limits=Limits(max_audio_length_ms=5000))
    refused({"text": "Hi.", "max_audio_length_ms": 5001}, "max_audio_length_ms: 5001",
            "the limit is 5000", limits=Limits(max_audio_length_ms=5000))


# ---- unknown fields, enumerations ----------------------------------------------------------
def test_unknown_top_level_field():
    refused({"text": "Hi.", "sped": 1.2}, "sped", "unknown field")


def test_unknown_field_inside_a_context_item():
    refused({"text": "Hi.", "context": [CTX, dict(CTX, lang="en")]}, "context[1].lang",
            "unknown field")


def test_context_item_refusals():
    refused({"text": "Hi.", "context": [{"text": "a", "speaker": 0}]},
            "context[0]: give exactly one of audio_base64 or audio_url")
    refused({"text": "Hi.", "context": [dict(CTX, audio_url="https://example.com/a.wav")]},
            "context[0]: give exactly one of audio_base64 or audio_url")
    refused({"text": "Hi.", "context": [{"text": "a", "speaker": 0, "audio_url": "a.wav"}]},
            "context[0].audio_url: must be an http or https URL")
    refused({"text": "Hi.", "context": [{"text": "a", "speaker": 0,
                                         "audio_url": "https://x.org/" + "a" * 4096}]},
            "context[0].audio_url", "at most 4096 characters")
    refused({"text": "Hi.", "context": [dict(CTX, audio_base64="")]},
            "context[0].audio_base64", "at least 1")
    refused({"text": "Hi.", "context": [dict(CTX, text="")]}, "context[0].text", "empty")
    refused({"text": "Hi.", "context": [dict(CTX, speaker=-1)]}, "context[0].speaker")
    refused({"text": "Hi.", "context": [dict(CTX, speaker="0")]}, "context[0].speaker",
            "valid integer")
    refused({"text": "Hi.", "context": ["UklGRg=="]}, "context[0]")


def test_unknown_voice_lists_the_choices():
    message = refused({"text": "Hi.", "voice": "conversational_c"}, "voice",
                      "got 'conversational_c'")
    for voice in VOICES:
        assert f"'{voice}'" in message


def test_unknown_response_format_lists_the_choices():
    message = refused({"text": "Hi.", "response_format": "m4a"}, "response_format", "'m4a'")
    for fmt in FORMATS:
        assert f"'{fmt}'" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_can_be_streamed(fmt):
    assert ok({"text": "Hi.", "response_format": fmt, "stream": True}).stream is True


def test_watermark_fields_are_typed():
    r = ok({"text": "Hi.", "watermark": False, "watermark_key": [0, 1, 2, 3, 255]})
    assert (r.watermark, r.watermark_key) == (False, [0, 1, 2, 3, 255])
    assert ok({"text": "Hi."}).watermark is None and ok({"text": "Hi."}).watermark_key is None
    refused({"text": "Hi.", "watermark": "no"}, "watermark", "valid boolean")
    refused({"text": "Hi.", "watermark_key": [1, 2, 3, 4]}, "watermark_key", "at least 5")
    refused({"text": "Hi.", "watermark_key": [1, 2, 3, 4, 5, 6]}, "watermark_key", "at most 5")
    refused({"text": "Hi.", "watermark_key": [1, 2, 3, 4, 256]}, "watermark_key[4]",
            "less than or equal to 255")
    refused({"text": "Hi.", "watermark_key": "1,2,3,4,5"}, "watermark_key", "valid list")


def test_verify_refusals():
    refused({"task": "verify_watermark"}, "give exactly one of audio_base64 or audio_url")
    refused({"task": "verify_watermark", "audio_url": "ftp://x.org/a.wav"},
            "audio_url: must be an http or https URL")
    refused({"task": "verify_watermark", "audio_base64": ""}, "audio_base64")
    refused({"task": "verify_watermark", "audio_base64": "UklGRg==", "text": "Hi."}, "text",
            "unknown field")
    refused({"task": "verify_watermark", "audio_base64": 5}, "audio_base64", "valid string")


def test_unknown_task_is_refused():
    refused({"task": "translate", "text": "Hi."}, "task", "'translate'")

def test_unknown_task_lists_both_tasks():
    refused({"task": "translate", "text": "Hi."}, "generate", "verify_watermark")


# ---- limits -------------------------------------------------------------------------------
def test_text_chars_limit():
    refused({"text": "x" * 101}, "text: 101 characters", "the limit is 100")
    refused({"input": "x" * 101}, "input: 101 characters", "the limit is 100")


def test_turns_text_counts_together():
    refused({"turns": [{"text": "x" * 60, "speaker": 0}, {"text": "y" * 41, "speaker": 1}]},
            "turns: 101 characters", "the limit is 100")


def test_turns_count_limit():
    turns = [{"text": "a", "speaker": i % 2} for i in range(4)]
    refused({"turns": turns}, "turns: 4 turns", "the limit is 3")


def test_context_turns_limit():
    refused({"text": "Hi.", "context": [CTX] * 3}, "context: 3 turns", "the limit is 2")


def test_context_turn_text_limit():
    ok({"text": "Hi.", "context": [CTX, dict(CTX, text="x" * 100)]})
    refused({"text": "Hi.", "context": [CTX, dict(CTX, text="x" * 101)]},
            "context[1].text: 101 characters", "the limit is 100")


@pytest.mark.parametrize("payload", [None, "Hello", 5, ["text"], True, 1.5])
def test_input_must_be_an_object(payload):
    refused(payload, "input must be a JSON object", type(payload).__name__)


def test_several_errors_are_all_reported():
    message = refused({"text": "Hi.", "topk": 0, "speaker": 99, "colour": "red"}, "topk",
                      "speaker", "colour")
    assert message.count(";") >= 2


# ---- settings -----------------------------------------------------------------------------
def test_settings_defaults():
    s = load_settings({"HOME": "/home/u"})
    assert s.model_dir is None  # unset: the worker searches its model sources
    assert (str(s.baked_dir), s.model_repo, str(s.volume_dir)) == (
        DEFAULT_MODEL_DIR, "sesame/csm-1b", "/runpod-volume")
    assert (str(s.hf_hub_cache), str(s.download_cache)) == (
        "/home/u/.cache/huggingface/hub", "/home/u/.cache/csm-runpod")
    assert (s.voices_dir, s.default_voice) == (None, None)  # unset: see choose_default
    assert s.limits == Limits()
    assert s.watermark_key_is_public is True and len(s.watermark_key) == 5
    assert (s.log_level, s.max_concurrency, s.device) == ("INFO", 8, None)


def test_settings_from_env():
    s = load_settings({"CSM_MODEL_DIR": "/m", "CSM_WATERMARK_KEY": "1, 2,3,4,255",
                       "CSM_LOG_LEVEL": "debug", "CSM_MAX_CONCURRENCY": "3",
                       "CSM_DEVICE": "cpu", "CSM_MAX_TEXT_CHARS": "10",
                       "CSM_MAX_CONTEXT_TURNS": "1", "CSM_MAX_CONTEXT_SECONDS": "2.5",
                       "CSM_MAX_REFERENCE_BYTES": "1234", "CSM_MAX_AUDIO_LENGTH_MS": "800",
                       "CSM_MAX_TURNS": "4", "CSM_MAX_VERIFY_SECONDS": "3.5"})
    assert str(s.model_dir) == "/m" and s.device == "cpu"
    assert s.watermark_key == (1, 2, 3, 4, 255) and s.watermark_key_is_public is False
    assert (s.log_level, s.max_concurrency) == ("DEBUG", 3)
    assert s.limits == Limits(10, 1, 2.5, 1234, 800, 4, 3.5)


def test_model_source_settings_from_env():
    s = load_settings({"CSM_MODEL_REPO": "me/csm-finetune", "CSM_BAKED_DIR": "/b",
                       "CSM_VOLUME_DIR": "/workspace", "HF_HOME": "/hf", "XDG_CACHE_HOME": "/c",
                       "CSM_VOICES_DIR": "/v", "CSM_DEFAULT_VOICE": "alice"})
    assert (s.model_repo, str(s.baked_dir), str(s.volume_dir)) == (
        "me/csm-finetune", "/b", "/workspace")
    assert (str(s.hf_hub_cache), str(s.download_cache)) == ("/hf/hub", "/c/csm-runpod")
    assert (str(s.voices_dir), s.default_voice) == ("/v", "alice")
    assert str(load_settings({"HF_HUB_CACHE": "/x", "HF_HOME": "/hf"}).hf_hub_cache) == "/x"


@pytest.mark.parametrize("repo", ["csm-1b", "a/b/c", "/x", "sesame/csm 1b"])
def test_malformed_model_repo_is_refused(repo):
    with pytest.raises(SettingsError, match="CSM_MODEL_REPO must be a hub repo id"):
        load_settings({"CSM_MODEL_REPO": repo})


@pytest.mark.parametrize("key", ["", "   "])
def test_unset_watermark_key_uses_the_public_one(key):
    s = load_settings({"CSM_WATERMARK_KEY": key})
    assert s.watermark_key_is_public is True
    assert s.watermark_key == load_settings({}).watermark_key


@pytest.mark.parametrize("key", ["211,173,97,59,188,7", "211,173,97,59", "211,173,97,59,256",
                                 "211,173,97,-59,188", "211,173,97,59,1x8",
                                 "211;173;97;59;188", "211,173,97,59,188.5"])
def test_malformed_watermark_key_is_refused_without_echoing_it(key):
    with pytest.raises(SettingsError) as info:
        load_settings({"CSM_WATERMARK_KEY": key})
    message = str(info.value)
    assert "CSM_WATERMARK_KEY" in message
    for secret in ("211", "173", "97", "59", "188", "256"):
        assert secret not in message, message
    assert key not in message


@pytest.mark.parametrize("var", ["CSM_MAX_TEXT_CHARS", "CSM_MAX_CONTEXT_TURNS",
                                 "CSM_MAX_REFERENCE_BYTES", "CSM_MAX_AUDIO_LENGTH_MS",
                                 "CSM_MAX_TURNS", "CSM_MAX_CONCURRENCY"])
@pytest.mark.parametrize("value,needle", [("abc", "must be a int"), ("1.5", "must be a int"),
                                          ("0", "positive"), ("-3", "positive")])
def test_bad_integer_limits_name_the_variable(var, value, needle):
    with pytest.raises(SettingsError) as info:
        load_settings({var: value})
    assert var in str(info.value) and needle in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("var", ["CSM_MAX_CONTEXT_SECONDS", "CSM_MAX_VERIFY_SECONDS"])
@pytest.mark.parametrize("value,needle", [("abc", "must be a float"), ("0", "positive"),
                                          ("-0.5", "positive"), ("nan", "finite"),
                                          ("inf", "finite")])
def test_bad_seconds_limits_name_the_variable(var, value, needle):
    with pytest.raises(SettingsError) as info:
        load_settings({var: value})
    assert var in str(info.value) and needle in str(info.value)



def test_audio_limit_below_one_frame_is_refused():
    with pytest.raises(SettingsError, match="CSM_MAX_AUDIO_LENGTH_MS"):
        load_settings({"CSM_MAX_AUDIO_LENGTH_MS": "79"})


def test_bad_log_level_is_refused():
    with pytest.raises(SettingsError, match="CSM_LOG_LEVEL"):
        load_settings({"CSM_LOG_LEVEL": "LOUD"})


def test_empty_limit_means_default():
    assert load_settings({"CSM_MAX_TEXT_CHARS": ""}).limits.max_text_chars == 5000


@pytest.mark.parametrize("raw,value", [(None, None), ("", None), ("auto", None), ("AUTO", None),
                                       ("1", True), ("true", True), ("0", False),
                                       ("no", False)])
def test_cuda_graphs_setting(raw, value):
    env = {} if raw is None else {"CSM_CUDA_GRAPHS": raw}
    assert load_settings(env).cuda_graphs is value


def test_cuda_graphs_setting_refuses_other_words():
    with pytest.raises(SettingsError, match=r"CSM_CUDA_GRAPHS must be 1 or 0 \(true or false\), "
                                            "or auto, got 'sometimes'"):
        load_settings({"CSM_CUDA_GRAPHS": "sometimes"})


# ---- voices a worker serves, and listing them ------------------------------------------------
def test_voice_is_checked_against_the_workers_voices():
    voices = ("alice", "conversational_a", "none")
    assert parse_request({"text": "Hi.", "voice": "alice"}, LIMITS, voices).voice == "alice"
    with pytest.raises(RequestError) as info:
        parse_request({"text": "Hi.", "voice": "conversational_b"}, LIMITS, voices)
    assert str(info.value) == ("voice: must be one of 'alice', 'conversational_a', 'none', "
                               "got 'conversational_b'")
    refused({"text": "Hi.", "voice": "alice"}, "voice", "got 'alice'")  # not a built-in voice


def test_list_voices_takes_no_other_field():
    from worker.schema import ListVoicesRequest

    assert isinstance(ok({"task": "list_voices"}), ListVoicesRequest)
    refused({"task": "list_voices", "text": "Hi."}, "text: unknown field")
    refused({"task": "translate"}, "'generate', 'verify_watermark', 'list_voices'")
