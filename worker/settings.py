"""The worker's configuration, read once from the environment (see the README's table)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from csm.scheduler import STALL_TIMEOUT_S
from csm.watermark import CSM_PUBLIC_KEY, parse_key

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = "/models/csm-1b"


class SettingsError(ValueError):
    """A malformed environment variable: the worker refuses to start."""


@dataclass(frozen=True)
class Limits:
    max_text_chars: int = 5000
    max_context_turns: int = 8
    max_context_seconds: float = 120.0
    max_reference_bytes: int = 8 * 1024 * 1024  # decoded audio of all context turns
    max_audio_length_ms: int = 90_000
    max_turns: int = 32


@dataclass(frozen=True)
class Settings:
    model_dir: Path
    watermark_key: tuple[int, ...]
    watermark_key_is_public: bool
    limits: Limits
    log_level: str
    max_concurrency: int
    device: str | None
    stall_timeout_s: float


_LIMIT_ENV = {f.name: f"CSM_{f.name.upper()}" for f in fields(Limits)}


# Below these a limit would refuse every request (or let one through with no audio).
_MINIMUM = {"max_audio_length_ms": 80}


def _number(env: dict[str, str], name: str, default: float, kind: type,
            minimum: float | None = None) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a {kind.__name__}, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0 or (minimum is not None and value < minimum):
        at_least = f" of at least {minimum:g}" if minimum is not None else ""
        raise SettingsError(f"{name} must be a positive finite number{at_least}, got {raw!r}")
    return value


def load_settings(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    limits = Limits(**{
        f.name: _number(env, _LIMIT_ENV[f.name], f.default, type(f.default),
                        _MINIMUM.get(f.name))
        for f in fields(Limits)})
    raw_key = env.get("CSM_WATERMARK_KEY", "").strip()
    if raw_key:
        try:
            key = parse_key(raw_key)
        except ValueError as e:
            # The message never echoes the key itself: it is a secret.
            raise SettingsError(f"CSM_WATERMARK_KEY is malformed: {_redact(str(e))}") from None
    else:
        key = CSM_PUBLIC_KEY
    level = env.get("CSM_LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError(f"CSM_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    return Settings(
        model_dir=Path(env.get("CSM_MODEL_DIR") or DEFAULT_MODEL_DIR),
        watermark_key=key,
        watermark_key_is_public=not raw_key,
        limits=limits,
        log_level=level,
        max_concurrency=int(_number(env, "CSM_MAX_CONCURRENCY", 8, int)),
        device=env.get("CSM_DEVICE") or None,
        stall_timeout_s=_number(env, "CSM_STALL_TIMEOUT_S", STALL_TIMEOUT_S, float),
    )


def _redact(message: str) -> str:
    """Keep the rule ("must have 5 integers", "must be 0..255"), drop the offending value."""
    return message.split(", got")[0]
