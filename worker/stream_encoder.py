"""Encoding audio incrementally, so that streamed chunks concatenate into one valid file.

- pcm: raw little-endian 16-bit samples, no header.
- wav: the first chunk starts with a WAV header whose sizes say "unknown" (0xFFFFFFFF, what
  streaming servers send); the rest is raw PCM.
- ogg (Vorbis), opus (Ogg Opus): libsndfile's own encoder writing into memory; each chunk is
  the bytes it produced since the last one (Ogg emits whole pages, so a chunk can be empty
  until a page fills).
- mp3, aac, flac: FFmpeg's encoders into a sink that can't seek (worker.ffmpeg_encoder), since
  libsndfile's MP3 and FLAC writers rewrite the file's start when it closes and it has no AAC.
"""

from __future__ import annotations

import io
import struct

import soundfile as sf
from torch import Tensor

from .audio_io import OUTPUT_FORMATS, clipped_samples, pcm16
from .ffmpeg_encoder import FFMPEG_FORMATS, FfmpegEncoder


def wav_stream_header(sample_rate: int) -> bytes:
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", unknown))


class StreamEncoder:
    def __init__(self, fmt: str, sample_rate: int):
        self.fmt = fmt
        self.sample_rate = sample_rate
        self.started = False
        self.buffer: io.BytesIO | None = None
        self.file: sf.SoundFile | None = None
        self.ffmpeg: FfmpegEncoder | None = None
        self.sent = 0
        if fmt in FFMPEG_FORMATS:
            self.ffmpeg = FfmpegEncoder(fmt, sample_rate)
        elif fmt in ("ogg", "opus"):
            container, subtype = OUTPUT_FORMATS[fmt]
            self.buffer = io.BytesIO()
            self.file = sf.SoundFile(self.buffer, "w", samplerate=sample_rate, channels=1,
                                     format=container, subtype=subtype)
        elif fmt not in ("pcm", "wav"):
            raise ValueError(f"unknown format {fmt!r}")

    def push(self, audio: Tensor) -> bytes:
        if self.ffmpeg is not None:
            return self.ffmpeg.push(clipped_samples(audio))
        if self.file is None:
            return self._header() + pcm16(audio)
        self.file.write(clipped_samples(audio))
        return self._new_bytes()

    def close(self) -> bytes:
        if self.ffmpeg is not None:
            return self.ffmpeg.close()
        if self.file is None:
            return self._header()
        self.file.close()
        return self._new_bytes()

    def _header(self) -> bytes:
        """The WAV header, once, before the first samples (or alone for an empty stream)."""
        first = not self.started and self.fmt == "wav"
        self.started = True
        return wav_stream_header(self.sample_rate) if first else b""

    def _new_bytes(self) -> bytes:
        data = self.buffer.getvalue()
        new, self.sent = data[self.sent:], len(data)
        return new
