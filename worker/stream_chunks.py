"""Streaming a job: audio chunks as the scheduler decodes them, then a final summary.

The first chunk goes out as soon as the first block of frames is decoded (a few frames,
about 0.3 s of audio) for a low time to first audio; later chunks gather about a second each
to keep per-chunk overhead low. Each chunk is watermarked on its own before it leaves:
SilentCipher carries its 5-byte message in about one second of audio, so every full chunk
carries the key (see the README's streaming notes for what this costs and guarantees).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import torch

from csm.codec import SAMPLE_RATE
from csm.engine import Generation

from .audio_io import to_base64
from .stream_encoder import StreamEncoder

if TYPE_CHECKING:
    from .schema import GenerateRequest
    from .service import Worker

FIRST_CHUNK_SAMPLES = SAMPLE_RATE // 5  # 0.2 s: the first block (4 frames) is enough
CHUNK_SAMPLES = SAMPLE_RATE  # then about a second per chunk


async def stream_items(worker: "Worker", request: "GenerateRequest", generation: Generation,
                       events: asyncio.Queue) -> AsyncIterator[dict[str, Any]]:
    key = worker.settings.watermark_key
    watermarker = worker.engine.watermarker
    encoder = StreamEncoder(request.response_format, SAMPLE_RATE)
    pending: list[torch.Tensor] = []
    index = offset = frames = 0
    first_chunk_ms: float | None = None

    def chunk(audio: torch.Tensor, final: bool) -> dict[str, Any]:
        """Watermark and encode one chunk (runs in a worker thread)."""
        if audio.numel():
            audio = watermarker.embed(audio, SAMPLE_RATE, key)
        data = encoder.push(audio) if audio.numel() else b""
        if final:
            data += encoder.close()
        return {"chunk_index": index, "sample_offset": offset, "samples": int(audio.numel()),
                "format": request.response_format, "sample_rate": SAMPLE_RATE,
                "audio_base64": to_base64(data), "final": final}

    async for block in worker.blocks(events):
        pending.append(block.audio)
        frames += block.codes.shape[1]
        waiting = sum(p.numel() for p in pending)
        if waiting >= (CHUNK_SAMPLES if index else FIRST_CHUNK_SAMPLES):
            item = await asyncio.to_thread(chunk, torch.cat(pending), False)
            pending = []
            if first_chunk_ms is None:
                first_chunk_ms = 1000 * (time.perf_counter() - generation.started)
            yield item
            index += 1
            offset += item["samples"]
    tail = torch.cat(pending) if pending else torch.zeros(0)
    last = await asyncio.to_thread(chunk, tail, True)
    total = offset + last["samples"]
    total_ms = 1000 * (time.perf_counter() - generation.started)
    seconds = total / SAMPLE_RATE
    timings = {"first_audio_ms": first_chunk_ms if first_chunk_ms is not None else total_ms,
               "total_ms": total_ms,
               "real_time_factor": total_ms / 1000 / seconds if seconds else 0.0}
    yield {**last, **worker.summary(generation, 1000 * seconds, frames, bool(total), timings),
           "chunks": index + 1}
