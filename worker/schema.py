"""The request contract: every field typed, ranged and defaulted; unknown fields refused.

Limits that an operator may change (text length, context size, audio length) are checked in
`validate_request` against `Limits` from the environment; fixed ranges live on the fields.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat,
                      StrictInt, StrictStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from csm.sampling import MAX_TOPK
from csm.watermark import KEY_LENGTH

from .settings import Limits

# The built-in voices; a worker also accepts its own (worker/voices.py) and passes its list
# to parse_request.
VOICES = ("conversational_a", "conversational_b", "none")
TASKS = ("generate", "verify_watermark", "list_voices")
FORMATS = ("wav", "flac", "ogg", "opus", "mp3", "aac", "pcm")
MAX_SPEAKER = 31
MAX_SEED = 2**32 - 1
MAX_URL_CHARS = 4096  # a presigned URL with a session token runs to about 1,500


class RequestError(ValueError):
    """Bad input; the message names the field and the limit and goes back to the caller."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Speaker = Annotated[StrictInt, Field(ge=0, le=MAX_SPEAKER)]


# Line breaks and tabs are ordinary in pasted text (\r too, from Windows line ends).
_ALLOWED_CONTROLS = "\n\r\t"


def check_characters(v: str) -> str:
    """Valid Unicode with no control characters but line breaks and tabs (ValueError)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # JSON may carry lone surrogates ("\\ud800")
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    control = next((c for c in v if unicodedata.category(c) == "Cc"
                    and c not in _ALLOWED_CONTROLS), None)
    if control is not None:
        raise ValueError(f"holds the control character U+{ord(control):04X}; only line "
                         "breaks and tabs are allowed")
    return v


def has_words(v: str) -> bool:
    """At least one letter or digit: CSM would otherwise make seconds of noise out of nothing."""
    return any(unicodedata.category(c)[0] in "LN" for c in v)


def _speakable(v: str) -> str:
    check_characters(v)
    if v.strip() and not has_words(v):
        raise ValueError("has nothing to speak (no letter or digit)")
    return v


Text = Annotated[StrictStr, AfterValidator(_speakable)]
# A SilentCipher key: 5 integers 0..255 (csm.watermark.parse_key's rule).
WatermarkKey = Annotated[list[Annotated[StrictInt, Field(ge=0, le=255)]],
                         Field(min_length=KEY_LENGTH, max_length=KEY_LENGTH)]


class DialogueTurn(_Strict):
    text: Text
    speaker: Speaker

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class CallerAudio(_Strict):
    """An audio file of the caller's: as base64, or a link the worker fetches (worker/
    audio_fetch.py)."""

    audio_base64: Annotated[StrictStr, Field(min_length=1)] | None = None
    audio_url: Annotated[StrictStr, Field(min_length=1, max_length=MAX_URL_CHARS)] | None = None

    @field_validator("audio_url")
    @classmethod
    def _web_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]", v):
            raise ValueError("must be an http or https URL")
        return v

    @model_validator(mode="after")
    def _one_audio(self) -> "CallerAudio":
        if (self.audio_base64 is None) == (self.audio_url is None):
            raise ValueError("give exactly one of audio_base64 or audio_url")
        return self


class ContextTurn(DialogueTurn, CallerAudio):
    """An earlier turn with its audio: conversation continuity, or a voice to clone."""


class SpeechRequest(_Strict):
    """What to say and how: the one request every front door builds (queue job, HTTP, OpenAI,
    WebSocket) before the service plans it into the engine's `GenerationRequest`."""

    task: Literal["generate"] = "generate"
    text: Text | None = None
    input: Text | None = None  # alias of text, as OpenAI-style clients send it
    turns: list[DialogueTurn] | None = None
    speaker: Speaker | None = None
    voice: str | None = None  # one of the worker's voices (checked against them) or "none"
    context: list[ContextTurn] = Field(default_factory=list)
    max_audio_length_ms: Annotated[StrictInt, Field(ge=80)] | None = None
    temperature: Annotated[StrictFloat | StrictInt, Field(gt=0, le=2)] = 0.9
    topk: Annotated[StrictInt, Field(ge=1, le=MAX_TOPK)] = 50
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    response_format: Literal["wav", "flac", "ogg", "opus", "mp3", "aac", "pcm"] = "wav"
    stream: StrictBool = False
    # How a whole response carries its audio: as base64, or as a URL into the worker's bucket
    # (auto: a URL only where base64 would outgrow what a queue job can return).
    delivery: Literal["auto", "base64", "url"] = "auto"
    # Per-request watermark control: refused unless the operator allows it (see
    # worker.watermarking).
    watermark: StrictBool | None = None
    watermark_key: WatermarkKey | None = None

    @field_validator("voice", mode="before")
    @classmethod
    def _known_voice(cls, v: Any, info: ValidationInfo) -> Any:
        voices = (info.context or {}).get("voices", VOICES)
        if v is not None and (not isinstance(v, str) or v not in voices):
            raise ValueError(f"must be one of {', '.join(repr(n) for n in voices)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_text(self) -> "SpeechRequest":
        given = [name for name in ("text", "input", "turns") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of text, input (an alias of text) or turns"
                             + (f"; got {', '.join(given)}" if given else ""))
        if self.turns is not None and (self.speaker is not None):
            raise ValueError("speaker: not allowed with turns (each turn has its speaker)")
        if self.stream and self.delivery == "url":
            raise ValueError("delivery: 'url' is for whole responses; a streamed response's "
                             "chunks carry their audio (set stream to false)")
        if self.turns is not None and not self.turns:
            raise ValueError("turns: must not be empty")
        words = self.text if self.text is not None else self.input
        if words is not None and not words.strip():
            raise ValueError("text: must not be empty")
        return self

    @property
    def words(self) -> str | None:
        return self.text if self.text is not None else self.input


class VerifyRequest(CallerAudio):
    task: Literal["verify_watermark"]
    watermark_key: WatermarkKey | None = None  # check for the caller's key (operator-gated)


class ListVoicesRequest(_Strict):
    task: Literal["list_voices"]


Request = SpeechRequest | VerifyRequest | ListVoicesRequest


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not str(p).startswith(("function-after", "function-wrap"))]
    path = ""
    for p in parts:
        path += f"[{p}]" if p.isdigit() else (f".{p}" if path else p)
    return path


