"""The worker's configuration, read once from the environment (see the README's table)."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field, fields
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
    max_reference_bytes: int = 8 * 1024 * 1024  # all context turns, or the clip to verify
    max_audio_length_ms: int = 90_000
    max_turns: int = 32
    max_verify_seconds: float = 10.0  # of the audio verify_watermark reads
    # What one queue job may return (its audio as base64, streamed chunks together): RunPod's
    # API refuses larger results (about 20 MB), and the job's audio is then lost.
    max_result_bytes: int = 20_000_000
    # A context turn's audio_url: the longest its fetch may take, redirects and all.
    audio_url_timeout_s: float = 20.0


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP mode's server (CSM_MODE=http); RunPod's load balancer sets PORT and PORT_HEALTH."""

    host: str = "0.0.0.0"
    port: int = 80
    health_port: int = 80
    # Requests beyond CSM_MAX_CONCURRENCY wait (at most this many, this long), then get 503.
    max_queued: int = 8
    queue_timeout_s: float = 30.0
    # Request bodies and WebSocket messages (a base64 context clip is 4/3 of its bytes).
    max_body_bytes: int = 12 * 1024 * 1024
    # A client that reads nothing for this long is cut off and its job cancelled.
    send_timeout_s: float = 30.0
    # SIGTERM: how long running jobs may go on before they are cut off (worker/shutdown.py);
    # keep it a few seconds under the platform's stop timeout (Kubernetes 30 s, docker stop 10 s).
    shutdown_grace_s: float = 25.0


# A presigned URL signed with SigV4 lives at most a week.
MAX_URL_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class BucketSettings:
    """An S3-compatible bucket for results too large to return (worker/result_store.py).

    The endpoint and keys use RunPod's own variable names (its `rp_upload` reads the same);
    without keys, boto3 finds credentials its usual way (AWS_ACCESS_KEY_ID, a role).
    """

    name: str
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)  # never logged
    prefix: str = "csm/"
    url_ttl_s: int = 24 * 3600


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
    # CSM_DEFAULT_VOICE; None (unset): DEFAULT_VOICE where the model has its prompt, else none
    # (worker/voices.py, choose_default).
    default_voice: str | None = None
    mode: str = "queue"  # CSM_MODE: "queue" (RunPod's job queue) or "http" (worker.http_app)
    allow_watermark_override: bool = False
    # CSM_CUDA_GRAPHS: None (auto: on CUDA), True (required: start-up fails without them) or
    # False (off: the frame step and Mimi run eagerly, an escape hatch if capture fails).
    cuda_graphs: bool | None = None
    # CSM_COMPILE: the frame step (depth decoder, sampling, the backbone's pass over the frame)
    # compiled by torch.compile (inductor) at start-up.
    compile: bool = False
    # CSM_DECODER_INT8: the depth decoder's weights in int8 (csm.llama.Int8Linear).
    decoder_int8: bool = False
    # CSM_AUDIO_URLS: which context audio_url hosts are fetched: "public" addresses only, "any"
    # (a deployment that fetches from its own network too), or "off" (audio_url refused).
    audio_urls: str = "public"
    # CSM_CLIP_CACHE_ENTRIES: callers' reference clips whose Mimi codes are kept (0: none).
    clip_cache_entries: int = 64
    http: HttpSettings = HttpSettings()
    bucket: BucketSettings | None = None  # CSM_BUCKET_NAME and the BUCKET_* variables


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

    audio_urls = env.get("CSM_AUDIO_URLS", "").strip().lower() or "public"
    if audio_urls not in ("public", "any", "off"):
        raise SettingsError(f"CSM_AUDIO_URLS must be public, any or off, got {audio_urls!r}")
    mode = env.get("CSM_MODE", "queue").strip().lower() or "queue"
    if mode not in ("queue", "http"):
        raise SettingsError(f"CSM_MODE must be queue or http, got {mode!r}")
    return Settings(
        mode=mode,
        allow_watermark_override=_flag(env, "CSM_ALLOW_WATERMARK_OVERRIDE"),
        cuda_graphs=(None if env.get("CSM_CUDA_GRAPHS", "").strip().lower() in ("", "auto")
                     else _flag(env, "CSM_CUDA_GRAPHS", "1 or 0 (true or false), or auto")),
        compile=_flag(env, "CSM_COMPILE"),
        decoder_int8=_flag(env, "CSM_DECODER_INT8"),
        audio_urls=audio_urls,
        clip_cache_entries=_count(env, "CSM_CLIP_CACHE_ENTRIES", Settings.clip_cache_entries),
        http=_http_settings(env),
        bucket=_bucket_settings(env),
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
        default_voice=env.get("CSM_DEFAULT_VOICE", "").strip() or None,
    )


