"""Your own voices (worker/voices.py): a voices folder of manifests, checked at start-up with
errors naming the file, skipped when broken unless it is the default voice, Mimi-encoded and
prefilled once, listed, and selectable by name. On the tiny RANDOM-weight model: the audio it
generates is noise, never speech; the tests check plumbing, not how a voice sounds."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import soundfile as sf

from csm.model import CSM
from worker.schema import parse_request
from worker.service import Worker
from worker.settings import StartupError, load_settings
from worker.voices import VoiceError, encode, read_manifest, voices_folder
from worker_helpers import collect, run, tone

def words(seconds: float) -> str:
    """A transcript of a plausible length: about 2.5 words a second."""
    return " ".join(["word"] * max(1, round(2.5 * seconds)))


def write_voice(folder: Path, name: str, seconds: float = 6.0, rate: int = 24_000,
                amplitude: float = 0.3, **manifest: object) -> Path:
    """NAME.json beside NAME.wav (a tone: audible, not speech); `manifest` overrides fields
    (None drops one)."""
    folder.mkdir(parents=True, exist_ok=True)
    wav = folder / f"{name}.wav"
    sf.write(wav, tone(seconds, rate, amplitude=amplitude), rate, subtype="PCM_16")
    data = {"audio": wav.name, "transcript": words(seconds), "speaker": 5} | manifest
    (folder / f"{name}.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return folder / f"{name}.json"


# ---- reading a manifest: errors name the file and the field ------------------------------------
def test_a_good_voice_reads_without_warnings(tmp_path: Path) -> None:
    clip = read_manifest(write_voice(tmp_path, "alice"))
    assert (clip.name, clip.speaker, clip.transcript, clip.rate) == ("alice", 5, words(6), 24_000)
    assert abs(clip.seconds - 6.0) < 1e-6 and clip.warnings == []


def test_speaker_defaults_to_0(tmp_path: Path) -> None:
    assert read_manifest(write_voice(tmp_path, "bob", speaker=None)).speaker == 0


def broken(folder: Path, case: str) -> Path:
    """A voice broken in the named way; returns its manifest."""
    name = {"bad name": "my voice", "preset name": "conversational_b", "none": "none"}.get(case, "v")
    manifest = {"no transcript": {"transcript": None}, "blank transcript": {"transcript": "   "},
                "speaker out of range": {"speaker": 32}, "unknown field": {"language": "en"},
                "missing audio": {"audio": "gone.wav"}, "silent audio": {"amplitude": 0.0}}
    path = write_voice(folder, name, **manifest.get(case, {}))
    if case == "invalid JSON":
        path.write_text("{audio: v.wav")
    if case == "unreadable audio":
        (folder / "v.wav").write_bytes(b"RIFF garbage")
    return path


@pytest.mark.parametrize("case,needle", [
    ("invalid JSON", "not valid JSON"),
    ("no transcript", "transcript: Field required"),
    ("blank transcript", "transcript: String should match pattern"),
    ("speaker out of range", "speaker: Input should be less than or equal to 31"),
    ("unknown field", "language: unknown field"),
    ("missing audio", "audio: "),
    ("unreadable audio", "not a readable audio file"),
    ("silent audio", "the audio is silent"),
    ("bad name", "must be 1-64 letters"),
    ("preset name", "taken by a built-in voice"),
    ("none", "taken by a built-in voice"),
])
def test_a_broken_voice_is_refused_naming_its_file(tmp_path: Path, case: str, needle: str) -> None:
    path = broken(tmp_path, case)
    with pytest.raises(VoiceError) as info:
        read_manifest(path)
    message = str(info.value)
    assert needle in message, message
    assert str(tmp_path) in message  # the file (or its audio file) is named


@pytest.mark.parametrize("kwargs,needle", [
    ({"seconds": 1.0}, "1.0 s of audio carries little of the voice"),
    ({"seconds": 70.0, "rate": 16_000}, "70 s of audio takes about 875 of the model's 2048 positions"),
    ({"amplitude": 0.01}, "very quiet (peak -40 dBFS)"),
    ({"amplitude": 3.0}, "of the samples are at full scale"),
    ({"rate": 8_000}, "recorded at 8000 Hz"),
    ({"transcript": "hello"}, "0.2 words per second"),
])
def test_a_clip_far_from_a_good_reference_gets_a_warning(tmp_path: Path, kwargs: dict,
                                                         needle: str) -> None:
    path = write_voice(tmp_path, "v", **kwargs)
    warnings = read_manifest(path).warnings
    assert len(warnings) == 1 and needle in warnings[0], warnings
    assert warnings[0].startswith(str(path))


def test_the_voices_folder_is_found_beside_the_model_then_on_the_volume(tmp_path: Path) -> None:
    settings = replace(load_settings({}), volume_dir=tmp_path / "volume")
    model = tmp_path / "model"
    model.mkdir()
    assert voices_folder(settings, model) is None
    (tmp_path / "volume" / "voices").mkdir(parents=True)
    assert voices_folder(settings, model) == tmp_path / "volume" / "voices"
    (model / "voices").mkdir()
    assert voices_folder(settings, model) == model / "voices"
    explicit = replace(settings, voices_dir=tmp_path / "mine")
    with pytest.raises(StartupError, match="CSM_VOICES_DIR=.*mine is not a folder"):
        voices_folder(explicit, model)


# ---- a worker with a voices folder: two voices, one broken ----------------------------------------
class PrefillLog:
    """Prompt positions the backbone prefilled, call by call. CSM.prefill is the one way into
    the backbone; the frame step also uses it to feed each drawn frame back (one audio-only
    position per row), which is not a prompt and not counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[int] = []
        real = CSM.prefill

        def counted(model: CSM, tokens, mask, pos, rows, keys=None):
            fed_back_frame = tokens.shape[1] == 1 and not mask[..., -1].any()
            if not fed_back_frame:
                self.calls.append(tokens.shape[1])
            return real(model, tokens, mask, pos, rows, keys)

        monkeypatch.setattr(CSM, "prefill", counted)


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("voices")
    write_voice(folder, "alice", seconds=6.0, rate=44_100, speaker=5)
    write_voice(folder, "broken", transcript=None)  # its manifest lacks the transcript
    sf.write(folder / "stray.flac", tone(1.0, 24_000), 24_000)  # a clip no voice uses
    return folder


