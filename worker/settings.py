"""The worker's configuration, read once from the environment (see the README's table)."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from csm.scheduler import STALL_TIMEOUT_S
from csm.watermark import CSM_PUBLIC_KEY, parse_key

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = "/models/csm-1b"  # where the image bakes its model folder
DEFAULT_MODEL_REPO = "sesame/csm-1b"
DEFAULT_VOLUME_DIR = "/runpod-volume"  # where RunPod mounts network volumes and cached models
DEFAULT_VOICE = "conversational_a"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class StartupError(Exception):
    """Why the worker cannot start, in one line that says what to do."""


class SettingsError(StartupError, ValueError):
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
    model_dir: Path | None  # CSM_MODEL_DIR; unset, the worker searches (worker/model_source.py)
    watermark_key: tuple[int, ...]
    watermark_key_is_public: bool
    limits: Limits
    log_level: str
    max_concurrency: int
    device: str | None
    stall_timeout_s: float = STALL_TIMEOUT_S
    model_repo: str = DEFAULT_MODEL_REPO
    baked_dir: Path = Path(DEFAULT_MODEL_DIR)
    volume_dir: Path = Path(DEFAULT_VOLUME_DIR)
    hf_hub_cache: Path = Path("~/.cache/huggingface/hub").expanduser()
    download_cache: Path = Path("~/.cache/csm-runpod").expanduser()
    voices_dir: Path | None = None
    default_voice: str = DEFAULT_VOICE


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
    repo = env.get("CSM_MODEL_REPO") or DEFAULT_MODEL_REPO
    if not REPO_ID.match(repo):
        raise SettingsError(f"CSM_MODEL_REPO must be a hub repo id like {DEFAULT_MODEL_REPO}, "
                            f"got {repo!r}")
    level = env.get("CSM_LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError(f"CSM_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    home = Path(env.get("HOME") or Path.home())
    hf_home = Path(env.get("HF_HOME") or home / ".cache" / "huggingface")
    return Settings(
        model_dir=_path(env, "CSM_MODEL_DIR"),
        watermark_key=key,
        watermark_key_is_public=not raw_key,
        limits=limits,
        log_level=level,
        max_concurrency=int(_number(env, "CSM_MAX_CONCURRENCY", 8, int)),
        device=env.get("CSM_DEVICE") or None,
        stall_timeout_s=_number(env, "CSM_STALL_TIMEOUT_S", STALL_TIMEOUT_S, float),
        model_repo=repo,
        baked_dir=_path(env, "CSM_BAKED_DIR") or Path(DEFAULT_MODEL_DIR),
        volume_dir=_path(env, "CSM_VOLUME_DIR") or Path(DEFAULT_VOLUME_DIR),
        hf_hub_cache=_path(env, "HF_HUB_CACHE") or hf_home / "hub",
        download_cache=(_path(env, "XDG_CACHE_HOME") or home / ".cache") / "csm-runpod",
        voices_dir=_path(env, "CSM_VOICES_DIR"),
        default_voice=env.get("CSM_DEFAULT_VOICE") or DEFAULT_VOICE,
    )


def _path(env: dict[str, str], name: str) -> Path | None:
    raw = env.get(name, "").strip()
    return Path(raw).expanduser() if raw else None


def _redact(message: str) -> str:
    """Keep the rule ("must have 5 integers", "must be 0..255"), drop the offending value."""
    return message.split(", got")[0]
