"""Watermarking: the one place that decides whether and with which key audio is marked, and
marks it, whole or streamed.

By default every clip carries the deployment's key (CSM_WATERMARK_KEY). A request may turn
the mark off (`watermark: false`) or bring its own key (`watermark_key`) only where the operator
allows it (CSM_ALLOW_WATERMARK_OVERRIDE=1); elsewhere either field is refused, never ignored.
The response says whether the audio was marked and with whose key; the key itself is never
logged or echoed.

Whole clips are marked in one call; streams in periods of the key's message, the first also
in parts so that audio leaves early (see csm.watermark.WatermarkStream), and the stream reads
like one clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from csm.codec import SAMPLE_RATE
from csm.watermark import Watermarker

from .schema import RequestError
from .settings import Settings

KeySource = Literal["deployment", "caller"]


@dataclass(frozen=True)
class Marking:
    """A request's watermark: the key, or None for unmarked audio, and whose key it is."""

    key: tuple[int, ...] | None
    source: KeySource | None

    def fields(self, marked: bool) -> dict[str, object]:
        """The response's account of it (`marked`: whether there was audio to mark)."""
        marked = marked and self.key is not None
        return {"watermarked": marked, "watermark_key_source": self.source if marked else None}

    def __repr__(self) -> str:  # never print the key
        return f"Marking(source={self.source!r})"


class MarkStream(Protocol):
    def push(self, audio: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> torch.Tensor: ...


class _Unmarked:
    """A stream without a mark: audio leaves as soon as it is decoded."""

    def push(self, audio: torch.Tensor) -> torch.Tensor:
        return audio

    def close(self) -> torch.Tensor:
        return torch.zeros(0)


class Watermarking:
    def __init__(self, watermarker: Watermarker | None, settings: Settings):
        self.watermarker = watermarker
        self.settings = settings

    def marking(self, watermark: bool | None, key: list[int] | None) -> Marking:
        """A request's `watermark` and `watermark_key` fields -> its Marking, or RequestError."""
        if not self.settings.allow_watermark_override:
            for name, value in (("watermark", watermark), ("watermark_key", key)):
                if value is not None:
                    raise RequestError(
                        f"{name}: per-request watermark control is off on this deployment "
                        "(the operator can allow it with CSM_ALLOW_WATERMARK_OVERRIDE=1); "
                        "remove the field")
        if watermark is False:
            if key is not None:
                raise RequestError("watermark_key: not allowed with watermark false")
            return Marking(None, None)
        if self.watermarker is None:
            return Marking(None, None)
        if key is not None:
            return Marking(tuple(key), "caller")
        return Marking(self.settings.watermark_key, "deployment")

    def whole(self, marking: Marking, audio: torch.Tensor) -> torch.Tensor:
        if marking.key is None or not audio.numel():
            return audio
        return self.watermarker.embed(audio, SAMPLE_RATE, marking.key)

    def stream(self, marking: Marking) -> MarkStream:
        if marking.key is None:
            return _Unmarked()
        return self.watermarker.stream(SAMPLE_RATE, marking.key)

    def verify(self, audio: torch.Tensor, sample_rate: int, key: list[int] | None) -> bool:
        """Whether `audio` carries the deployment's key, or the caller's (operator-gated)."""
        if key is not None:
            self.marking(None, key)  # the same gate as marking with it
        return self.watermarker.verify(audio, sample_rate,
                                       tuple(key) if key else self.settings.watermark_key)