@pytest.fixture(scope="module")
def started(tiny_model_dir: Path, voices_dir: Path):
    """(worker, prefill log, start-up log): the default voice is alice."""
    monkeypatch = pytest.MonkeyPatch()
    prefills = PrefillLog(monkeypatch)
    handler = CapturingHandler()
    logger = logging.getLogger("worker")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # not a plain attribute: setLevel clears the logger's cache
    try:
        worker = Worker.start(load_settings({
            "CSM_MODEL_DIR": str(tiny_model_dir), "CSM_DEVICE": "cpu", "CSM_MAX_CONCURRENCY": "2",
            "CSM_VOICES_DIR": str(voices_dir), "CSM_DEFAULT_VOICE": "alice"}))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    yield worker, prefills, handler.lines
    worker.engine.close()
    monkeypatch.undo()


class CapturingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def test_the_broken_voice_is_reported_and_skipped(started, voices_dir: Path) -> None:
    worker, _, lines = started
    assert sorted(worker.presets) == ["alice", "conversational_a", "conversational_b"]
    errors = [line for line in lines if line.startswith("ERROR")]
    assert errors == [f"ERROR voice broken skipped: {voices_dir / 'broken.json'}: "
                      "transcript: Field required"]
    assert any(line.startswith("WARNING") and "stray.flac: no voice uses this clip" in line
               for line in lines)
    # broken.wav has its manifest: that voice is reported above, not its clip as a stray
    assert not any("broken.wav: no voice uses this clip" in line for line in lines)
    assert "INFO voices: alice, conversational_a, conversational_b (default alice)" in lines


def test_a_voice_that_leaves_under_10_s_of_the_window_is_refused(started, tmp_path: Path,
                                                                  monkeypatch) -> None:
    """A voice is in every prompt that uses it: one that leaves less than 125 frames (10 s)
    of the window for speech is refused, naming its file (a small window stands in for the
    2048 positions that a 150 s clip would fill)."""
    worker, _, _ = started
    clip = read_manifest(write_voice(tmp_path, "long", seconds=6.0))  # 75 frames
    positions = len(worker.engine.tokenizer.encode_turn(5, clip.transcript)) + 75 + 1
    # this engine has served jobs, so no prefix can be added: only the room is checked here
    monkeypatch.setattr(worker.engine, "register_prefix", lambda segment: None)
    for window, fits in ((positions + 124, False), (positions + 125, True)):
        monkeypatch.setattr(type(worker.engine), "max_positions", property(lambda _: window))
        if fits:
            assert encode(worker.engine, clip).codes.shape[1] == 75
            continue
        with pytest.raises(VoiceError, match=f"long.json: the voice takes {positions} of the "
                                             f"model's {window} positions, leaving room for "
                                             "less than 10 s of speech"):
            encode(worker.engine, clip)


def test_the_worker_lists_its_voices(started, loop) -> None:
    worker, _, _ = started
    [answer] = run(loop, collect(worker, {"task": "list_voices"}))
    assert answer["task"] == "list_voices" and answer["default"] == "alice"
    listed = {v["name"]: v for v in answer["voices"]}
    assert sorted(listed) == ["alice", "conversational_a", "conversational_b"]
    assert (listed["alice"]["kind"], listed["alice"]["speaker"]) == ("custom", 5)
    assert listed["alice"]["seconds"] == pytest.approx(6.0, abs=0.08)
    assert (listed["conversational_b"]["kind"], listed["conversational_b"]["speaker"]) == ("preset", 1)


