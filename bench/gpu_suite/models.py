"""Part `models`: the model folders the other parts load, built once per run.

RANDOM weights in the real on-disk formats (`csm.testing.make_tiny`; on a GPU also at the csm-1b
shapes, in bf16 with the full-size Mimi and SilentCipher): what they generate is noise, never
speech. A folder already in the work folder (from `--work`) is reused.
"""

from __future__ import annotations

import shutil
import time

import torch

from csm.testing.tiny import make_tiny

from ..run import SHAPES
from .context import Context


def run(ctx: Context) -> None:
    for shapes in ctx.mode.shapes:
        folder = ctx.work / "models" / shapes
        if folder.is_dir():
            ctx.record(**{shapes: {"reused": str(folder)}})
            continue
        ctx.step(f"building the {shapes} folder")
        partial = folder.with_name(f"{shapes}.partial")  # never mistaken for a finished one
        shutil.rmtree(partial, ignore_errors=True)
        start = time.perf_counter()
        full_size = shapes == "csm-1b"
        # csm-1b as the image bakes it (bf16), so that start-up times are the image's;
        # the fp32 engines of graphs_eager compute in fp32 on those bf16 values.
        make_tiny(partial, cfg=SHAPES[shapes], full_size_codecs=full_size,
                  dtype=torch.bfloat16 if full_size else torch.float32)
        partial.rename(folder)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        ctx.record(**{shapes: {"build_s": time.perf_counter() - start,
                               "size_mb": size / 2**20}})
