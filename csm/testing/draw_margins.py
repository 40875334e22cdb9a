"""How near each of a job's draws came to going another way, to tell rounding from a bug.

On a GPU a job's logits round differently in a batch than alone: cuBLAS picks its kernels by
shape, and a prompt is prefilled in chunks that depend on what else is prefilling. Its codes
may then part from the codes it draws alone, at a draw that was a near-tie. A state bug (a row
reading another row's cache, a stale position) parts them at draws with a clear winner.

A draw (`csm.sampling.sample_topk`) takes the argmax of scores = logits / T + Gumbel noise
over the candidates, the tokens at or above the k-th largest logit / T. Nudging every scaled
logit by at most d changes it only if one of these gaps is under 2d: the best score over
the second best; for a token below the k-th, the larger of its distance to the k-th logit
(to enter) and its score's distance to the best (to win); and the winner's logit over the
largest logit below the k-th (for k tokens to pass it, so that it leaves). The smallest is
the draw's *margin*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..engine import Engine, GenerationRequest
from ..sampling import gumbel_noise, kth_index

# fp32 rounding moves the test models' scaled logits (std ~1) by at most ~4e-6 (measured
# against fp64, tiny and mid shapes, 40 frames): a margin under 1e-4 is a tie within
# rounding; over it, a choice that rounding could not change.
ROUNDING_MARGIN = 1e-4


@dataclass
class Parting:
    """Where a job's codes first left the codes it draws alone, and how near a tie that was."""

    piece: int
    frame: int
    codebook: int
    margin: float  # of that draw when run alone; inf where the codes ran out instead

    @property
    def is_rounding(self) -> bool:
        return self.margin < ROUNDING_MARGIN

    def __str__(self) -> str:
        return (f"piece {self.piece}, frame {self.frame}, codebook {self.codebook} "
                f"(margin alone {self.margin:.3g})")


@dataclass
class MarginedRun:
    """A job run alone: its codes per piece [32, frames], each draw's margin
    [(piece, frame)] -> [32]."""

    pieces: list[Tensor]
    margins: dict[tuple[int, int], Tensor]


def draw_margin(scaled: Tensor, gumbel: Tensor, topk: int) -> tuple[float, int]:
    """(the margin, the token drawn) of one draw from scaled logits [V] and its noise [V]."""
    k = int(kth_index(torch.tensor([topk]), len(scaled))) + 1  # sample_topk's k
    kth = scaled.topk(k).values[-1]
    scores = scaled + gumbel
    inside = scaled >= kth  # tokens tied with the k-th are candidates, as in sample_topk
    best = scores.masked_fill(~inside, float("-inf")).topk(min(2, len(scaled))).values
    winner = int(scores.masked_fill(~inside, float("-inf")).argmax())
    margins = [best[0] - best[1]] if len(best) > 1 else []
    if not inside.all():
        below = ~inside
        margins.append(torch.maximum(kth - scaled[below], best[0] - scores[below]).min())
        margins.append(scaled[winner] - scaled[below].max())
    return (float(min(margins)) if margins else float("inf")), winner


class _FrameDraws(TorchFunctionMode):
    """Row 0's margin of each draw of one frame step, seen through sample_topk's top-k (its
    scaled logits) and argmax (its result); the noise is recomputed from the draw's key."""

    def __init__(self, seed: Tensor, frame: int, codebooks: int, topk: int) -> None:
        super().__init__()
        self.seed, self.frame, self.codebooks, self.topk = seed, frame, codebooks, topk
        self.scaled: Tensor | None = None
        self.margins: list[float] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.topk:
            self.scaled = args[0][0]
        elif func is torch.argmax:
            if self.scaled is None:
                raise RuntimeError("an argmax without a top-k before it: sample_topk changed, "
                                   "and so must this probe")
            draw = self.frame * self.codebooks + len(self.margins)
            gumbel = gumbel_noise(self.seed, torch.tensor([draw], device=self.seed.device),
                                  len(self.scaled))[0]
            margin, winner = draw_margin(self.scaled, gumbel, self.topk)
            if winner != int(out[0]):
                raise RuntimeError(f"the probe's draw {winner} is not the step's {int(out[0])}")
            self.margins.append(margin)
            self.scaled = None
        return out


def record_margins(engine: Engine, request: GenerationRequest) -> MarginedRun:
    """Run `request` alone on `engine` (idle: the job gets row 0) with the frame step eager,
    recording every draw's margin. Slow: every operation passes through Python."""
    stepper = engine.scheduler.stepper
    codebooks = engine.model.cfg.num_codebooks
    margins: dict[tuple[int, int], Tensor] = {}

    def step(n: int, keys: int) -> Tensor:
        if n != 1:
            raise RuntimeError(f"record_margins needs the engine to itself ({n} rows stepped)")
        seed = stepper.sampling.seed[:1].clone()
        piece = int(seed) >> 32  # noise_key: the piece above the seed's 32 bits
        frame = int(stepper.sampling.frame_index[0])
        live = int(stepper.remaining[0]) > 0
        draws = _FrameDraws(seed, frame, codebooks, request.topk)
        with draws:
            codes = stepper._step(n, keys)
        if len(draws.margins) != codebooks:
            raise RuntimeError(f"{len(draws.margins)} draws in a frame step, not {codebooks}")
        if live:
            margins[piece, frame] = torch.tensor(draws.margins)
        return codes

    stepper.step = step
    try:
        blocks = list(engine.start(request).blocks())
    finally:
        del stepper.step
    return MarginedRun(pieces_of([(b.utterance, b.codes) for b in blocks], codebooks),
                       margins)


def joined(codes: list[Tensor], codebooks: int) -> Tensor:
    """Codes [32, frames] of blocks or pieces in order, as one [32, all frames]."""
    return torch.cat(codes, dim=1) if codes else torch.zeros(codebooks, 0, dtype=torch.long)


def pieces_of(blocks: list[tuple[int, Tensor]], codebooks: int) -> list[Tensor]:
    """(piece index, codes [32, frames]) blocks in order -> each piece's codes."""
    count = max((piece for piece, _ in blocks), default=-1) + 1
    return [joined([c for p, c in blocks if p == piece], codebooks) for piece in range(count)]


def parting(got: list[Tensor], alone: MarginedRun, prefix: bool) -> Parting | None:
    """The first draw where `got` (codes per piece) leaves the run alone, or None if it does
    not. `prefix`: `got` may stop early (a cancelled job); otherwise it must be as long."""
    for piece, expected in enumerate(alone.pieces):
        have = got[piece] if piece < len(got) else expected[:, :0]
        frames = min(have.shape[1], expected.shape[1])
        differ = (have[:, :frames] != expected[:, :frames]).t().nonzero()  # (frame, codebook)
        if len(differ):
            frame, codebook = (int(i) for i in differ[0])
            return Parting(piece, frame, codebook, float(alone.margins[piece, frame][codebook]))
        if have.shape[1] != expected.shape[1]:
            if prefix and have.shape[1] < expected.shape[1]:
                return None  # cancelled here; everything before matched
            return Parting(piece, frames, 0, float("inf"))
    if len(got) > len(alone.pieces):
        return Parting(len(alone.pieces), 0, 0, float("inf"))
    return None
