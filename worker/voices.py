"""Voices a request can name: the two preset prompts and your own (a voices folder).

A voice is a reference clip, its transcript and the speaker id it speaks as. Your own live in a
folder (`CSM_VOICES_DIR`; else `voices/` beside the model's files, else `<volume>/voices`), one
small manifest per voice, `NAME.json`:

    {"audio": "NAME.wav", "transcript": "exactly what the clip says", "speaker": 0}

At start-up each is read and checked (errors name the file), Mimi-encoded and prefilled once,
like the presets. A voice that fails is reported and skipped, unless it is the default voice
(`CSM_DEFAULT_VOICE`): then the worker does not start. Unset, the default is the first preset,
or none where the model has no preset prompts. Clips far from a good reference (see the
README) start with a warning.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from torch import Tensor

from csm.engine import FRAME_MS, Engine
from csm.presets import PRESETS
from csm.prompt import Segment

from .audio_io import AudioInputError, read_audio
from .schema import MAX_SPEAKER, describe_errors
from .settings import DEFAULT_VOICE, Settings, StartupError

log = logging.getLogger("worker.voices")

NO_VOICE = "none"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
# A good reference (README): 10-30 s of one speaker, clean, at 24 kHz or more, with an exact
# transcript. Warnings are for clips far outside that.
GOOD_SECONDS = (10, 30)
SHORT_SECONDS, LONG_SECONDS = 3.0, 60.0
QUIET_PEAK = 10 ** (-30 / 20)  # -30 dBFS
CLIPPED_SHARE = 0.001  # of samples at full scale
LOW_RATE = 16_000
WORDS_PER_SECOND = (0.5, 5.0)  # outside this the transcript hardly matches the clip
# A voice must leave room for this much speech in the model's position window.
MIN_ROOM_FRAMES = 125  # 10 s


class VoiceError(ValueError):
    """A voice that can't be used; the message names its file."""


class VoiceManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    audio: StrictStr = Field(min_length=1)  # relative to the manifest's folder
    transcript: StrictStr = Field(min_length=1, pattern=r"\S")
    speaker: Annotated[StrictInt, Field(ge=0, le=MAX_SPEAKER)] = 0


@dataclass
class VoiceClip:
    name: str
    speaker: int
    transcript: str
    audio: Tensor  # mono float32
    rate: int
    audio_path: Path
    file: Path  # what an error names: the manifest, or the preset's wav
    warnings: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.audio.shape[0] / self.rate


def read_clip(name: str, speaker: int, transcript: str, audio_path: Path, file: Path) -> VoiceClip:
    if not audio_path.is_file():
        raise VoiceError(f"{file}: audio: {audio_path} does not exist")
    try:
        audio, rate = read_audio(str(audio_path), audio_path.read_bytes())
    except AudioInputError as e:
        raise VoiceError(str(e)) from None
    return VoiceClip(name, speaker, transcript, audio, rate, audio_path, file)


def read_manifest(path: Path) -> VoiceClip:
    """One voice of a voices folder, checked; VoiceError names the file and the field."""
    name = path.stem
    if not NAME.match(name):
        raise VoiceError(f"{path}: the voice name {name!r} (the file's name) must be 1-64 letters, "
                         "digits, '_', '-' or '.', starting with a letter or digit")
    if name == NO_VOICE or name in PRESETS:
        raise VoiceError(f"{path}: the name {name!r} is taken by a built-in voice; rename the file")
    try:
        data: Any = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VoiceError(f"{path}: not valid JSON ({e})") from None
    try:
        manifest = VoiceManifest.model_validate(data)
    except ValidationError as e:
        raise VoiceError(f"{path}: {describe_errors(e.errors(include_url=False))}") from None
    clip = read_clip(name, manifest.speaker, manifest.transcript, path.parent / manifest.audio, path)
    clip.warnings = quality_warnings(clip)
    return clip


def quality_warnings(clip: VoiceClip) -> list[str]:
    """What makes the clip a poor reference, each naming the file (empty: it looks fine)."""
    seconds, samples = clip.seconds, clip.audio.numpy()
    good = f"a good reference is {GOOD_SECONDS[0]}-{GOOD_SECONDS[1]} s of one speaker"
    out = []
    if seconds < SHORT_SECONDS:
        out.append(f"{seconds:.1f} s of audio carries little of the voice; {good}")
    if seconds > LONG_SECONDS:
        out.append(f"{seconds:.0f} s of audio takes about {seconds * 1000 / FRAME_MS:.0f} of the "
                   f"model's 2048 positions in every job that uses it; {good}")
    peak = float(np.abs(samples).max())
    if peak < QUIET_PEAK:
        out.append(f"very quiet (peak {20 * np.log10(peak):.0f} dBFS): normalise it to about -1 dBFS")
    clipped = float(np.mean(np.abs(samples) >= 0.999))
    if clipped > CLIPPED_SHARE:
        out.append(f"{100 * clipped:.1f}% of the samples are at full scale: the clip is clipped "
                   "(distorted); record it quieter")
    if clip.rate < LOW_RATE:
        out.append(f"recorded at {clip.rate} Hz: a recording at 24 kHz or more keeps more of the voice")
    words = len(clip.transcript.split()) / seconds
    if not WORDS_PER_SECOND[0] <= words <= WORDS_PER_SECOND[1]:
        out.append(f"the transcript has {words:.1f} words per second of audio: check that it is "
                   "exactly what the clip says")
    return [f"{clip.file}: {w}" for w in out]