def _path(env: dict[str, str], name: str) -> Path | None:
    raw = env.get(name, "").strip()
    return Path(raw).expanduser() if raw else None


def _flag(env: dict[str, str], name: str, accepted: str = "1 or 0 (true or false)") -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise SettingsError(f"{name} must be {accepted}, got {raw!r}")


def _count(env: dict[str, str], name: str, default: int) -> int:
    """A whole number, 0 allowed (it turns the thing off)."""
    raw = env.get(name, "").strip()
    if raw and not raw.isdigit():
        raise SettingsError(f"{name} must be a whole number (0 or more), got {raw!r}")
    return int(raw) if raw else default


def _port(env: dict[str, str], name: str, default: int) -> int:
    port = int(_number(env, name, default, int))
    if port > 65535:
        raise SettingsError(f"{name} must be a port number 1..65535, got {port}")
    return port


def _http_settings(env: dict[str, str]) -> HttpSettings:
    d = HttpSettings()
    port = _port(env, "PORT", d.port)
    return HttpSettings(
        host=env.get("CSM_HOST") or d.host,
        port=port,
        health_port=_port(env, "PORT_HEALTH", port),  # RunPod: PORT_HEALTH defaults to PORT
        max_queued=_count(env, "CSM_MAX_QUEUED", d.max_queued),  # 0: straight to 503
        queue_timeout_s=_number(env, "CSM_QUEUE_TIMEOUT_S", d.queue_timeout_s, float),
        max_body_bytes=int(_number(env, "CSM_MAX_BODY_BYTES", d.max_body_bytes, int)),
        send_timeout_s=_number(env, "CSM_SEND_TIMEOUT_S", d.send_timeout_s, float),
        shutdown_grace_s=_number(env, "CSM_SHUTDOWN_GRACE_S", d.shutdown_grace_s, float))


def _bucket_settings(env: dict[str, str]) -> BucketSettings | None:
    def value(name: str) -> str | None:
        return env.get(name, "").strip() or None

    name = value("CSM_BUCKET_NAME")
    given = [k for k in ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID",
                         "BUCKET_SECRET_ACCESS_KEY", "CSM_BUCKET_REGION", "CSM_BUCKET_PREFIX",
                         "CSM_RESULT_URL_TTL_S") if value(k)]
    if name is None:
        if given:
            raise SettingsError(f"{given[0]} is set but CSM_BUCKET_NAME is not: name the bucket "
                                "that results too large to return go to, or unset it")
        return None
    endpoint = value("BUCKET_ENDPOINT_URL")
    if endpoint is not None and not re.match(r"^https?://[^/\s]+", endpoint):
        raise SettingsError("BUCKET_ENDPOINT_URL must be an http(s) URL like "
                            f"https://s3.us-east-1.amazonaws.com, got {endpoint!r}")
    key_id, secret = value("BUCKET_ACCESS_KEY_ID"), value("BUCKET_SECRET_ACCESS_KEY")
    if (key_id is None) != (secret is None):
        missing = "BUCKET_SECRET_ACCESS_KEY" if secret is None else "BUCKET_ACCESS_KEY_ID"
        raise SettingsError(f"{missing} is unset: give both bucket keys, or neither (boto3 then "
                            "finds credentials its usual way)")
    ttl = int(_number(env, "CSM_RESULT_URL_TTL_S", BucketSettings.url_ttl_s, int))
    if ttl > MAX_URL_TTL_S:
        raise SettingsError(f"CSM_RESULT_URL_TTL_S must be at most {MAX_URL_TTL_S} (7 days, the "
                            f"longest a presigned URL lives), got {ttl}")
    prefix = value("CSM_BUCKET_PREFIX") or BucketSettings.prefix
    return BucketSettings(name=name, endpoint_url=endpoint, region=value("CSM_BUCKET_REGION"),
                          access_key_id=key_id, secret_access_key=secret,
                          prefix=prefix if prefix.endswith("/") else prefix + "/",
                          url_ttl_s=ttl)


def _redact(message: str) -> str:
    """Keep the rule ("must have 5 integers", "must be 0..255"), drop the offending value."""
    return message.split(", got")[0]
