"""Watermark stage: marks generated speech as AI-made with SilentCipher, the way CSM does.

CSM's reference pipeline resamples to 44.1 kHz, embeds a 5-byte key with SilentCipher's 44.1 kHz
model at a message SDR of 36 dB, and resamples back. This module keeps that pipeline and
numerics but works around the installed silentcipher 1.0.5 package: it loads only from a local
folder (never the hub), serialises all calls into the package's process-wide STFT object, and
keeps its BatchNorm layers from rewriting their buffers on every call.
"""

from __future__ import annotations

import numbers
import sys
import threading
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soxr
import torch

# CSM's published key: anyone can check for it, so a deployment should set a private one.
CSM_PUBLIC_KEY: tuple[int, ...] = (212, 211, 146, 56, 201)

WATERMARK_SAMPLE_RATE = 44100
KEY_LENGTH = 5
MODEL_FILES = ("enc_c.ckpt", "dec_c.ckpt", "dec_m_0.ckpt", "hparams.yaml")

# silentcipher's STFT is a process-wide singleton, and encode_wav passes the clip length to its
# inverse through an attribute on it; two overlapping calls would cut each other's output.
_SILENTCIPHER_LOCK = threading.Lock()


def import_silentcipher() -> types.ModuleType:
    """Import silentcipher without pydub.

    silentcipher.server imports pydub at module level only to read audio files, which this
    engine never asks it to do; pydub is not a dependency of the worker, so a placeholder that
    fails on use stands in when it is missing.
    """
    try:
        import pydub  # noqa: F401
    except ImportError:
        placeholder = types.ModuleType("pydub")
        placeholder.AudioSegment = _AudioSegmentMissing
        sys.modules["pydub"] = placeholder
    import silentcipher

    return silentcipher


class _AudioSegmentMissing:
    @staticmethod
    def from_file(*args: object, **kwargs: object) -> None:
        raise ImportError("pydub is not installed: silentcipher cannot read audio files here")


def parse_key(value: str | Sequence[int]) -> tuple[int, int, int, int, int]:
    """Validate a watermark key given as 5 integers or as the string "a,b,c,d,e".

    SilentCipher's 44.1 kHz model carries exactly 40 bits, so anything else is refused up front
    with a message that can be shown to the API caller.
    """
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        try:
            items: list[object] = [int(part) for part in parts]
        except ValueError:
            raise ValueError(f"watermark key values must be integers, got {value!r}") from None
    else:
        try:
            items = list(value)
        except TypeError:
            raise ValueError(
                f'watermark key must be 5 integers or a string "a,b,c,d,e", got {value!r}'
            ) from None
    if len(items) != KEY_LENGTH:
        raise ValueError(f"watermark key must have {KEY_LENGTH} integers, got {len(items)}")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise ValueError(f"watermark key values must be integers, got {item!r}")
        if not 0 <= item <= 255:
            raise ValueError(f"watermark key values must be 0..255, got {item}")
    return tuple(int(item) for item in items)  # type: ignore[return-value]


class Watermarker:
    """SilentCipher's 44.1 kHz model, safe to share between threads of one process."""

    def __init__(self, model: Any) -> None:  # a silentcipher.server.Model
        self._model = model

    @classmethod
    def load(cls, folder: Path, device: torch.device | str = "cpu") -> Watermarker:
        """Load the model from a local folder holding the four files of MODEL_FILES.

        silentcipher.get_model downloads the whole hub repository when a path is missing; a
        worker must fail fast on a broken model folder instead, so the files are checked first.
        """
        folder = Path(folder)
        for name in MODEL_FILES:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"SilentCipher model file missing: {folder / name}")
        model = import_silentcipher().get_model(
            model_type="44.1k",
            ckpt_path=str(folder),
            config_path=str(folder / "hparams.yaml"),
            device=str(device),
        )
        stft_shape = (model.stft.filter_length, model.stft.hop_len)
        if stft_shape != (model.config.N_FFT, model.config.HOP_LENGTH):
            raise RuntimeError(
                f"silentcipher's shared STFT was first built for (n_fft, hop) {stft_shape}, "
                f"this model needs {(model.config.N_FFT, model.config.HOP_LENGTH)}"
            )
        for network in (model.enc_c, model.dec_c, *model.dec_m):
            network.eval()
            for layer in network.modules():
                if isinstance(layer, torch.nn.BatchNorm2d):
                    _normalise_with_clip_statistics(layer)
        return cls(model)

    def embed(
        self, audio: torch.Tensor, sample_rate: int, key: str | Sequence[int]
    ) -> torch.Tensor:
        """Return `audio` carrying `key`, with the same length, dtype, device and sample rate.

        SilentCipher accepts clips of any non-zero length, so every non-silent clip is marked as
        CSM would mark it. The key repeats every 21 STFT frames at 44.1 kHz (about 0.98 s), and
        decoding needs at least 0.84 s of audio: a shorter clip is still marked, but its mark
        cannot be verified on its own. Empty or all-zero audio has nothing to hide a mark in and
        is returned unchanged (a copy), as SilentCipher itself skips silence.
        """
        message = list(parse_key(key))
        samples = _to_numpy(audio)
        if not samples.any():
            return audio.clone()
        at_44k = _resample(samples, sample_rate, WATERMARK_SAMPLE_RATE)
        with _SILENTCIPHER_LOCK:
            marked, _ = self._model.encode_wav(
                at_44k, WATERMARK_SAMPLE_RATE, message, calc_sdr=False, message_sdr=36
            )
        marked = _resample(marked.astype(np.float32), WATERMARK_SAMPLE_RATE, sample_rate)
        marked = _fit_length(marked, samples.shape[0])
        return torch.from_numpy(marked).to(device=audio.device, dtype=audio.dtype)

    def verify(self, audio: torch.Tensor, sample_rate: int, key: str | Sequence[int]) -> bool:
        """True when SilentCipher reads `key` back from `audio` (needs about 0.84 s or more)."""
        expected = list(parse_key(key))
        samples = _to_numpy(audio)
        if not samples.any():
            return False
        at_44k = _resample(samples, sample_rate, WATERMARK_SAMPLE_RATE)
        with _SILENTCIPHER_LOCK:
            result = self._model.decode_wav(
                at_44k, WATERMARK_SAMPLE_RATE, phase_shift_decoding=True
            )
        return bool(result["status"]) and result["messages"][0] == expected


def _normalise_with_clip_statistics(layer: torch.nn.BatchNorm2d) -> None:
    # silentcipher never calls eval(), so its BatchNorm layers normalise every clip with that
    # clip's own statistics (and overwrite their running buffers as a side effect). The
    # published watermark is made that way; dropping the running buffers keeps those numerics
    # in eval mode and leaves nothing to mutate between calls.
    layer.track_running_stats = False
    layer.running_mean = None
    layer.running_var = None
    layer.num_batches_tracked = None


def _to_numpy(audio: torch.Tensor) -> np.ndarray:
    if audio.ndim != 1 or not audio.is_floating_point():
        raise ValueError(
            f"audio must be a 1-D floating-point tensor, got {audio.ndim}-D {audio.dtype}"
        )
    return audio.detach().to(device="cpu", dtype=torch.float32).numpy()


def _resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate:
        return samples
    return soxr.resample(samples, from_rate, to_rate)


def _fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    # A resampling round trip can come back a sample short or long.
    if samples.shape[0] >= length:
        return np.ascontiguousarray(samples[:length])
    return np.pad(samples, (0, length - samples.shape[0]))
