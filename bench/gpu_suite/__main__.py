"""`python -m bench.gpu_suite`: everything only a GPU shows, in one command (`make gpu-check`).

    python -m bench.gpu_suite                      # on a CUDA machine: csm-1b shapes, < 8 min
    python -m bench.gpu_suite --cpu                # CPU mode (tiny shapes, fp32, graphs off)
    python -m bench.gpu_suite --parts speed,transformers --work /tmp/suite --keep-work

Writes report.json and report.md (device, versions, date, command, one row per part, the
issue's targets) into --out. Each part runs in its own process under its own time limit
(parts.py) and reports "passed", "failed" (a check did not hold), "error", "timed out" or
"not run" with the reason. Exit status 0 only if every part passed. Model weights are
random (noise, never speech): the suite checks machinery and measures speed.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import report
from .modes import MODES
from .parts import PARTS, default_parts
from .runner import not_run, run_parts


def parse_limits(values: list[str]) -> dict[str, float]:
    limits = {}
    for value in values:
        name, _, seconds = value.partition("=")
        if name not in PARTS or not seconds:
            raise argparse.ArgumentTypeError(f"--limit {value!r}: expected PART=SECONDS with "
                                             f"PART one of {', '.join(PARTS)}")
        limits[name] = float(seconds)
    return limits


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU mode: tiny shapes, fp32, CUDA graphs off (what CI runs)")
    parser.add_argument("--out", type=Path, default=Path("gpu-suite-report"),
                        help="where report.json, report.md and the parts' logs go")
    parser.add_argument("--parts", help="comma-separated parts to run, in the suite's order "
                        f"(default: {','.join(p.name for p in default_parts())})")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                        help="override a part's time limit (repeatable)")
    parser.add_argument("--work", type=Path, help="folder for the model folders (default: a "
                        "temporary one); a folder built before is reused")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the temporary work folder (its path is printed)")
    args = parser.parse_args(argv)
    try:
        overrides = parse_limits(args.limit)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if args.parts:
        names = args.parts.split(",")
        unknown = [n for n in names if n not in PARTS]
        if unknown:
            parser.error(f"--parts: unknown {', '.join(unknown)}; parts: {', '.join(PARTS)}")
        parts = [p for p in PARTS.values() if p.name in names]
    else:
        parts = default_parts()
    mode = MODES["cpu" if args.cpu else "gpu"]
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    started, clock = time.strftime("%Y-%m-%d %H:%M %Z"), time.perf_counter()
    no_device = None
    if mode.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            no_device = ("no CUDA device here (torch.cuda.is_available() is False); --cpu runs "
                         "the CPU mode")
    limits = {part.name: overrides.get(part.name, part.limit_s[mode.name]) for part in parts}
    try:
        results = ([not_run(part, limits[part.name], no_device) for part in parts] if no_device
                   else run_parts(parts, mode, work, args.out, limits))
    finally:
        if args.work is None and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        elif args.work is None:
            print(f"[gpu_suite] work folder kept: {work}", flush=True)
    command = shlex.join(["python", "-m", "bench.gpu_suite", *argv])
    full = report.build(mode, command, started, time.perf_counter() - clock, results)
    report.write(full, args.out)
    print(f"[gpu_suite] {sum(r['status'] == 'passed' for r in results)} of {len(results)} "
          f"parts passed; report: {args.out / 'report.md'}", flush=True)
    return 0 if full["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
