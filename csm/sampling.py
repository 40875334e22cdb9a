"""Top-k sampling on the device, with counter-based noise instead of a generator's state.

The reference samples with torch's global RNG, which ties a job's randomness to everything
else that ran before it. Here the noise for (seed, draw number, token) is a hash of those three
integers: a job draws the same numbers whether it runs alone or shares a batch, and the step
needs no host synchronisation or generator object, so it can be graph-captured. The
distribution is the reference's: softmax over the top-k of logits / temperature (Gumbel-max).
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_TOPK = 256
_M32 = 0xFFFFFFFF


def noise_key(seed: int, piece: int) -> int:
    """The noise stream of one piece of a job (long text and dialogues have several).

    The seed's 32 bits with the piece index above them: `uniform_noise` hashes both halves,
    so every piece draws fresh noise (its frame counter restarts at 0), the first piece draws
    what a one-piece job draws, and a seed still reproduces the whole job.
    """
    return (seed & _M32) | (piece << 32)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash on int64 tensors (multipliers < 2**31, so no int64 overflow)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def uniform_noise(seed: Tensor, counter: Tensor, n: int) -> Tensor:
    """[*counter.shape, n] uniforms in (0, 1), a pure function of (seed, counter, column).

    seed: [B]; counter: [B] or [B, draws] (one draw per counter value).
    """
    seed = seed.view(-1, *([1] * (counter.dim() - 1)))
    row = _mix32(_mix32(_mix32(seed & _M32) ^ (seed >> 32)) ^ (counter & _M32))
    cols = torch.arange(n, device=seed.device, dtype=torch.int64) * 0x9E3779B1 & _M32
    h = _mix32(row.unsqueeze(-1) ^ cols)
    # 23 bits keep (h + 0.5) / 2**23 strictly inside (0, 1) in float32.
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))


def gumbel_noise(seed: Tensor, counter: Tensor, n: int) -> Tensor:
    """Gumbel(0, 1) noise of the same shape and keys as `uniform_noise`; drawing a frame's
    32 draws at once costs one set of kernels instead of 32."""
    return -torch.log(-torch.log(uniform_noise(seed, counter, n)))


def kth_index(topk: Tensor, vocab: int) -> Tensor:
    """[B, 1]: where each row's k-th largest logit sits among its top min(MAX_TOPK, vocab),
    for sample_topk. The same for every draw of a frame, so computed once per frame."""
    return (topk.clamp(1, min(MAX_TOPK, vocab)) - 1)[:, None]


def sample_topk(logits: Tensor, temperature: Tensor, kth: Tensor, gumbel: Tensor) -> Tensor:
    """Per-row temperature and top-k (`kth` from kth_index), with that draw's Gumbel noise
    [B, V]; returns [B] ids.

    argmax(logits / T + Gumbel) over the top k is a draw from softmax(top-k logits / T).
    Tokens tied with the k-th largest logit are kept, as the reference keeps them.
    """
    scaled = logits.float() / temperature[:, None]
    k_max = min(MAX_TOPK, scaled.shape[-1])
    threshold = torch.topk(scaled, k_max, dim=-1).values.gather(1, kth)
    scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    return torch.argmax(scaled + gumbel, dim=-1)
