"""Long text: split where a person would, every piece spoken, no seam at the joins."""

from __future__ import annotations

import torch

from csm.engine import Engine, GenerationRequest, Utterance
from csm.text_split import sentences, split_text

PARAGRAPH = (
    'Dr. Smith arrived at 9:30 a.m. and said: "The results are in. It\'s 3.5 times better '
    'than last year!" Nobody believed her. Mrs. Jones, who had worked at Acme Inc. for '
    "12.5 years, asked whether the U.S. numbers were included, e.g. the ones from Jan. 2024. "
    "\"Of course,\" she replied. (They were not.) The budget was $4.99 million, i.e. "
    "roughly 10% over plan... Still, everyone agreed it was progress? Yes! J. R. R. Tolkien "
    "would have called it an unexpected journey. "
)


def test_sentences_respect_numbers_abbreviations_and_quotes():
    got = sentences(PARAGRAPH)
    assert got == [
        'Dr. Smith arrived at 9:30 a.m. and said: "The results are in. It\'s 3.5 times better '
        'than last year!"',
        "Nobody believed her.",
        "Mrs. Jones, who had worked at Acme Inc. for 12.5 years, asked whether the U.S. "
        "numbers were included, e.g. the ones from Jan. 2024.",
        '"Of course," she replied.',
        "(They were not.)",
        "The budget was $4.99 million, i.e. roughly 10% over plan...",
        "Still, everyone agreed it was progress?",
        "Yes!",
        "J. R. R. Tolkien would have called it an unexpected journey.",
    ]


def test_3000_characters_split_into_whole_sentences():
    text = PARAGRAPH * 7  # about 3,000 characters
    assert 2900 < len(text) < 3300
    pieces = split_text(text, max_chars=220)
    assert all(len(p) <= 220 for p in pieces)
    assert " ".join(pieces) == " ".join(text.split())  # nothing lost, nothing reordered
    whole = set(sentences(PARAGRAPH))
    for piece in pieces:  # every piece is made of whole sentences
        rest = piece
        while rest:
            match = next((s for s in whole if rest.startswith(s)), None)
            assert match is not None, f"piece breaks a sentence: {rest[:60]!r}"
            rest = rest[len(match):].lstrip()


def test_an_overlong_sentence_is_cut_at_a_clause_then_a_space():
    sentence = ("one, two, three, " * 30).strip() + "."
    pieces = split_text(sentence, max_chars=100)
    assert all(len(p) <= 100 for p in pieces) and len(pieces) > 3
    assert all(p.endswith(",") for p in pieces[:-1])
    assert split_text("x" * 250, max_chars=100) == ["x" * 100, "x" * 100, "x" * 50]


def test_long_text_is_generated_piece_by_piece_without_a_seam(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, device="cpu")
    pieces = split_text(PARAGRAPH * 7, max_chars=220)
    utterances = [Utterance(0, p, 240) for p in pieces]  # 3 frames each keeps this fast
    first, rest = utterances[0], tuple(utterances[1:])
    result = engine.generate(GenerationRequest(text=first.text, max_audio_length_ms=240,
                                               then=rest, seed=5, stop_at_end_frame=False))
    assert result.frames == 3 * len(pieces)  # every piece was spoken
    # The joins: one Mimi state runs through all pieces, so the joined audio is exactly one
    # decode of all the codes; a seam would show as a difference near each join.
    whole = engine.codec.decode(result.codes).cpu()
    assert (result.audio - whole).abs().max() < 1e-5
    step = (result.audio[1:] - result.audio[:-1]).abs()
    joins = torch.arange(1, len(pieces)) * 3 * 1920
    assert step[joins - 1].max() <= step.quantile(0.999)
