"""A job's timings, with one meaning whatever the front door (queue or HTTP, whole or streamed).

All times are milliseconds from the moment the service took the job (after parsing, before the
reference audio is encoded):
- first_decoded_ms: the engine handed over its first decoded audio;
- first_audio_ms: the first audio was ready to leave, watermarked and encoded (time to first
  byte as the server sees it: the first chunk of a stream, the whole file otherwise);
- generate_ms: the engine handed over its last audio (prompt, frames and decoding);
- watermark_ms, encode_ms: time spent marking and encoding, summed over the job;
- total_ms: the last audio was ready to leave;
- real_time_factor: total time over the audio's duration (below 1: faster than real time).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timer:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_decoded: float | None = None
        self.generated: float | None = None
        self.first_audio: float | None = None
        self.spent = {"watermark_ms": 0.0, "encode_ms": 0.0}

    def _ms(self, at: float | None = None) -> float:
        return 1000 * ((time.perf_counter() if at is None else at) - self.started)

    def decoded(self) -> None:
        """Audio arrived from the engine (call for every block)."""
        self.generated = time.perf_counter()
        if self.first_decoded is None:
            self.first_decoded = self.generated

    def audio_ready(self) -> None:
        """Audio is ready to leave (call for every chunk; the first one counts)."""
        if self.first_audio is None:
            self.first_audio = time.perf_counter()

    @contextmanager
    def spending(self, what: str) -> Iterator[None]:
        """Adds the block's time to `watermark_ms` or `encode_ms`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spent[what] += 1000 * (time.perf_counter() - start)

    def report(self, audio_seconds: float, load_ms: float) -> dict[str, float]:
        total = self._ms()
        first = self._ms(self.first_audio) if self.first_audio is not None else total
        timings = {
            "first_audio_ms": first,
            "first_decoded_ms": self._ms(self.first_decoded or self.generated),
            "generate_ms": self._ms(self.generated),
            **self.spent,
            "total_ms": total,
            "real_time_factor": total / 1000 / audio_seconds if audio_seconds else 0.0,
            "load_ms": load_ms,
        }
        return {k: round(v, 3) for k, v in timings.items()}
