"""Sample-rate conversion with soxr (a proper resampler; no hand-written filters)."""

from __future__ import annotations

import numpy as np
import soxr
import torch
from torch import Tensor


def resample(audio: Tensor, from_rate: int, to_rate: int) -> Tensor:
    """1-D float audio, any device -> 1-D float32 on the same device."""
    if from_rate == to_rate:
        return audio.float()
    out = soxr.resample(audio.detach().float().cpu().numpy(), from_rate, to_rate, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(audio.device)
