"""A job's prompts, one per utterance, each turn tokenised once per job.

A job may speak several utterances (long text split into pieces, or dialogue turns). Each is
generated with the fixed context (a preset voice, the caller's turns) plus the job's own
earlier utterances, the oldest of those dropped first when the position window runs short.
The loop thread asks for the next piece when one ends, so building it must stay cheap: the
text of every turn is tokenised when the job starts or when its utterance is added, never
again.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .prompt import Segment, build_prompt
from .scheduler import Piece, Prefix
from .text_tokenizer import TextTokenizer

FRAME_MS = 80


class PromptTooLongError(ValueError):
    """The prompt plus the requested audio does not fit the backbone's position window."""


@dataclass(frozen=True)
class Utterance:
    speaker: int
    text: str
    max_audio_length_ms: int = 10_000


def _positions(ids: list[int], codes: Tensor | None) -> int:
    """Prompt positions of a turn: its tokens, then its frames and the end-of-audio frame."""
    return len(ids) + (0 if codes is None else codes.shape[1] + 1)


class Conversation:
    def __init__(self, tokenizer: TextTokenizer, context: tuple[Segment, ...],
                 max_positions: int, prefix: Prefix | None = None,
                 history: tuple[Segment, ...] = ()):
        self.tokenizer = tokenizer
        self.max_positions = max_positions
        self.prefix = prefix  # the context's first turn, already prefilled (a preset voice)
        self.fixed = [(tokenizer.encode_turn(s.speaker, s.text), s.codes) for s in context]
        # Earlier turns that may be dropped, oldest first: given ones, then the job's own.
        self.history = [(tokenizer.encode_turn(s.speaker, s.text), s.codes) for s in history]
        self._ids: dict[Utterance, list[int]] = {}

    def ids(self, utterance: Utterance) -> list[int]:
        if utterance not in self._ids:
            self._ids[utterance] = self.tokenizer.encode_turn(utterance.speaker, utterance.text)
        return self._ids[utterance]

    def check(self, utterance: Utterance) -> None:
        """Raise PromptTooLongError now if `utterance` can't fit even without history."""
        self._history_that_fits(utterance, [])

    def piece(self, utterance: Utterance) -> Piece:
        """The prompt for `utterance`: fixed context, then as much history as fits."""
        recent = self._history_that_fits(utterance, self.history)
        tokens, mask = build_prompt(self.fixed + recent, self.ids(utterance))
        return Piece(tokens, mask, utterance.max_audio_length_ms // FRAME_MS, self.prefix)

    def _history_that_fits(self, utterance: Utterance, history: list[tuple[list[int], Tensor]]
                           ) -> list[tuple[list[int], Tensor]]:
        max_frames = utterance.max_audio_length_ms // FRAME_MS
        limit = self.max_positions - max_frames
        recent = list(history)
        used = sum(_positions(ids, codes) for ids, codes in self.fixed + recent)
        used += len(self.ids(utterance))
        while used >= limit and recent:
            used -= _positions(*recent.pop(0))
        if used >= limit:
            raise PromptTooLongError(
                f"the prompt (text plus context) takes {used} positions; with "
                f"max_audio_length_ms={utterance.max_audio_length_ms} ({max_frames} "
                f"frames) it must be under {limit} of the model's {self.max_positions}: "
                "shorten the context or the text, or ask for less audio")
        return recent

    def add(self, utterance: Utterance, codes: Tensor) -> None:
        """An utterance has been spoken: it becomes history for the ones after it."""
        self.history.append((self.ids(utterance), codes))
