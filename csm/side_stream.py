"""CUDA streams for work that runs on other threads beside the frame loop.

Every thread's CUDA work goes to the one default stream unless it names another. The frame
loop queues a block of graph replays there and waits for them once a block, so work from
another thread on that stream (marking a stream's audio, encoding a caller's reference audio)
queues behind the replays, its copy to the host waits for them, and the loop's wait takes in
that work too. On a stream of its own it runs beside the loop, and its host copy waits for
its own work alone. `torch.cuda.stream(None)` is a no-op, so callers use the result alike on
a CPU.
"""

from __future__ import annotations

import torch


def side_stream(device: torch.device | str) -> torch.cuda.Stream | None:
    """A new CUDA stream on `device` (None off CUDA), once the work already queued there (the
    weights just loaded) is done, so the new stream may use it."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.Stream(device)
