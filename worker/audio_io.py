"""Audio in and out of the worker: base64 files <-> mono float tensors, with soundfile.

Reading accepts what libsndfile reads (WAV, FLAC, OGG Vorbis/Opus, MP3) at any rate,
mono or stereo. Writing produces the `response_format` the caller asked for: libsndfile for
what it writes, FFmpeg (worker.ffmpeg_encoder) for AAC, which it does not.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from .ffmpeg_encoder import ffmpeg_encode

# format name -> (libsndfile container, subtype); pcm is raw little-endian 16-bit, no header;
# aac is FFmpeg's.
OUTPUT_FORMATS: dict[str, tuple[str, str]] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "opus": ("OGG", "OPUS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "pcm": ("RAW", "PCM_16"),
}
# Bytes per second of 24 kHz mono audio from our encoders, at most: measured on full-scale
# white noise (the hardest input for a codec), whole and streamed, over 3 s and 20 s on
# 2026-12-07 (the larger: flac 50.9 kB/s, mp3 8.1, aac 8.2, ogg 7.7, opus 4.8), rounded up;
# tests/test_worker.py holds the encoders to it.
MAX_BYTES_PER_SECOND = {"wav": 48_000, "pcm": 48_000, "flac": 52_000, "mp3": 9_000,
                        "aac": 9_000, "ogg": 8_500, "opus": 5_500}
MEDIA_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg",
               "opus": "audio/ogg; codecs=opus", "mp3": "audio/mpeg", "aac": "audio/aac",
               "pcm": "audio/L16; rate=24000; channels=1"}
SILENCE_PEAK = 1e-4  # about -80 dBFS: below this a reference clip holds no voice to clone
# One Mimi frame: anything shorter can't even be encoded as audio.
MIN_REFERENCE_SECONDS = 0.08
# What libsndfile (bundled with soundfile) reads; the README lists the same.
READABLE_FORMATS = "WAV, FLAC, OGG (Vorbis or Opus) or MP3"
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


class AudioInputError(ValueError):
    """Caller-supplied audio that can't be used; the message says why and the limit."""


def decode_base64(field: str, data: str, max_bytes: int) -> bytes:
    # base64 inflates by 4/3: refuse before decoding anything too large.
    if len(data) > max_bytes * 4 // 3 + 4:
        raise AudioInputError(f"{field}: about {len(data) * 3 // 4} bytes of audio; the limit "
                              f"is {max_bytes} bytes (CSM_MAX_REFERENCE_BYTES)")
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]  # tolerate data: URLs from browsers
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise AudioInputError(f"{field}: not valid base64") from None


_READ_ERRORS = (sf.LibsndfileError, RuntimeError, TypeError, ValueError)


def _unreadable(field: str, error: Exception) -> AudioInputError:
    # libsndfile's messages name the in-memory file by its Python repr: not for callers.
    detail = getattr(error, "error_string", None) or _OBJECT_REPR.sub("the audio", str(error))
    return AudioInputError(f"{field}: not a readable audio file ({READABLE_FORMATS} "
                           f"expected): {detail}")


def audio_seconds(field: str, raw: bytes) -> float:
    """The length in seconds that the file's header gives, without decoding it: a length limit
    is checked before a long file is decoded (a few MB of Opus hold hours). libsndfile reads
    no more frames than the header gives, so the decoded audio is never longer."""
    try:
        return sf.info(io.BytesIO(raw)).duration
    except _READ_ERRORS as e:
        raise _unreadable(field, e) from None


def read_audio(field: str, raw: bytes) -> tuple[Tensor, int]:
    """Any libsndfile-readable file -> (1-D float32 mono, sample rate)."""
    try:
        data, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except _READ_ERRORS as e:
        raise _unreadable(field, e) from None
    if data.shape[0] == 0:
        raise AudioInputError(f"{field}: the audio is empty")
    if data.shape[0] < MIN_REFERENCE_SECONDS * rate:
        raise AudioInputError(
            f"{field}: the audio is {1000 * data.shape[0] / rate:.2f} ms long; the minimum is "
            f"{1000 * MIN_REFERENCE_SECONDS:g} ms (one Mimi frame), and cloning a voice "
            "takes a few seconds of speech")
    mono = data.mean(axis=1)
    if not np.isfinite(mono).all():
        raise AudioInputError(f"{field}: the audio holds NaN or infinite samples")
    if np.abs(mono).max() < SILENCE_PEAK:
        raise AudioInputError(f"{field}: the audio is silent (peak below -80 dBFS); a "
                              "reference turn needs audible speech")
    return torch.from_numpy(np.ascontiguousarray(mono)), int(rate)


def clipped_samples(audio: Tensor) -> np.ndarray:
    """1-D float32 samples in [-1, 1], on the CPU, as every encoder takes them."""
    return audio.detach().float().cpu().clamp(-1, 1).numpy()


def pcm16(audio: Tensor) -> bytes:
    """Raw little-endian 16-bit samples: the `pcm` format, and WAV's payload."""
    return (clipped_samples(audio) * 32767).round().astype("<i2").tobytes()


def encode_audio(audio: Tensor, sample_rate: int, fmt: str) -> bytes:
    if fmt == "pcm":
        return pcm16(audio)
    if fmt not in OUTPUT_FORMATS:
        return ffmpeg_encode(clipped_samples(audio), sample_rate, fmt)
    container, subtype = OUTPUT_FORMATS[fmt]
    buf = io.BytesIO()
    sf.write(buf, clipped_samples(audio), sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
