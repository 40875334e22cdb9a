"""Part `int8` (named with --parts, not in the default run): `CSM_DECODER_INT8=1`, the depth
decoder's projections in int8 (csm.llama.Int8Linear), against the engine as it is.

What int8 does to what the decoder draws from: the decoder's logits for codebooks 1..31,
teacher-forced on the plain engine's own frames (its codes and the backbone states they were
drawn from), in the speed dtype with full-precision and int8 weights: relative error per
frame and codebook, and how often the top choice stays the same; and the first frame where
an int8 engine's codes leave the plain one's for the same job (for information: one changed
draw changes every frame after it). The weights are random: a trained model's rows may
quantize better or worse.

Speed, graphs as deployed, not compiled: batch-1 frames/s and 8 jobs at once (4 in the CPU
mode), both engines loaded from the same folder in one run. Eagerly an int8 layer converts
its weight to full precision in a kernel of its own, which reads and writes more bytes than
the weight it replaces: expect int8 to be slower here. It is meant to run compiled, where
inductor folds the conversion into the product: the `compiled` part measures that
(`compiled_int8`).
"""

from __future__ import annotations

import math

import torch

from csm.checkpoint import load_model
from csm.engine import Engine, GenerationRequest
from csm.testing.teacher_forced import backbone_states, decoder_logits
from csm.text_tokenizer import TextTokenizer

from .. import run as bench
from .context import Context
from .graphs_eager import first_difference


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def logits_effect(ctx: Context, codes: torch.Tensor) -> dict:
    """int8 against full precision, teacher-forced on `codes` [32, F] (bench.TEXT's frames)."""
    folder = ctx.model_dir(ctx.mode.main_shapes)
    model = load_model(folder, ctx.device, ctx.dtype)
    model.backbone.setup_cache(1)
    model.decoder.setup_cache(codes.shape[1])
    ids = TextTokenizer(folder / "tokenizer.json").encode_turn(0, bench.TEXT)
    h = backbone_states(model, ids, codes)
    frames = codes.T.to(ctx.device)
    model.decoder.fuse()
    full_bytes = weight_bytes(model.decoder)
    full = decoder_logits(model, h, frames)
    model.decoder.quantize_int8()
    int8 = decoder_logits(model, h, frames)
    relative = (int8 - full).norm(dim=-1) / full.norm(dim=-1)
    return {"frames": int(codes.shape[1]),
            "relative_error_median": float(relative.median()),
            "relative_error_max": float(relative.max()),
            "top1_agreement": float((int8.argmax(-1) == full.argmax(-1)).float().mean()),
            "decoder_weight_mb": {"full": full_bytes / 2**20,
                                  "int8": weight_bytes(model.decoder) / 2**20}}


def run(ctx: Context) -> None:
    mode = ctx.mode
    jobs = mode.concurrency[1]
    ctx.record(shapes=mode.main_shapes, dtype=mode.speed_dtype, frames=mode.frames,
               reps=mode.reps, graphs=mode.graphs, jobs=jobs)
    request = GenerationRequest(text=bench.TEXT, max_audio_length_ms=mode.frames * 80, seed=1,
                                stop_at_end_frame=False)
    codes = {}
    for label in ("plain", "int8"):
        ctx.step(f"{label}: building the engine, then a first job")
        with Engine.load(ctx.model_dir(mode.main_shapes), ctx.device, ctx.dtype,
                         max_batch=jobs, use_graphs=mode.graphs,
                         decoder_int8=label == "int8") as engine:
            codes[label] = engine.generate(request).codes
            ctx.step(f"{label}: batch 1")
            ctx.record(**{label: bench.ours(engine, mode.frames, mode.reps)})
            ctx.step(f"{label}: {jobs} jobs at once")
            ctx.record(**{f"{label}_{jobs}_jobs": bench.concurrency_sweep(
                engine, mode.frames, [jobs], sequential=False)[0]})
    ctx.step("teacher-forced decoder logits, full precision and int8")
    effect = logits_effect(ctx, codes["plain"])
    measured = ctx.result["measurements"]
    plain, int8 = (measured[label]["frames_per_s"]["median"] for label in ("plain", "int8"))
    ctx.record(decoder_logits_int8_vs_full=effect,
               int8_over_plain_frames_per_s=int8 / plain,
               int8_over_plain_aggregate_frames_per_s=(
                   measured[f"int8_{jobs}_jobs"]["aggregate_frames_per_s"]
                   / measured[f"plain_{jobs}_jobs"]["aggregate_frames_per_s"]),
               first_differing_frame=first_difference(codes["plain"], codes["int8"]))
    ctx.check("both engines drew every frame at a positive, finite speed",
              all(c.shape[1] == mode.frames for c in codes.values())
              and all(math.isfinite(f) and f > 0 for f in (plain, int8)),
              {"frames": [c.shape[1] for c in codes.values()], "frames_per_s": [plain, int8]})
    # Per-row int8 moves the tiny model's logits by ~1% (tests/test_int8.py); a scale on the
    # wrong axis or a lost row moves them by tens of percent.
    ctx.check("int8 decoder logits within 5% of full precision (median over frames and "
              "codebooks)", effect["relative_error_median"] < 0.05,
              effect["relative_error_median"])
    ctx.check("the int8 decoder's weights take at most 60% of the full-precision bytes",
              effect["decoder_weight_mb"]["int8"] <= 0.6 * effect["decoder_weight_mb"]["full"],
              effect["decoder_weight_mb"])
