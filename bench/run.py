"""Speed of our engine against transformers' CSM on identical random weights, in one run.

    python -m bench.run                      # CPU: reduced shapes (see BENCHMARKS.md)
    python -m bench.run --shapes csm-1b --device cuda --frames 128 --concurrency 1,8,32,64

On a GPU, `python -m bench.gpu_suite` runs these measurements at csm-1b shapes together with
the checks only a GPU shows (see BENCHMARKS.md).

Both sides get the same weights, the same text prompt and the same number of frames (the
end-frame stop is off, so runs are comparable). Each measurement is repeated after a warm-up;
the median and the spread (min..max) are reported. Our engine is timed end to end including
Mimi's streaming decode; transformers is timed for its code generation alone (it has no
streaming decode), which favours it. The weights are random: the audio is noise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file

from csm.config import CSM_1B, TINY, CSMConfig, LlamaConfig
from csm.engine import Engine, GenerationRequest
from csm.testing.tiny import make_tiny, to_transformers_format
from csm.text_tokenizer import TextTokenizer
from worker.service import Worker
from worker.settings import load_settings

MID = replace(
    CSM_1B,
    backbone=LlamaConfig(num_layers=4, dim=512, num_heads=8, num_kv_heads=2,
                         intermediate_size=1536, max_seq_len=2048),
    decoder=LlamaConfig(num_layers=2, dim=256, num_heads=4, num_kv_heads=2,
                        intermediate_size=768, max_seq_len=33),
)
SHAPES: dict[str, CSMConfig] = {"tiny": TINY, "mid": MID, "csm-1b": CSM_1B}
TEXT = "The quick brown fox jumps over the lazy dog, twice, before breakfast."


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(call: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of one call, after two warm-up calls."""
    for _ in range(2):
        call()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(engine: Engine, frames: int, reps: int) -> dict:
    request = GenerationRequest(text=TEXT, max_audio_length_ms=frames * 80, seed=1,
                                stop_at_end_frame=False)
    engine.generate(request)  # warm-up
    fps, rtf, first_audio = [], [], []
    for rep in range(reps):
        result = engine.generate(replace(request, seed=rep))
        assert result.frames == frames
        seconds = result.timings_ms["generate_ms"] / 1000
        fps.append(frames / seconds)
        rtf.append(seconds / (frames * 0.08))
        first_audio.append(result.timings_ms["first_audio_ms"])
    return {"frames_per_s": stats(fps), "real_time_factor": stats(rtf),
            "first_audio_ms": stats(first_audio)}


def folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The original-format weights of a model folder (what our engine loads), on the CPU."""
    return load_file(str(folder / "model.safetensors"))


def prompt_ids(folder: Path) -> list[int]:
    """The benchmark's text prompt, tokenised as our engine tokenises it."""
    return TextTokenizer(folder / "tokenizer.json").encode_turn(0, TEXT)


def transformers_side(cfg: CSMConfig, state: dict, ids: list[int], device: torch.device,
                      dtype: torch.dtype, frames: int, reps: int,
                      compile_forward: bool = False) -> dict:
    """transformers' `generate` with a static cache on the same weights and prompt.

    `compile_forward=False` keeps transformers from torch.compile-ing its forward pass, which
    it does on its own on CUDA with a static cache (minutes of compilation at csm-1b shapes).
    """
    from transformers import CsmConfig, CsmForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from csm.config import config_to_hf

    hf_logging.set_verbosity_error()
    hf_config = config_to_hf(cfg)
    hf_config["depth_decoder_config"]["backbone_hidden_size"] = cfg.backbone.dim
    with torch.device(device):  # random init on the device: seconds instead of minutes at 1B
        model = CsmForConditionalGeneration(CsmConfig(**hf_config)).eval()
    missing = model.load_state_dict(to_transformers_format(state, cfg), strict=False).missing_keys
    assert all(k.startswith("codec_model.") for k in missing), missing
    model = model.to(dtype=dtype)
    input_ids = torch.tensor([ids], device=device)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  max_new_tokens=frames, do_sample=True, temperature=0.9, top_k=50,
                  depth_decoder_do_sample=True, depth_decoder_temperature=0.9,
                  depth_decoder_top_k=50, cache_implementation="static",
                  disable_compile=not compile_forward)
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        model.generate(**kwargs)  # warm-up (and compilation, if any)
        sync(device)
        warm_up_s = time.perf_counter() - start
        fps, rtf = [], []
        for rep in range(reps):
            torch.manual_seed(rep)
            sync(device)
            start = time.perf_counter()
            out = model.generate(**kwargs)
            sync(device)
            seconds = time.perf_counter() - start
            assert out.shape[1] == frames, f"transformers stopped after {out.shape[1]} frames"
            fps.append(frames / seconds)
            rtf.append(seconds / (frames * 0.08))
    return {"frames_per_s": stats(fps), "real_time_factor": stats(rtf),
            "warm_up_s": warm_up_s, "compiled": compile_forward,
            "peak_memory_mb": peak_memory_mb(device)}


def reference_audio(seconds: float, rate: int = 24_000, fmt: str = "FLAC") -> str:
    """A tone (audible, compressible; not speech, but its codes cost what a voice's do) as an
    audio file in base64: a reference turn."""
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


