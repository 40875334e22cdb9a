"""What the service hands its front doors: encoded audio ready to leave."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass
class Chunk:
    """`data` encodes `samples` samples of audio starting at sample `offset`."""

    index: int
    offset: int
    samples: int
    data: bytes
    final: bool = False
    summary: dict[str, Any] | None = None  # the last chunk's: what a response reports
    codes: Tensor | None = None  # the last chunk's: every frame's codes [32, frames]
