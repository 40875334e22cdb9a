"""Sample-rate conversion with soxr (a proper resampler; no hand-written filters)."""

from __future__ import annotations

import numpy as np
import soxr
import torch
from torch import Tensor


def resample_array(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """1-D float samples -> 1-D float32 at `to_rate`."""
    if from_rate == to_rate:
        return samples.astype(np.float32, copy=False)
    out = soxr.resample(samples.astype(np.float32, copy=False), from_rate, to_rate, quality="HQ")
    return np.ascontiguousarray(out, dtype=np.float32)


def resample(audio: Tensor, from_rate: int, to_rate: int) -> Tensor:
    """1-D float audio, any device -> 1-D float32 on the same device."""
    if from_rate == to_rate:
        return audio.float()
    out = resample_array(audio.detach().float().cpu().numpy(), from_rate, to_rate)
    return torch.from_numpy(out).to(audio.device)
