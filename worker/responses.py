"""The native JSON API's shapes (queue jobs and HTTP `/v1/generate`): a whole response, or
one item per streamed chunk, audio as base64."""

from __future__ import annotations

from typing import Any

from csm.codec import SAMPLE_RATE

from .audio_io import MEDIA_TYPES, to_base64
from .chunk import Chunk


def whole_response(chunk: Chunk, fmt: str) -> dict[str, Any]:
    return {"audio_base64": to_base64(chunk.data), "format": fmt, "media_type": MEDIA_TYPES[fmt],
            **chunk.summary}


def chunk_item(chunk: Chunk, fmt: str) -> dict[str, Any]:
    """A streamed chunk; the last also carries the summary of a whole response and `chunks`."""
    item = {"chunk_index": chunk.index, "sample_offset": chunk.offset, "samples": chunk.samples,
            "format": fmt, "sample_rate": SAMPLE_RATE, "audio_base64": to_base64(chunk.data),
            "final": chunk.final}
    if chunk.final:
        item.update(chunk.summary, chunks=chunk.index + 1)
    return item
