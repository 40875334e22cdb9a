"""A cloned-voice request with its reference clip's Mimi codes encoded each time, then kept
(worker/clip_codes.py), in one run:

    python -m bench.clip_cache                  # the tiny model on the CPU (see BENCHMARKS.md)
    python -m bench.clip_cache --model-dir models/csm-1b --device cuda

Reports the median time of the worker's context step (reading, resampling and encoding the
clip, or finding its codes) and of the whole job's first audio, each way.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from csm.testing import make_tiny
from worker.clip_codes import ClipCodes
from worker.schema import parse_request
from worker.service import Worker
from worker.settings import load_settings

from .run import reference_audio


async def first_audio_ms(worker: Worker, payload: dict) -> float:
    answers = [a async for a in worker.run(payload, allow_stream=False)]
    return answers[-1]["timings"]["first_audio_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="default: a tiny random-weight model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    folder = args.model_dir or make_tiny(Path(tempfile.mkdtemp()), "original")
    worker = Worker.start(load_settings({"CSM_MODEL_DIR": str(folder),
                                         "CSM_DEVICE": args.device}))
    payload = {"text": "Cloned.", "max_audio_length_ms": 80, "seed": 1, "voice": "none",
               "context": [{"text": "A reference turn.", "speaker": 0,
                            "audio_base64": reference_audio(args.seconds, 44_100, "WAV")}]}
    request = parse_request(payload, worker.settings.limits, worker.voice_names)
    loop = asyncio.new_event_loop()
    for name, cache in (("encoded each time", ClipCodes(0)), ("codes kept", ClipCodes(64))):
        worker.clip_codes = cache
        worker.context_segments(request)  # warm-up (and, kept, the one encode)
        context_ms, first_ms = [], []
        for _ in range(args.reps):
            start = time.perf_counter()
            worker.context_segments(request)
            context_ms.append(1000 * (time.perf_counter() - start))
            first_ms.append(loop.run_until_complete(first_audio_ms(worker, payload)))
        print(f"{name}: context step {statistics.median(context_ms):.1f} ms, first audio "
              f"{statistics.median(first_ms):.1f} ms (medians of {args.reps}, a "
              f"{args.seconds:g} s clip at 44.1 kHz)")


if __name__ == "__main__":
    main()
