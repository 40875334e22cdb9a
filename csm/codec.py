"""Mimi, the audio codec: 24 kHz mono <-> 32 codebooks at 12.5 frames per second (moshi)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from moshi.models import loaders
from torch import Tensor

from .side_stream import side_stream

SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 1920
NUM_CODEBOOKS = 32
WEIGHTS_FILE = loaders.MIMI_NAME
# Only a non-default Mimi (the tiny test codec) carries this file; the real one uses moshi's.
CONFIG_FILE = "config.json"


def default_config() -> dict:
    return copy.deepcopy(loaders._mimi_config)


class MimiCodec:
    """Two Mimi instances from one file: `mimi` encodes and decodes whole clips; `streamer`
    is the scheduler's, kept in moshi's batched streaming mode (csm.mimi_rows). Streaming
    state lives on the modules, so sharing one instance would make encoding a prompt corrupt
    a running decode."""

    def __init__(self, mimi: torch.nn.Module, streamer: torch.nn.Module):
        self.mimi = mimi
        self.streamer = streamer
        # Encoding runs on request threads, beside the frame loop (csm.side_stream).
        self.encode_stream = side_stream(self.device)

    @classmethod
    def load(cls, folder: Path, device: torch.device | str = "cpu") -> "MimiCodec":
        folder = Path(folder)
        weights = folder / WEIGHTS_FILE
        if not weights.exists():
            raise FileNotFoundError(f"Mimi weights not found: {weights}")
        config_path = folder / CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.exists() else None
        mimi, streamer = (
            loaders.get_mimi(weights, config, device=device, num_codebooks=NUM_CODEBOOKS)
            .eval().requires_grad_(False) for _ in range(2))
        return cls(mimi, streamer)

    @property
    def device(self) -> torch.device:
        return next(self.mimi.parameters()).device

    @torch.inference_mode()
    def encode(self, audio: Tensor) -> Tensor:
        """1-D 24 kHz audio on the host -> codes [32, frames] (int64, on the host); a partial
        last frame is kept."""
        with torch.cuda.stream(self.encode_stream):
            codes = self.mimi.encode(audio.to(self.device, torch.float32)[None, None])
            return codes[0].long().cpu()  # waits for this stream's work alone

    @property
    def codebook_size(self) -> int:
        return self.mimi.cardinality

    def valid_codes(self, codes: Tensor) -> Tensor:
        """CSM's audio vocabulary (2051) is wider than Mimi's codebooks (2048); a code Mimi
        cannot decode becomes 0 rather than crashing the decoder."""
        return codes.masked_fill(codes >= self.codebook_size, 0)

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """codes [32, frames] -> 1-D 24 kHz float32 audio of frames * 1920 samples."""
        return self.mimi.decode(self.valid_codes(codes.to(self.device))[None])[0, 0].float()
