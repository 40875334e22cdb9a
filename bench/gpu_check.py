"""What only a GPU shows: CUDA-graph replay against the eager step, in fp32 and bf16.

    python -m bench.gpu_check [--shapes csm-1b] [--frames 64]

Same random weights, same request, same seed; the graphed engine and the eager engine should
draw identical codes in fp32, and in bf16 agree until rounding first flips a draw (reported as
the first differing frame). Run it on a lent GPU and put the result in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from csm.engine import Engine, GenerationRequest
from csm.testing.tiny import make_tiny

from .run import SHAPES, TEXT


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    same = (a == b).all(dim=0)
    return None if bool(same.all()) else int((~same).nonzero()[0])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check")
    parser.add_argument("--shapes", choices=SHAPES, default="csm-1b")
    parser.add_argument("--frames", type=int, default=64)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA device"
    request = GenerationRequest(text=TEXT, max_audio_length_ms=args.frames * 80, seed=3,
                                stop_at_end_frame=False)
    report = {"gpu": torch.cuda.get_device_name(), "shapes": args.shapes,
              "frames": args.frames, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny(Path(tmp), cfg=SHAPES[args.shapes],
                           full_size_mimi=args.shapes == "csm-1b")
        for dtype in (torch.float32, torch.bfloat16):
            codes = {}
            for graphs in (False, True):
                engine = Engine.load(folder, device="cuda", dtype=dtype, use_graphs=graphs)
                engine.generate(request)  # warm-up
                start = time.perf_counter()
                result = engine.generate(request)
                codes[graphs] = result.codes
                report[f"{dtype}_{'graph' if graphs else 'eager'}_ms_per_frame"] = (
                    1000 * (time.perf_counter() - start) / args.frames)
                del engine
                torch.cuda.empty_cache()
            report[f"{dtype}_first_differing_frame"] = first_difference(codes[False], codes[True])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