def describe_errors(errors: list[dict[str, Any]]) -> str:
    """pydantic's errors as one line: `field: what is wrong`, joined by semicolons."""
    messages = []
    for err in errors:
        path = _field_path(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (see the README for the accepted fields)"
        elif err["type"] == "literal_error":
            msg = f"must be one of {err['ctx']['expected']}, got {err.get('input')!r}"
        msg = msg.removeprefix("Value error, ")
        messages.append(f"{path}: {msg}" if path else msg)
    return "; ".join(messages)


def parse_request(payload: Any, limits: Limits, voices: Sequence[str] = VOICES) -> Request:
    """The job's `input` -> a validated request, or RequestError naming field and limit.
    `voices`: the names `voice` may take (the worker's voices and "none")."""
    if not isinstance(payload, dict):
        raise RequestError(f"input must be a JSON object, got {type(payload).__name__}")
    task = payload.get("task", "generate")
    if task not in TASKS:
        raise RequestError(f"task: must be one of {', '.join(repr(t) for t in TASKS)}, got {task!r}")
    model = {"verify_watermark": VerifyRequest, "list_voices": ListVoicesRequest}.get(
        task, SpeechRequest)
    try:
        request = model.model_validate(payload, context={"voices": voices})
    except ValidationError as e:
        raise RequestError(describe_errors(e.errors(include_url=False))) from None
    if isinstance(request, SpeechRequest):
        _check_limits(request, limits)
    return request


def _check_limits(request: SpeechRequest, limits: Limits) -> None:
    texts = [request.words] if request.turns is None else [t.text for t in request.turns]
    name = "turns" if request.turns is not None else ("text" if request.text else "input")
    total = sum(len(t) for t in texts)
    if total > limits.max_text_chars:
        raise RequestError(f"{name}: {total} characters; the limit is {limits.max_text_chars}")
    if request.turns is not None and len(request.turns) > limits.max_turns:
        raise RequestError(f"turns: {len(request.turns)} turns; the limit is {limits.max_turns}")
    if len(request.context) > limits.max_context_turns:
        raise RequestError(f"context: {len(request.context)} turns; the limit is "
                           f"{limits.max_context_turns}")
    # A context turn's words are tokenised into the prompt like the text's, so they share its
    # limit (per turn: the audio, not the words, is what a voice clone needs much of).
    for i, turn in enumerate(request.context):
        if len(turn.text) > limits.max_text_chars:
            raise RequestError(f"context[{i}].text: {len(turn.text)} characters; the limit is "
                               f"{limits.max_text_chars}")
    ms = request.max_audio_length_ms
    if ms is not None and ms > limits.max_audio_length_ms:
        raise RequestError(f"max_audio_length_ms: {ms}; the limit is "
                           f"{limits.max_audio_length_ms}")
