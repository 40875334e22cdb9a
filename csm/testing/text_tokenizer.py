"""A small byte-level BPE `tokenizer.json` with Llama-3's special tokens at Llama-3's ids.

Trained offline on a few sentences; its merges are nothing like Llama-3's, but the file has the
same structure (byte-level BPE, 128,000 regular ids, specials from 128000) so the engine's
tokenizer code runs unchanged. Unused regular ids are filled with unreachable placeholders.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..presets import PRESETS

REGULAR_VOCAB = 128_000
_NAMED_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                   "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
_CORPUS = [p.transcript for p in PRESETS.values()] + [
    "Hello there, how are you doing today? I'm fine, thanks for asking.",
    "The quick brown fox jumps over the lazy dog. 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "Dr. Smith said: \"It's 3.5 miles from here.\" Really? Yes!",
]


def llama3_special_tokens() -> list[str]:
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - len(_NAMED_SPECIALS) + 3)]
    return _NAMED_SPECIALS + reserved


def write_tiny_tokenizer(path: Path, vocab_size: int = 1000) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), REGULAR_VOCAB):
        vocab[f"<unused_{i}>"] = i
    spec["added_tokens"] = [
        {"id": REGULAR_VOCAB + i, "content": content, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for i, content in enumerate(llama3_special_tokens())]
    Path(path).write_text(json.dumps(spec))
