"""The native JSON API's shapes (queue jobs and HTTP `/v1/generate`): a whole response (its
audio as base64, or as a URL into the worker's bucket), or one item per streamed chunk."""

from __future__ import annotations

from typing import Any

from csm.codec import SAMPLE_RATE

from .audio_io import MEDIA_TYPES, to_base64
from .chunk import Chunk
from .result_store import StoredResult


def whole_response(chunk: Chunk, fmt: str) -> dict[str, Any]:
    return {"audio_base64": to_base64(chunk.data), "format": fmt, "media_type": MEDIA_TYPES[fmt],
            **chunk.summary}


def stored_response(chunk: Chunk, fmt: str, stored: StoredResult,
                    upload_ms: float) -> dict[str, Any]:
    """A whole response whose audio waits in the bucket, fetched with a GET on `audio_url`."""
    timings = {**chunk.summary["timings"], "upload_ms": round(upload_ms, 3)}
    return {"audio_url": stored.url, "audio_url_expires_at": stored.expires_at,
            "audio_bytes": len(chunk.data), "format": fmt, "media_type": MEDIA_TYPES[fmt],
            **chunk.summary, "timings": timings}


def chunk_item(chunk: Chunk, fmt: str) -> dict[str, Any]:
    """A streamed chunk; the last also carries the summary of a whole response and `chunks`."""
    item = {"chunk_index": chunk.index, "sample_offset": chunk.offset, "samples": chunk.samples,
            "format": fmt, "sample_rate": SAMPLE_RATE, "audio_base64": to_base64(chunk.data),
            "final": chunk.final}
    if chunk.final:
        item.update(chunk.summary, chunks=chunk.index + 1)
    return item
