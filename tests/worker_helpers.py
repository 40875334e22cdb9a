"""Shared helpers for the worker tests: audio files made in the test, decoding responses,
running a Worker's async generator from synchronous tests, and the handler subprocess.

The tiny model folder has RANDOM weights: what it generates is noise, never speech. The
tests check plumbing (lengths, formats, fields, errors), never what the audio sounds like.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 1920  # one 80 ms Mimi frame at 24 kHz


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 220.0,
         amplitude: float = 0.3) -> np.ndarray:
    """A plain sine (float32, [samples, channels]): audible, not silent, not speech."""
    t = np.arange(int(round(seconds * rate))) / rate
    wave = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def audio_file(seconds: float, rate: int = 44_100, channels: int = 1, fmt: str = "WAV",
               subtype: str | None = None, amplitude: float = 0.3) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, rate, channels, amplitude=amplitude), rate, format=fmt,
             subtype=subtype or ("PCM_16" if fmt in ("WAV", "FLAC") else "VORBIS"))
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def audio_b64(*args: Any, **kwargs: Any) -> str:
    return b64(audio_file(*args, **kwargs))


def decode_audio(response: dict[str, Any]) -> tuple[np.ndarray, int]:
    """A response's audio_base64 -> (samples, rate); pcm is raw little-endian 16-bit mono."""
    raw = base64.b64decode(response["audio_base64"], validate=True)
    return decode_bytes(raw, response["format"])


# Mimi's convolutions round differently at another batch size (~4e-8 on this CPU; it decodes
# only the rows in use), so a job's sample may land on the neighbouring 16-bit step beside
# other jobs than alone (measured: one step). Another job's audio, or a frame out of place,
# is off by the signal itself.
SAME_AUDIO = 2 / 32767


def assert_same_audio(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two responses hold the same job's audio, whatever ran beside it."""
    (first, _), (second, _) = decode_audio(a), decode_audio(b)
    assert first.shape == second.shape
    assert np.abs(first - second).max() <= SAME_AUDIO


# Encoders that add priming and padding a plain stream can't tell the decoder to trim
# (no gapless tag): their decoded length is the true one plus up to this many samples.
PRIMING_SAMPLES = {"aac": 2048, "mp3": 2304}


def decode_with_ffmpeg(raw: bytes) -> tuple[np.ndarray, int]:
    """Any file FFmpeg reads (ADTS AAC, and FLAC or MP3 streams without a length)."""
    with av.open(io.BytesIO(raw)) as container:
        (stream,) = container.streams.audio
        assert stream.codec_context.channels == 1, "the worker answers in mono"
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
        rate = stream.codec_context.sample_rate
    return np.concatenate(frames).astype(np.float32), rate


def decode_bytes(raw: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        assert len(raw) % 2 == 0, "pcm must hold whole 16-bit samples"
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32767, SAMPLE_RATE
    if fmt == "aac":  # libsndfile has no AAC
        return decode_with_ffmpeg(raw)
    data, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    assert data.shape[1] == 1, "the worker answers in mono"
    return data[:, 0], rate


def stream_wav_frames(raw: bytes) -> np.ndarray:
    """A streamed WAV (sizes 0xFFFFFFFF: "unknown") -> its 16-bit samples.

    libsndfile does read such files, but this parses the 44-byte header itself so that the
    test also checks the header fields the stream encoder writes.
    """
    assert raw[:4] == b"RIFF" and raw[8:16] == b"WAVEfmt ", raw[:16]
    fmt_size, audio_fmt, channels, rate, byte_rate, align, bits = np.frombuffer(
        raw[16:36], dtype="<u4,<u2,<u2,<u4,<u4,<u2,<u2")[0]
    assert (fmt_size, audio_fmt, channels, rate, byte_rate, align, bits) == (
        16, 1, 1, SAMPLE_RATE, 2 * SAMPLE_RATE, 2, 16)
    assert raw[36:40] == b"data"
    body = raw[44:]
    assert len(body) % 2 == 0
    return np.frombuffer(body, dtype="<i2")


async def collect(worker: Any, payload: Any, **kwargs: Any) -> list[dict[str, Any]]:
    return [item async for item in worker.run(payload, **kwargs)]


async def complete(worker: Any, payload: Any) -> dict[str, Any]:
    """The whole response at once (streamed requests too), as `--test_input` answers."""
    items = [item async for item in worker.run(payload, allow_stream=False)]
    assert len(items) == 1, items
    return items[0]


def run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return loop.run_until_complete(coro)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def imported_handler(env: dict[str, str]):
    """handler.py imported in this process under `env` (it builds its Worker at import);
    the environment and sys.path are restored at once, the module dropped on exit."""
    saved = dict(os.environ)
    os.environ.update(env)
    sys.modules.pop("handler", None)
    sys.path.insert(0, str(REPO))
    try:
        module = importlib.import_module("handler")
    finally:
        os.environ.clear()
        os.environ.update(saved)
        sys.path.remove(str(REPO))
    try:
        yield module
    finally:
        sys.modules.pop("handler", None)


def handler_env(model_dir: Path, **limits: str) -> dict[str, str]:
    """The environment for `python handler.py`: the tiny model and small limits."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CSM_", "RUNPOD_"))}  # nothing leaks in from the caller
    env.update({"CSM_MODEL_DIR": str(model_dir), "CSM_DEVICE": "cpu",
                "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    env.update(limits)
    return env


def handler_cmd(*args: str) -> list[str]:
    return [sys.executable, "-u", str(REPO / "handler.py"), *args]


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate, then kill: never leave a server behind."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


@contextlib.contextmanager
def rp_api_server(env: dict[str, str], cwd: Path, log_path: Path):
    """`python handler.py --rp_serve_api` on a free port of 127.0.0.1, its base URL yielded
    once it answers; the process is always stopped (terminate, then kill)."""
    import pytest
    import requests

    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            handler_cmd("--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port",
                        str(port)),
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                if requests.get(url + "/", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer in 90 s:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield url
    finally:
        stop(proc)
        assert proc.poll() is not None


def start_up_error(model_dir: Path, monkeypatch: Any, caplog: Any, **env: str) -> str:
    """Start the worker in-process on `model_dir` on the CPU with only `env` among the CSM_
    and HF_ variables; it must exit with status 1 after one error line, returned."""
    from worker.startup import settings_or_exit, worker_or_exit

    for key in [k for k in os.environ if k.startswith(("CSM_", "HF_"))]:
        monkeypatch.delenv(key)
    for key, value in dict(CSM_DEVICE="cpu", CSM_MODEL_DIR=str(model_dir), **env).items():
        monkeypatch.setenv(key, value)
    try:
        worker_or_exit(settings_or_exit())
    except SystemExit as stopped:
        assert stopped.code == 1
    else:
        raise AssertionError("the worker started")
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    return errors[0].getMessage()
