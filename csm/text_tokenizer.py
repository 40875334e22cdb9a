"""CSM's text side: the Llama-3 `tokenizer.json` from the model folder, through `tokenizers`."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

BEGIN_OF_TEXT = 128000
END_OF_TEXT = 128001


class TextTokenizer:
    def __init__(self, path: Path):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"text tokenizer not found: {path}")
        self._tok = Tokenizer.from_file(str(path))
        for token, expected in (("<|begin_of_text|>", BEGIN_OF_TEXT),
                                ("<|end_of_text|>", END_OF_TEXT)):
            if self._tok.token_to_id(token) != expected:
                raise ValueError(f"{path}: {token} must have id {expected} (a Llama-3 tokenizer)")

    def encode_turn(self, speaker: int, text: str) -> list[int]:
        """`[speaker]text` between begin- and end-of-text, as the reference tokenises a turn.

        The special tokens are added here rather than by the file's post-processor, so a
        tokenizer.json without CSM's template still gives CSM's ids.
        """
        ids = self._tok.encode(f"[{speaker}]{text}", add_special_tokens=False).ids
        return [BEGIN_OF_TEXT, *ids, END_OF_TEXT]
