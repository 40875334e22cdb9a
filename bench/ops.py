"""How many operations one frame step launches: the CPU's stand-in for a GPU's kernel count.

    python -m bench.ops                          # tiny shapes, bf16, batch 2
    python -m bench.ops --shapes mid --dtype float32 --batch 8 --top 15

Replayed from a CUDA graph, a frame step costs about its bytes plus a latency per kernel; at
batch 1 the depth decoder's many small kernels may cost more than its bytes. Counting on the
CPU shows what a change does to that count before a GPU measures it. An operation counts when
it writes new data: views and other outputs that alias an input are left out. bf16 counts the
dtype conversions a GPU runs (on fp32 they are no-ops). The weights are random: only the
count means anything.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from csm.checkpoint import load_model
from csm.model import CSM, SamplingState
from csm.testing.tiny import make_tiny

from .run import SHAPES


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations run under it that write new data, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        aliases = outputs and all(t.untyped_storage().data_ptr() in inputs for t in outputs)
        if func._schema.is_mutable or not aliases:
            self.ops[str(func.overloadpacket)] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())


@torch.inference_mode()
def count_frame_step(model: CSM, batch: int) -> tuple[OpCounter, OpCounter]:
    """(the whole frame step, its depth decoder and sampling) at `batch` rows, positions 300."""
    model.setup_caches(batch)
    rows, dtype = slice(0, batch), model.codebook0_head.weight.dtype
    h = torch.randn(batch, model.cfg.backbone.dim, dtype=dtype)
    position = torch.full((batch,), 300)
    sampling = SamplingState(torch.full((batch,), 0.9), torch.full((batch,), 50),
                             torch.arange(batch), torch.zeros(batch, dtype=torch.long))
    model.frame_step(h, position, sampling, rows, 512)  # lazy inits stay out of the count
    counts = OpCounter(), OpCounter()
    with counts[0]:
        model.frame_step(h, position, sampling, rows, 512)
    with counts[1]:
        model.decode_codes(h, sampling, rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ops")
    parser.add_argument("--shapes", choices=SHAPES, default="tiny")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--top", type=int, default=10, help="the most frequent operations")
    parser.add_argument("--int8", action="store_true",
                        help="the depth decoder in int8, as CSM_DECODER_INT8=1 runs it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny(Path(tmp), cfg=SHAPES[args.shapes])
        model = load_model(folder, "cpu", getattr(torch, args.dtype))
    model.prepare_for_serving(decoder_int8=args.int8)  # as the engine runs it
    step, decoder = count_frame_step(model, args.batch)
    print(f"{args.shapes} shapes, {args.dtype}, batch {args.batch}: {step.total} operations "
          f"per frame step, {decoder.total} of them the depth decoder and sampling")
    for name, n in step.ops.most_common(args.top):
        print(f"{n:6d}  {name}")


if __name__ == "__main__":
    main()
