"""A part's side of the suite: its mode, its model folders, and how it reports.

A part is a function `run(ctx: Context) -> None` (see parts.py). It records measurements
(`ctx.record`) and pass/fail checks (`ctx.check`) as it goes, and names what it is doing
(`ctx.step`). Every call rewrites the part's result file at once, so a part stopped at its time
limit still leaves what it measured and the step it was stuck in.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .modes import Mode


class NotRun(Exception):
    """The part cannot run here; the message says why (no CUDA device, a missing folder...)."""


@dataclass
class Context:
    mode: Mode
    work: Path  # shared between parts: the model folders
    result_path: Path
    spawned_at: float  # time.time() when the runner started this process
    limit_s: float  # the runner stops this process this long after spawned_at
    result: dict[str, Any] = field(default_factory=lambda: {
        "step": None, "steps": [], "measurements": {}, "checks": []})

    @property
    def device(self) -> torch.device:
        return torch.device(self.mode.device)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype speed is measured in (bf16 on a GPU)."""
        return getattr(torch, self.mode.speed_dtype)

    @property
    def remaining_s(self) -> float:
        return self.spawned_at + self.limit_s - time.time()

    def model_dir(self, shapes: str) -> Path:
        """A folder the `models` part built; NotRun if it did not finish."""
        folder = self.work / "models" / shapes
        if not folder.is_dir():
            raise NotRun(f"no {shapes} model folder: the `models` part did not finish")
        return folder

    def step(self, what: str) -> None:
        """Name what the part does next; each step's start (seconds since the process was
        started) goes in the result, to show where a part's time went."""
        self.result["step"] = what
        self.result["steps"].append([what, round(time.time() - self.spawned_at, 2)])
        self._flush()

    def record(self, **values: Any) -> None:
        self.result["measurements"].update(values)
        self._flush()

    def check(self, name: str, ok: bool, detail: Any = None) -> bool:
        self.result["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        self._flush()
        return bool(ok)

    def finish(self, status: str, reason: str | None = None, log: str | None = None) -> None:
        self.result.update(status=status, reason=reason, peak_memory_mb=peak_memory_mb(self.device))
        if log:
            self.result["traceback"] = log
        self._flush()

    def _flush(self) -> None:
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        os.replace(tmp, self.result_path)


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak: allocated GPU memory on CUDA, resident memory on the CPU."""
    if device.type == "cuda" and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the device, as the report's header shows them."""
    versions = {}
    for package in ("moshi", "transformers", "silentcipher"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M %Z"), **versions}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version())
    return env
