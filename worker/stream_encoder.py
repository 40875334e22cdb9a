"""Encoding audio incrementally, so that streamed chunks concatenate into one valid file.

- pcm: raw little-endian 16-bit samples, no header.
- wav: the first chunk starts with a WAV header whose sizes say "unknown" (0xFFFFFFFF, what
  streaming servers send); the rest is raw PCM.
- ogg (Vorbis), opus (Ogg Opus): libsndfile's own encoder writing into memory; each chunk is
  the bytes it produced since the last one (Ogg emits whole pages, so a chunk can be empty
  until a page fills).
FLAC and MP3 go back to the start of the file when it closes (FLAC's stream info, MP3's
Xing/Info tag), so bytes already sent would be wrong: they cannot be streamed this way.
"""

from __future__ import annotations

import io
import struct

import soundfile as sf
from torch import Tensor

from .audio_io import OUTPUT_FORMATS, clipped_samples, pcm16

STREAM_FORMATS = ("pcm", "wav", "ogg", "opus")


def wav_stream_header(sample_rate: int) -> bytes:
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", unknown))


class StreamEncoder:
    def __init__(self, fmt: str, sample_rate: int):
        if fmt not in STREAM_FORMATS:
            raise ValueError(f"{fmt} cannot be streamed; use one of {', '.join(STREAM_FORMATS)}")
        self.fmt = fmt
        self.sample_rate = sample_rate
        self.started = False
        self.buffer: io.BytesIO | None = None
        self.file: sf.SoundFile | None = None
        self.sent = 0
        if fmt in ("ogg", "opus"):
            container, subtype = OUTPUT_FORMATS[fmt]
            self.buffer = io.BytesIO()
            self.file = sf.SoundFile(self.buffer, "w", samplerate=sample_rate, channels=1,
                                     format=container, subtype=subtype)

    def push(self, audio: Tensor) -> bytes:
        if self.file is None:
            header = b"" if self.started or self.fmt == "pcm" else wav_stream_header(
                self.sample_rate)
            self.started = True
            return header + pcm16(audio)
        self.file.write(clipped_samples(audio))
        return self._new_bytes()

    def close(self) -> bytes:
        if self.file is None:
            return b"" if self.started or self.fmt == "pcm" else wav_stream_header(
                self.sample_rate)
        self.file.close()
        return self._new_bytes()

    def _new_bytes(self) -> bytes:
        data = self.buffer.getvalue()
        new, self.sent = data[self.sent:], len(data)
        return new
