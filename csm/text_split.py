"""Splitting long text into pieces CSM speaks well, at sentence boundaries.

CSM garbles very long single inputs; a paragraph is spoken as a series of pieces, each at
most `max_chars` long, cut where a person would pause: after a sentence, never inside a
number ("3.5"), an abbreviation ("Dr.", "e.g.") or a quotation. A sentence longer than
`max_chars` on its own is cut at a clause boundary (comma, semicolon, colon, dash), then at
a space.
"""

from __future__ import annotations

import re

ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "fig",
    "no", "vol", "approx", "dept", "est", "inc", "ltd", "co", "corp", "jan", "feb", "mar",
    "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "u.s", "u.k", "a.m", "p.m",
    "ph.d", "gen", "gov", "sen", "rep", "capt", "lt", "col", "sgt", "ave", "blvd", "rd",
}
_TERMINATORS = ".!?…"
_OPEN = "“«(["
_CLOSE = "”»)]"


def _word_before(text: str, end: int) -> str:
    start = end
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "."):
        start -= 1
    return text[start:end].lower()


def _is_boundary(text: str, i: int, j: int) -> bool:
    """The terminator run text[i..] with its closers ends at j: does a sentence end there?"""
    if j < len(text) and not text[j].isspace():
        return False  # 3.5, "?!x", URLs: no space, no sentence end
    if text[i] == "." and j == i + 1:
        word = _word_before(text, i)
        if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            return False  # Dr. Smith, J. R. R. Tolkien
    rest = text[j:].lstrip()
    return not rest or not rest[0].islower()


def sentences(text: str) -> list[str]:
    """Sentences, with closing quotes and brackets kept on the sentence they close."""
    text = re.sub(r"\s+", " ", text.strip())
    out: list[str] = []
    start, depth, quoted, i = 0, 0, False, 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            quoted = not quoted
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE and depth:
            depth -= 1
        elif ch in _TERMINATORS:
            end = i + 1
            while end < len(text) and text[end] in _TERMINATORS:
                end += 1
            j, d, q = end, depth, quoted
            while j < len(text) and (text[j] in _CLOSE or (text[j] == '"' and q)):
                q, d = (False, d) if text[j] == '"' else (q, max(d - 1, 0))
                j += 1
            if not q and d == 0 and _is_boundary(text, i, j):
                out.append(text[start:j].strip())
                start, depth, quoted, i = j, 0, False, j
                continue
            i = end
            continue
        i += 1
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def _cut_long(sentence: str, max_chars: int) -> list[str]:
    parts: list[str] = []
    while len(sentence) > max_chars:
        window = sentence[:max_chars]
        cut = max(window.rfind(p) for p in (", ", "; ", ": ", " - ", " — "))
        if cut <= max_chars // 3:
            cut = window.rfind(" ")
        if cut <= 0:
            cut = max_chars - 1
        parts.append(sentence[:cut + 1].strip())
        sentence = sentence[cut + 1:].strip()
    return parts + ([sentence] if sentence else [])


def split_text(text: str, max_chars: int = 220) -> list[str]:
    """Pieces of at most max_chars, each made of whole sentences where possible."""
    pieces: list[str] = []
    current = ""
    for sentence in sentences(text):
        for part in _cut_long(sentence, max_chars):
            if current and len(current) + 1 + len(part) > max_chars:
                pieces.append(current)
                current = part
            else:
                current = f"{current} {part}".strip()
    if current:
        pieces.append(current)
    return pieces