def test_a_voice_is_chosen_by_name_and_speaks_as_its_speaker(started, loop) -> None:
    worker, _, _ = started
    for payload in ({"text": "Hi.", "voice": "alice"}, {"text": "Hi."}):  # alice is the default
        plan = worker.plan(parse_request(payload, worker.settings.limits, worker.voice_names))
        assert plan.speaker == 5 and plan.context[0] is worker.presets["alice"]
    [r] = run(loop, collect(worker, {"text": "Hello there.", "voice": "alice",
                                     "max_audio_length_ms": 240, "seed": 3}))
    assert "error" not in r, r
    assert r["duration_ms"] == 240 and r["watermarked"] is True


def test_an_unknown_or_skipped_voice_is_refused_listing_the_voices(started, loop) -> None:
    worker, _, _ = started
    [r] = run(loop, collect(worker, {"text": "Hi.", "voice": "broken"}))
    assert r["error"] == ("voice: must be one of 'alice', 'conversational_a', 'conversational_b', "
                          "'none', got 'broken'")


def test_the_voice_is_prefilled_once_not_per_job(started, loop) -> None:
    worker, prefills, _ = started
    alice = worker.presets["alice"]
    alice_positions = len(worker.engine.tokenizer.encode_turn(5, alice.text)) + alice.codes.shape[1] + 1
    # At start-up: its one prefill, as a prefix of its own.
    assert prefills.calls.count(alice_positions) == 1
    for seed in (1, 2):
        before = len(prefills.calls)
        text = f"Job number {seed}."
        [r] = run(loop, collect(worker, {"text": text, "voice": "alice",
                                         "max_audio_length_ms": 160, "seed": seed}))
        assert "error" not in r, r
        job = prefills.calls[before:]
        # Only the job's own text was prefilled: alice's keys and values were copied.
        assert sum(job) == len(worker.engine.tokenizer.encode_turn(5, text)), job
        assert alice_positions not in job


def test_a_broken_default_voice_stops_the_start_before_the_weights_load(
        tiny_model_dir: Path, voices_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.service as service

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(service, "load_engine", must_not_load)
    settings = load_settings({"CSM_MODEL_DIR": str(tiny_model_dir), "CSM_DEVICE": "cpu",
                              "CSM_VOICES_DIR": str(voices_dir), "CSM_DEFAULT_VOICE": "broken"})
    with pytest.raises(StartupError) as info:
        Worker.start(settings)
    assert str(info.value) == (f"the default voice broken (CSM_DEFAULT_VOICE) is unusable: "
                               f"{voices_dir / 'broken.json'}: transcript: Field required")
    with pytest.raises(StartupError, match="CSM_DEFAULT_VOICE=carol: no such voice; the voices "
                                           "are alice, broken, conversational_a"):
        Worker.start(replace(settings, default_voice="carol"))


def test_without_the_preset_prompts_the_default_voice_is_none_unless_one_is_set(
        tiny_model_dir: Path, tmp_path: Path, loop, caplog: pytest.LogCaptureFixture) -> None:
    """A fine-tune without `prompts/` on the slim image (whose folder has none either) still
    starts: the presets are skipped and, with CSM_DEFAULT_VOICE unset, requests that name no
    voice get none. An operator who named a preset as the default is told it is missing."""
    model = tmp_path / "finetune"
    model.mkdir()
    for part in tiny_model_dir.iterdir():
        if part.name != "prompts":
            (model / part.name).symlink_to(part)
    env = {"CSM_MODEL_DIR": str(model), "CSM_DEVICE": "cpu", "CSM_MAX_CONCURRENCY": "2",
           "CSM_BAKED_DIR": str(tmp_path / "slim-image-without-prompts")}
    with caplog.at_level(logging.WARNING, logger="worker.voices"):
        worker = Worker.start(load_settings(env))
    try:
        assert "the default voice is none: the preset conversational_a is unusable" in caplog.text
        listed = run(loop, collect(worker, {"task": "list_voices"}))
        assert listed == [{"task": "list_voices", "default": "none", "voices": []}]
        (spoken,) = run(loop, collect(worker, {"text": "Hi.", "max_audio_length_ms": 160}))
        assert spoken["duration_ms"] == 160, spoken
        (refused,) = run(loop, collect(worker, {"text": "Hi.", "voice": "conversational_a"}))
        assert "voice" in refused["error"], refused
    finally:
        worker.engine.close()
    with pytest.raises(StartupError, match="the default voice conversational_a "
                                           r"\(CSM_DEFAULT_VOICE\) is unusable: .*does not exist"):
        Worker.start(load_settings(dict(env, CSM_DEFAULT_VOICE="conversational_a")))
