"""Streaming a job: watermarked audio chunks as the scheduler decodes them, then a summary.

Audio leaves in whole periods of the watermark's message (~0.975 s, see
csm.watermark.WatermarkStream): a shorter independently-marked chunk can't carry a readable
key, and marking chunk by chunk without a shared grid scrambles it. So the first chunk goes
out as soon as about one second of audio has been generated (on a GPU that is a few dozen
frame steps, well under the second it lasts) and every later chunk is about a second long;
the last chunk carries the rest and the summary of a normal response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from csm.codec import SAMPLE_RATE
from csm.engine import Generation

from .audio_io import to_base64
from .stream_encoder import StreamEncoder

if TYPE_CHECKING:
    from .schema import GenerateRequest
    from .service import Worker


async def stream_items(worker: "Worker", request: "GenerateRequest", generation: Generation,
                       events: asyncio.Queue) -> AsyncIterator[dict[str, Any]]:
    marker = worker.engine.watermarker.stream(SAMPLE_RATE, worker.settings.watermark_key)
    encoder = StreamEncoder(request.response_format, SAMPLE_RATE)
    index = offset = frames = 0
    first_chunk_ms: float | None = None

    def item(audio, final: bool) -> dict[str, Any]:
        data = encoder.push(audio) if audio.numel() else b""
        if final:
            data += encoder.close()
        return {"chunk_index": index, "sample_offset": offset, "samples": int(audio.numel()),
                "format": request.response_format, "sample_rate": SAMPLE_RATE,
                "audio_base64": to_base64(data), "final": final}

    async for block in worker.blocks(events):
        frames += block.codes.shape[1]
        marked = await asyncio.to_thread(marker.push, block.audio)
        if not marked.numel():
            continue
        chunk = await asyncio.to_thread(item, marked, False)
        if first_chunk_ms is None:
            first_chunk_ms = 1000 * (time.perf_counter() - generation.started)
        yield chunk
        index += 1
        offset += chunk["samples"]
    last = await asyncio.to_thread(lambda: item(marker.close(), True))
    total = offset + last["samples"]
    total_ms = 1000 * (time.perf_counter() - generation.started)
    seconds = total / SAMPLE_RATE
    timings = {"first_audio_ms": first_chunk_ms if first_chunk_ms is not None else total_ms,
               "total_ms": total_ms,
               "real_time_factor": total_ms / 1000 / seconds if seconds else 0.0}
    yield {**last, **worker.summary(generation, 1000 * seconds, frames, bool(total), timings),
           "chunks": index + 1}
