"""Part `attention`: what one backbone attention call costs per decode step, and which SDPA
kernel serves it. Two of issue 11's speed leads.

The engine (csm/llama.py `attend`) attends from each row's one new position over its key
span with an additive mask, the query heads that share a key/value head passed as that
head's query rows, so that the call has equal heads: with grouped-query heads (`enable_gqa`)
and a mask, no fused CUDA kernel takes it. Timed here at the mode's main shapes and speed
dtype, for each batch size of the speed part's sweep:

- the engine's call over 2048 positions, with the kernel PyTorch picks: its key span once a
  row's positions pass 1536, and every step's before key spans (csm/frame_step.py);
- the same over 512 positions, the engine's first key span: prompts and audio under 512
  positions (the masked tail adds nothing: checked);
- the call the engine made before 2026-11-23: grouped-query heads (`enable_gqa`) and a
  boolean mask over 2048 positions (the same numbers, checked);
- both 2048-position calls with each SDPA backend forced in turn; a backend that refuses a
  call (a mask, grouped-query heads, the device) is reported with its reason.

The frame step makes one such call per backbone layer (16 at csm-1b) per frame, and the
depth decoder one per layer (4) for each of its 31 steps, over its 32 positions.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from csm.llama import attend, fold_mask

from ..run import SHAPES, time_ms
from .context import Context

FULL, BUCKET = 2048, 512
POSITION = 400  # the query's own position: a preset voice's prompt and some audio
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def refused(e: Exception, said: list[warnings.WarningMessage]) -> str:
    """Why a backend refused: torch gives its reasons as warnings, then a generic error."""
    reasons = [str(w.message).strip().splitlines()[0] for w in said] or [str(e).strip()]
    return "refused: " + "; ".join(dict.fromkeys(r[:200] for r in reasons))


def run(ctx: Context) -> None:
    cfg = SHAPES[ctx.mode.main_shapes].backbone
    device, dtype = ctx.device, ctx.dtype
    group = cfg.num_heads // cfg.num_kv_heads
    reps = 50 if device.type == "cuda" else 10
    ctx.record(shapes=ctx.mode.main_shapes, dtype=ctx.mode.speed_dtype, heads=cfg.num_heads,
               kv_heads=cfg.num_kv_heads, head_size=cfg.head_size, position=POSITION,
               calls_per_frame=cfg.num_layers)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tail_errors, grouped_errors, timings = [], [], []
    allowed = torch.arange(FULL, device=device) <= POSITION
    additive = torch.zeros(FULL, device=device, dtype=dtype).masked_fill(~allowed, -math.inf)
    for batch in ctx.mode.concurrency:
        ctx.step(f"batch {batch}")
        q = torch.randn(batch, cfg.num_heads, 1, cfg.head_size, generator=gen)
        k, v = (torch.randn(batch, cfg.num_kv_heads, FULL, cfg.head_size, generator=gen)
                for _ in range(2))
        q, k, v = (t.to(device, dtype) for t in (q, k, v))
        mask = fold_mask(additive.expand(batch, 1, FULL), group)

        def engine(keys: int) -> Tensor:
            return attend(q, k[:, :, :keys], v[:, :, :keys], mask[..., :keys])

        def grouped(keys: int) -> Tensor:
            out = F.scaled_dot_product_attention(
                q, k[:, :, :keys], v[:, :, :keys],
                attn_mask=allowed[:keys].expand(batch, 1, 1, keys), enable_gqa=True)
            return out.transpose(1, 2).reshape(batch, 1, -1)

        full = engine(FULL).float()
        tail_errors.append(float((full - engine(BUCKET).float()).abs().max() / full.abs().max()))
        grouped_errors.append(float((full - grouped(FULL).float()).abs().max()
                                    / full.abs().max()))
        row: dict[str, float | str] = {
            "engine_call_2048_ms": time_ms(lambda: engine(FULL), device, reps),
            "engine_call_512_ms": time_ms(lambda: engine(BUCKET), device, reps),
            "grouped_query_2048_ms": time_ms(lambda: grouped(FULL), device, reps)}
        for label, call in (("", engine), ("grouped_query_", grouped)):
            for name in BACKENDS:
                backend = getattr(SDPBackend, name, None)
                if backend is None:
                    row[f"{label}{name.lower()}"] = "not in this torch"
                    continue
                with warnings.catch_warnings(record=True) as said:
                    warnings.simplefilter("always")
                    try:
                        with sdpa_kernel(backend):
                            row[f"{label}{name.lower()}_2048_ms"] = time_ms(
                                lambda: call(FULL), device, reps)
                    except RuntimeError as e:
                        row[f"{label}{name.lower()}"] = refused(e, said)
        timings.append(row)
        ctx.record(by_batch=dict(zip(map(str, ctx.mode.concurrency), timings)))
    ctx.record(masked_tail_relative_error=tail_errors,
               grouped_query_relative_error=grouped_errors)
    figures = [value for row in timings for value in row.values() if isinstance(value, float)]
    ctx.check("every call that ran has a positive, finite time",
              all(math.isfinite(f) and f > 0 for f in figures), len(figures))
    # 512 keys hold every unmasked one: the rest can only add exact zeros, so what differs is
    # the kernels' rounding (bf16 on a GPU), never the result.
    tolerance = 1e-2 if dtype != torch.float32 else 1e-5
    ctx.check("over 512 positions the call gives the 2048-position result",
              max(tail_errors) < tolerance, max(tail_errors))
    ctx.check("folded query heads give the grouped-query result",
              max(grouped_errors) < tolerance, max(grouped_errors))
