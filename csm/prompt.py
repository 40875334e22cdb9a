"""Turning conversation turns into CSM's 33-column prompt positions.

Columns 0..31 hold audio codebooks, column 32 a text token; the mask says which are present.
A context turn is its text segment followed by its audio segment; the turn to generate is
its text segment alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .codec import NUM_CODEBOOKS

COLUMNS = NUM_CODEBOOKS + 1


@dataclass(frozen=True)
class Segment:
    """One context turn: who spoke, what they said, and its Mimi codes [32, frames]."""

    speaker: int
    text: str
    codes: Tensor


def text_positions(token_ids: list[int]) -> tuple[Tensor, Tensor]:
    tokens = torch.zeros(len(token_ids), COLUMNS, dtype=torch.long)
    mask = torch.zeros(len(token_ids), COLUMNS, dtype=torch.bool)
    tokens[:, -1] = torch.tensor(token_ids, dtype=torch.long)
    mask[:, -1] = True
    return tokens, mask


def audio_positions(codes: Tensor) -> tuple[Tensor, Tensor]:
    """One position per frame, then the all-zero frame that marks the end of the audio."""
    frames = codes.shape[1] + 1
    tokens = torch.zeros(frames, COLUMNS, dtype=torch.long)
    mask = torch.zeros(frames, COLUMNS, dtype=torch.bool)
    tokens[:-1, :-1] = codes.t().cpu()
    mask[:, :-1] = True
    return tokens, mask


def build_prompt(context: list[tuple[list[int], Tensor]],
                 text_ids: list[int] | None) -> tuple[Tensor, Tensor]:
    """context: (text token ids, codes) per turn; text_ids: the turn to speak (None: the
    context alone, as a reusable prefix).

    Returns tokens, mask: [positions, 33].
    """
    parts = []
    for ids, codes in context:
        parts += [text_positions(ids), audio_positions(codes)]
    if text_ids is not None:
        parts.append(text_positions(text_ids))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