def voices_folder(settings: Settings, model_origin: Path) -> Path | None:
    """CSM_VOICES_DIR, else `voices/` beside the model's files, else the volume's `voices/`."""
    if settings.voices_dir is not None:
        if not settings.voices_dir.is_dir():
            raise StartupError(f"CSM_VOICES_DIR={settings.voices_dir} is not a folder")
        return settings.voices_dir
    return next((d for d in (model_origin / "voices", settings.volume_dir / "voices")
                 if d.is_dir()), None)


def read_voices(model_folder: Path, folder: Path | None) -> dict[str, VoiceClip | VoiceError]:
    """The presets (from the model folder) and the voices folder's voices, or why each failed."""
    out: dict[str, VoiceClip | VoiceError] = {}
    for name, preset in PRESETS.items():
        try:
            out[name] = read_clip(name, preset.speaker, preset.transcript,
                                  model_folder / preset.wav, model_folder / preset.wav)
        except VoiceError as e:
            out[name] = e
    if folder is None:
        return out
    manifests = sorted(folder.glob("*.json"))
    for path in manifests:
        try:
            out[path.stem] = read_manifest(path)
        except VoiceError as e:
            out[path.stem] = e
        except OSError as e:
            out[path.stem] = VoiceError(f"{path}: cannot be read ({e.strerror})")
    used = {c.audio_path.resolve() for c in out.values() if isinstance(c, VoiceClip)}
    for audio in sorted(folder.iterdir()):
        if (audio.suffix.lower() in AUDIO_SUFFIXES and audio.resolve() not in used
                and not audio.with_suffix(".json").exists()):
            log.warning("%s: no voice uses this clip (a voice is a NAME.json naming its audio, "
                        "transcript and speaker)", audio)
    return out


def choose_default(clips: dict[str, VoiceClip | VoiceError], configured: str | None) -> str:
    """The voice of requests that name none. A CSM_DEFAULT_VOICE that is set must exist and
    have read cleanly (StartupError otherwise); unset, it is the first preset, or none where
    the model lacks its prompt (a fine-tune without them, on the slim image)."""
    if configured is not None:
        check_default(clips, configured)
        return configured
    preset = clips.get(DEFAULT_VOICE)
    if isinstance(preset, VoiceClip):
        return DEFAULT_VOICE
    log.warning("the default voice is none: the preset %s is unusable (%s); set "
                "CSM_DEFAULT_VOICE to choose another", DEFAULT_VOICE, preset)
    return NO_VOICE


def check_default(clips: dict[str, VoiceClip | VoiceError], default: str) -> None:
    """The default voice must exist and have read cleanly (StartupError otherwise)."""
    if default != NO_VOICE and default not in clips:
        raise StartupError(f"CSM_DEFAULT_VOICE={default}: no such voice; the voices are "
                           f"{', '.join(sorted(clips))} and {NO_VOICE}")
    if isinstance(clips.get(default), VoiceError):
        raise StartupError(f"the default voice {default} (CSM_DEFAULT_VOICE) is unusable: "
                           f"{clips[default]}")


def register_voices(engine: Engine, clips: dict[str, VoiceClip | VoiceError],
                    default: str) -> dict[str, Segment]:
    """Encode and prefill every usable voice once; report the others. The default voice must
    be usable (StartupError otherwise)."""
    check_default(clips, default)
    voices: dict[str, Segment] = {}
    for name, clip in clips.items():
        try:
            if isinstance(clip, VoiceError):
                raise clip
            voices[name] = encode(engine, clip)
        except VoiceError as e:
            if name == default:
                raise StartupError(f"the default voice {name} (CSM_DEFAULT_VOICE) is unusable: {e}") from None
            log.error("voice %s skipped: %s", name, e)
            continue
        for warning in clip.warnings:
            log.warning("voice %s: %s", name, warning)
    log.info("voices: %s (default %s)", ", ".join(sorted(voices)), default)
    return voices


def encode(engine: Engine, clip: VoiceClip) -> Segment:
    segment = engine.segment(clip.speaker, clip.transcript, clip.audio, clip.rate)
    positions = len(engine.tokenizer.encode_turn(clip.speaker, clip.transcript)) + segment.codes.shape[1] + 1
    if positions > engine.max_positions - MIN_ROOM_FRAMES:
        raise VoiceError(
            f"{clip.file}: the voice takes {positions} of the model's {engine.max_positions} "
            f"positions, leaving room for less than {MIN_ROOM_FRAMES * FRAME_MS / 1000:.0f} s of "
            "speech; use a shorter clip (10-30 s)")
    engine.register_prefix(segment)
    return segment


def voice_list(voices: dict[str, Segment], default: str) -> dict[str, Any]:
    """The answer to {"task": "list_voices"}."""
    return {"task": "list_voices", "default": default, "voices": [
        {"name": name, "speaker": segment.speaker,
         "kind": "preset" if name in PRESETS else "custom",
         "seconds": round(segment.codes.shape[1] * FRAME_MS / 1000, 2)}
        for name, segment in sorted(voices.items())]}
