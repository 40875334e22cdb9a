"""One part in its own process: `python -m bench.gpu_suite.child NAME --mode ... --work ...
--result ...` (the runner starts it; its result file is the only way results come back)."""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from pathlib import Path

import torch

from .context import Context, NotRun, environment
from .modes import MODES
from .parts import PARTS


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_suite.child")
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--spawned-at", type=float, default=time.time())
    parser.add_argument("--limit", type=float, default=3600.0,
                        help="seconds after --spawned-at at which the runner stops this process")
    args = parser.parse_args()
    mode = MODES[args.mode]
    if mode.threads:
        torch.set_num_threads(mode.threads)
    ctx = Context(mode, args.work, args.result, args.spawned_at, args.limit)
    try:
        ctx.result["environment"] = environment(ctx.device)
        module, function = PARTS[args.part].function.split(":")
        getattr(importlib.import_module(module), function)(ctx)
    except NotRun as e:
        ctx.finish("not run", str(e))
    except ModuleNotFoundError as e:
        ctx.finish("not run", f"missing module {e.name!r} (not installed here)")
    except Exception as e:  # noqa: BLE001 - reported as the part's error; the suite goes on
        ctx.finish("error", f"{type(e).__name__}: {e}", traceback.format_exc())
    else:
        failed = [c["name"] for c in ctx.result["checks"] if not c["ok"]]
        ctx.finish("failed" if failed else "passed",
                   f"failed checks: {', '.join(failed)}" if failed else None)


if __name__ == "__main__":
    main()
