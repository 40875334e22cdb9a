"""Part `attention`: what one backbone attention call costs per decode step, and which SDPA
kernel serves it. Two of issue 11's speed leads, measured before anything is changed for them.

The engine (csm/llama.py) attends from each row's one new position over the whole cache (2048
positions) with a boolean mask and grouped-query heads (`enable_gqa`). Timed here at the mode's
main shapes and speed dtype, for each batch size of the speed part's sweep:

- the engine's call over 2048 positions, with the kernel PyTorch picks: its key span once a
  row's positions pass 1536, and every step's before key spans (csm/frame_step.py);
- the same over 512 positions, the engine's first key span: prompts and audio under 512
  positions (the masked tail adds nothing: checked);
- the 2048-position call with the query heads that share a key/value head folded into one
  head's query rows (the same numbers, checked): a call without grouped-query heads, which
  kernels that refuse `enable_gqa` take;
- the 2048-position call with each SDPA backend forced in turn; a backend that refuses the
  call (a boolean mask, grouped-query heads, the device) is reported with its reason.

The frame step makes one such call per backbone layer (16 at csm-1b) per frame.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    reps = 50 if device.type == "cuda" else 10
    ctx.record(shapes=ctx.mode.main_shapes, dtype=ctx.mode.speed_dtype, heads=cfg.num_heads,
               kv_heads=cfg.num_kv_heads, head_size=cfg.head_size, position=POSITION,
               calls_per_frame=cfg.num_layers)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tail_errors, fold_errors, timings = [], [], []
    for batch in ctx.mode.concurrency:
        ctx.step(f"batch {batch}")
        q = torch.randn(batch, cfg.num_heads, 1, cfg.head_size, generator=gen)
        k, v = (torch.randn(batch, cfg.num_kv_heads, FULL, cfg.head_size, generator=gen)
                for _ in range(2))
        q, k, v = (t.to(device, dtype) for t in (q, k, v))
        mask = (torch.arange(FULL, device=device) <= POSITION).expand(batch, 1, 1, FULL)

        def attend(keys: int) -> Tensor:
            return F.scaled_dot_product_attention(
                q, k[:, :, :keys], v[:, :, :keys], attn_mask=mask[..., :keys],
                enable_gqa=cfg.num_heads != cfg.num_kv_heads)

        def attend_folded(keys: int) -> Tensor:
            # Query head h uses key/value head h // group (enable_gqa's order), so the group's
            # heads become that head's query rows; one position, so one mask row for all.
            group = cfg.num_heads // cfg.num_kv_heads
            folded = q.view(batch, cfg.num_kv_heads, group, cfg.head_size)
            out = F.scaled_dot_product_attention(folded, k[:, :, :keys], v[:, :, :keys],
                                                 attn_mask=mask[..., :keys])
            return out.view(batch, cfg.num_heads, 1, cfg.head_size)

        full, bucket = attend(FULL).float(), attend(BUCKET).float()
        tail_errors.append(float((full - bucket).abs().max() / full.abs().max()))
        fold_errors.append(float((full - attend_folded(FULL).float()).abs().max()
                                 / full.abs().max()))
        row: dict[str, float | str] = {
            "engine_call_2048_ms": time_ms(lambda: attend(FULL), device, reps),
            "engine_call_512_ms": time_ms(lambda: attend(BUCKET), device, reps),
            "folded_groups_2048_ms": time_ms(lambda: attend_folded(FULL), device, reps)}
        for name in BACKENDS:
            backend = getattr(SDPBackend, name, None)
            if backend is None:
                row[name.lower()] = "not in this torch"
                continue
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel(backend):
                        row[f"{name.lower()}_2048_ms"] = time_ms(lambda: attend(FULL), device,
                                                                 reps)
                except RuntimeError as e:
                    row[name.lower()] = refused(e, said)
        timings.append(row)
        ctx.record(by_batch=dict(zip(map(str, ctx.mode.concurrency), timings)))
    ctx.record(masked_tail_relative_error=tail_errors, folded_groups_relative_error=fold_errors)
    figures = [value for row in timings for value in row.values() if isinstance(value, float)]
    ctx.check("every call that ran has a positive, finite time",
              all(math.isfinite(f) and f > 0 for f in figures), len(figures))
    # 512 keys hold every unmasked one: the rest can only add exact zeros, so what differs is
    # the kernels' rounding (bf16 on a GPU), never the result.
    tolerance = 1e-2 if dtype != torch.float32 else 1e-5
    ctx.check("over 512 positions the call gives the 2048-position result",
              max(tail_errors) < tolerance, max(tail_errors))
    ctx.check("folded query groups give the grouped-query result",
              max(fold_errors) < tolerance, max(fold_errors))
