"""The engine: text plus context in, watermarked 24 kHz speech out.

Everything heavy is loaded once (`Engine.load`); `generate` is then request -> prompt ->
frames -> Mimi decode -> watermark. The frame loop never waits on the GPU inside a frame:
frames stay on the device and are checked for the end-of-speech frame every few frames.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .audio import resample
from .checkpoint import load_model
from .codec import SAMPLE_RATE, SAMPLES_PER_FRAME, MimiCodec
from .model import CSM, SamplingState
from .prompt import Segment, build_prompt
from .text_tokenizer import TextTokenizer
from .watermark import Watermarker

# Frames between end-of-speech checks: each check is one device->host copy; at most this
# many frames are computed past the end and discarded.
CHECK_EVERY = 8


class PromptTooLongError(ValueError):
    """The prompt plus the requested audio does not fit the backbone's position window."""


@dataclass(frozen=True)
class GenerationRequest:
    text: str
    speaker: int = 0
    context: tuple[Segment, ...] = ()
    max_audio_length_ms: int = 10_000
    temperature: float = 0.9
    topk: int = 50
    seed: int = 0
    watermark_key: tuple[int, ...] | None = None


@dataclass
class GenerationResult:
    audio: Tensor  # 1-D float32, 24 kHz, on the CPU
    codes: Tensor  # [32, frames]
    stop_reason: str  # "end_of_speech" or "max_length"
    seed: int
    watermarked: bool
    prompt_positions: int
    timings_ms: dict[str, float] = field(default_factory=dict)

    sample_rate: int = SAMPLE_RATE

    @property
    def frames(self) -> int:
        return self.codes.shape[1]

    @property
    def duration_ms(self) -> float:
        return 1000.0 * self.audio.shape[0] / self.sample_rate


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Engine:
    def __init__(self, model: CSM, tokenizer: TextTokenizer, codec: MimiCodec,
                 watermarker: Watermarker | None, load_ms: float = 0.0):
        self.model = model
        self.tokenizer = tokenizer
        self.codec = codec
        self.watermarker = watermarker
        self.load_ms = load_ms
        self.device = model.codebook0_head.weight.device
        self.model.setup_caches(1)

    @classmethod
    def load(cls, model_dir: Path, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> "Engine":
        """Weights in bf16 on a GPU and fp32 on the CPU unless `dtype` says otherwise."""
        start = time.perf_counter()
        model_dir = Path(model_dir)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = load_model(model_dir, device, dtype)
        tokenizer = TextTokenizer(model_dir / "tokenizer.json")
        codec = MimiCodec.load(model_dir / "mimi", device)
        watermarker = Watermarker.load(model_dir / "silentcipher", device)
        return cls(model, tokenizer, codec, watermarker,
                   load_ms=1000 * (time.perf_counter() - start))

    @property
    def max_positions(self) -> int:
        return self.model.cfg.backbone.max_seq_len

    def segment(self, speaker: int, text: str, audio: Tensor, sample_rate: int) -> Segment:
        """A context turn from mono audio at any rate (Mimi-encoded here, at 24 kHz)."""
        codes = self.codec.encode(resample(audio, sample_rate, SAMPLE_RATE))
        return Segment(speaker=speaker, text=text, codes=codes.cpu())

    def prompt(self, request: GenerationRequest) -> tuple[Tensor, Tensor]:
        """[positions, 33] tokens and mask; refuses a prompt that leaves no room to speak."""
        context = [(self.tokenizer.encode_turn(s.speaker, s.text), s.codes)
                   for s in request.context]
        tokens, mask = build_prompt(context, self.tokenizer.encode_turn(request.speaker,
                                                                         request.text))
        max_frames = request.max_audio_length_ms // 80
        limit = self.max_positions - max_frames
        if tokens.shape[0] >= limit:
            raise PromptTooLongError(
                f"the prompt (text plus context) takes {tokens.shape[0]} positions; with "
                f"max_audio_length_ms={request.max_audio_length_ms} ({max_frames} frames) it "
                f"must be under {limit} of the model's {self.max_positions}: shorten the "
                "context or the text, or ask for less audio")
        return tokens, mask

    @torch.inference_mode()
    def generate(self, request: GenerationRequest) -> GenerationResult:
        timings: dict[str, float] = {}
        clock = _Clock(self.device)
        tokens, mask = self.prompt(request)
        codes, stop_reason = self._frames(tokens, mask, request, clock, timings)
        audio = self.codec.decode(codes) if codes.shape[1] else torch.zeros(0)
        timings["decode_ms"] = clock.lap()
        watermarked = False
        if request.watermark_key is not None and self.watermarker is not None and audio.numel():
            audio = self.watermarker.embed(audio, SAMPLE_RATE, request.watermark_key)
            watermarked = True
        timings["watermark_ms"] = clock.lap()
        audio = audio.float().cpu()
        timings["total_ms"] = clock.total()
        seconds = audio.shape[0] / SAMPLE_RATE
        timings["real_time_factor"] = timings["total_ms"] / 1000 / seconds if seconds else 0.0
        return GenerationResult(audio=audio, codes=codes.cpu(), stop_reason=stop_reason,
                                seed=request.seed, watermarked=watermarked,
                                prompt_positions=tokens.shape[0], timings_ms=timings)

    def _frames(self, tokens: Tensor, mask: Tensor, request: GenerationRequest, clock: "_Clock",
                timings: dict[str, float]) -> tuple[Tensor, str]:
        """Prefill, then frames until the all-zero frame (dropped) or the length limit."""
        model, dev, rows = self.model, self.device, slice(0, 1)
        n = tokens.shape[0]
        h = model.prefill(tokens[None].to(dev), mask[None].to(dev),
                          torch.arange(n, device=dev)[None], rows)
        timings["prompt_ms"] = clock.lap()
        sampling = SamplingState(
            temperature=torch.tensor([request.temperature], device=dev, dtype=torch.float32),
            topk=torch.tensor([request.topk], device=dev),
            seed=torch.tensor([request.seed], device=dev),
            frame_index=torch.zeros(1, dtype=torch.long, device=dev))
        position = torch.tensor([n], device=dev)
        frames: list[Tensor] = []
        max_frames = request.max_audio_length_ms // 80
        stop_reason, end, checked = "max_length", max_frames, 0
        for i in range(max_frames):
            codes, h = model.frame_step(h, position, sampling, rows)
            frames.append(codes[0])
            position += 1
            sampling.frame_index += 1
            if len(frames) - checked == CHECK_EVERY or i + 1 == max_frames:
                ended = torch.stack(frames[checked:]).eq(0).all(dim=1).cpu()
                if ended.any():
                    stop_reason, end = "end_of_speech", checked + int(ended.nonzero()[0])
                    break
                checked = len(frames)
        timings["generate_ms"] = clock.lap()
        codes = torch.stack(frames[:end], dim=1) if end else torch.zeros(32, 0, dtype=torch.long)
        return codes, stop_reason


class _Clock:
    """Lap timer that waits for the device, so each lap is the work of that stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self.last = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self) -> float:
        self._sync()
        now = time.perf_counter()
        lap, self.last = 1000 * (now - self.last), now
        return lap

    def total(self) -> float:
        return 1000 * (time.perf_counter() - self.start)
