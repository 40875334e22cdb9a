"""Runs each part in its own process under its time limit and collects what it reported.

A part that overruns is stopped (its whole process group: SIGTERM, then SIGKILL) and reported
as "timed out" with whatever it had recorded and the step it was in, and the suite goes on.
The parts that build what the others read run first, one at a time; the others then run
`mode.side_by_side` at a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .modes import Mode
from .parts import STOP_GRACE_S, Part

REPO = Path(__file__).resolve().parents[2]
LOG_TAIL_CHARS = 2000


def run_parts(parts: list[Part], mode: Mode, work: Path, out: Path,
              limits: dict[str, float]) -> list[dict[str, Any]]:
    """Every part's result, in the order of `parts`; `limits`: part name -> seconds."""
    results: dict[str, dict[str, Any]] = {}

    def run_one(part: Part) -> None:
        limit = limits[part.name]
        print(f"[gpu_suite] {part.name}: running (limit {limit:g} s)", flush=True)
        result = results[part.name] = run_part(part, mode, work, out, limit)
        print(f"[gpu_suite] {part.name}: {result['status']} in {result['elapsed_s']:.1f} s"
              + (f": {result['reason']}" if result.get("reason") else ""), flush=True)

    for part in parts:
        if part.builds:
            run_one(part)
    rest = [part for part in parts if not part.builds]
    if mode.side_by_side > 1:  # longest first (by limit), so that the lanes end close together
        rest.sort(key=lambda part: -limits[part.name])
    with ThreadPoolExecutor(max_workers=mode.side_by_side) as pool:
        list(pool.map(run_one, rest))
    return [results[part.name] for part in parts]


def run_part(part: Part, mode: Mode, work: Path, out: Path, limit_s: float) -> dict[str, Any]:
    result_path = out / "parts" / f"{part.name}.json"
    log_path = out / "logs" / f"{part.name}.log"
    for folder in (result_path.parent, log_path.parent):
        folder.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "bench.gpu_suite.child", part.name, "--mode", mode.name,
               "--work", str(work), "--result", str(result_path),
               "--spawned-at", repr(time.time()), "--limit", repr(limit_s)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start, stopped = time.perf_counter(), True
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode: int | None = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            returncode = None
            stopped = stop(process)
    elapsed = time.perf_counter() - start
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    if returncode is None:
        result["status"] = "timed out"
        result["reason"] = (f"still running at its {limit_s:g} s limit (last step: "
                            f"{result.get('step') or 'starting up'}); "
                            + ("stopped" if stopped else "could not be stopped"))
    elif "status" not in result:
        result["status"] = "error"
        result["reason"] = f"the process exited with code {returncode} before reporting"
    if result["status"] in ("error", "timed out"):
        result["log_tail"] = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    result.update(name=part.name, about=part.about, elapsed_s=round(elapsed, 2),
                  limit_s=limit_s, log=str(log_path.relative_to(out)))
    return result


def stop(process: subprocess.Popen) -> bool:
    """End the part's process group; False if it outlives SIGKILL (stuck in the driver)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=STOP_GRACE_S / 2)
            return True
        except subprocess.TimeoutExpired:
            continue
    return False


def not_run(part: Part, limit_s: float, reason: str) -> dict[str, Any]:
    return {"name": part.name, "about": part.about, "status": "not run", "reason": reason,
            "elapsed_s": 0.0, "limit_s": limit_s, "measurements": {}, "checks": []}