async def worker_stream(worker: Worker, frames: int, reps: int, voice: str = "none",
                        **fields: Any) -> dict:
    """Time to the first streamed chunk through the worker (watermarked), against the same
    request answered whole; `fields` join the request (a context, say)."""
    payload = {"text": TEXT, "voice": voice, "max_audio_length_ms": frames * 80, **fields}

    async def first_and_last(stream: bool, seed: int) -> tuple[float, float]:
        start, first = time.perf_counter(), None
        async for item in worker.run(dict(payload, seed=seed, stream=stream)):
            assert "error" not in item, item
            first = first or time.perf_counter() - start
        return 1000 * first, 1000 * (time.perf_counter() - start)

    first_ms, whole_ms = [], []
    await first_and_last(True, 0)  # warm-up
    for rep in range(reps):
        first_ms.append((await first_and_last(True, rep))[0])
        whole_ms.append((await first_and_last(False, rep))[1])
    return {"stream_first_chunk_ms": stats(first_ms), "whole_response_ms": stats(whole_ms),
            "first_chunk_over_whole": statistics.median(first_ms) / statistics.median(whole_ms)}


def concurrency_sweep(engine: Engine, frames: int, levels: list[int],
                      sequential: bool = True) -> list[dict]:
    """Aggregate throughput of n jobs at once, and (with `sequential`) of the same n jobs one
    after another."""
    rows = []
    for n in levels:
        reqs = [GenerationRequest(text=f"{TEXT} ({i})", max_audio_length_ms=frames * 80,
                                  seed=i, stop_at_end_frame=False) for i in range(n)]
        row: dict = {"jobs": n}
        if sequential:
            start = time.perf_counter()
            for r in reqs:
                engine.generate(r)
            seconds = time.perf_counter() - start
            row["sequential_frames_per_s"] = n * frames / seconds
        start = time.perf_counter()
        generations = [engine.start(r) for r in reqs]
        results = [engine.finish(g, list(g.blocks())) for g in generations]
        together = time.perf_counter() - start
        assert all(r.frames == frames for r in results), [r.frames for r in results]
        row.update({
            "aggregate_frames_per_s": n * frames / together,
            "per_stream_real_time_factor": statistics.median(
                r.timings_ms["generate_ms"] / 1000 / (frames * 0.08) for r in results),
            "first_audio_ms_median": statistics.median(
                r.timings_ms["first_audio_ms"] for r in results),
            "peak_memory_mb": peak_memory_mb(engine.device),
        })
        if sequential:
            row["speedup_vs_sequential"] = (row["aggregate_frames_per_s"]
                                            / row["sequential_frames_per_s"])
        rows.append(row)
    return rows


def start_worker(folder: Path, device: torch.device | str, concurrency: int,
                 **env: str) -> Worker:
    """The worker as RunPod starts it, on a model folder (extra settings as CSM_* values)."""
    return Worker.start(load_settings({
        "CSM_MODEL_DIR": str(folder), "CSM_DEVICE": str(device),
        "CSM_MAX_CONCURRENCY": str(concurrency), "CSM_LOG_LEVEL": "ERROR", **env}))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--shapes", choices=SHAPES, default="mid")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--max-batch", type=int, default=0,
                        help="rows the engine is built for (0: the highest concurrency)")
    parser.add_argument("--full-size-codecs", action="store_true",
                        help="the real Mimi and SilentCipher sizes at any shapes (csm-1b: always)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="our engine and worker as CSM_COMPILE=1 loads them (minutes, cold)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = SHAPES[args.shapes]
    levels = [int(n) for n in args.concurrency.split(",")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report: dict = {"shapes": args.shapes, "device": str(device), "dtype": str(dtype),
                    "frames": args.frames, "reps": args.reps, "compiled": args.compile,
                    "max_batch": args.max_batch or max(levels),
                    "full_size_codecs": args.full_size_codecs or args.shapes == "csm-1b",
                    "torch_threads": torch.get_num_threads(),
                    "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny(Path(tmp), cfg=cfg, full_size_codecs=report["full_size_codecs"])
        start = time.perf_counter()
        with Engine.load(folder, device=device, max_batch=report["max_batch"],
                         compile_backend="inductor" if args.compile else None) as engine:
            sync(device)
            report["startup_ms"] = {k: round(v, 1) for k, v in engine.startup_ms.items()}
            report["startup_ms"]["total"] = round(1000 * (time.perf_counter() - start), 1)
            report["ours"] = ours(engine, args.frames, args.reps)
            report["concurrency"] = concurrency_sweep(engine, args.frames, levels)
        if not args.skip_transformers:
            report["transformers"] = transformers_side(cfg, folder_weights(folder),
                                                       prompt_ids(folder), device, dtype,
                                                       args.frames, args.reps)
            report["fps_ratio_vs_transformers"] = (
                report["ours"]["frames_per_s"]["median"]
                / report["transformers"]["frames_per_s"]["median"])
        report["worker_stream"] = asyncio.run(
            worker_stream(start_worker(folder, device, 1, CSM_COMPILE=str(int(args.compile))),
                          args.frames, args.reps))
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
