"""The engine: text plus context in, 24 kHz speech out (the worker watermarks it).

Everything heavy is loaded once (`Engine.load`). A request becomes a scheduler job (see
scheduler.py): its prompt is built here, frames are drawn in the shared batched loop, Mimi
decodes them as they come. `generate` waits for the
whole result; `start` returns a running `Generation` whose audio blocks arrive as the loop
produces them (the worker streams from it).

A request may hold several utterances (long text split into pieces, or dialogue turns): each
is generated with the fixed context plus the utterances before it, the oldest of those
dropped first when the position window runs short (see conversation.py).

`Engine.start` tokenises and builds the first prompt on the caller's thread: an asyncio
caller runs it in a worker thread, so a long context never stalls its event loop.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .audio import resample
from .checkpoint import load_model
from .codec import SAMPLE_RATE, MimiCodec
from .conversation import FRAME_MS, Conversation, PromptTooLongError, Utterance
from .frame_step import KEY_BLOCK
from .model import CSM
from .prompt import Segment, build_prompt
from .scheduler import (STALL_TIMEOUT_S, DeviceFaultError, EngineClosedError, Job, Piece,
                        Prefix, Scheduler, is_device_fault)
from .text_tokenizer import TextTokenizer
from .watermark import Watermarker

__all__ = ["FRAME_MS", "AudioBlock", "DeviceFaultError", "Engine", "EngineClosedError",
           "Generation", "GenerationRequest", "GenerationResult", "PromptTooLongError",
           "Utterance", "is_device_fault"]


@dataclass(frozen=True)
class GenerationRequest:
    text: str
    speaker: int = 0
    # Always in the prompt: a voice, the caller's reference turns.
    context: tuple[Segment, ...] = ()
    # Earlier speech of the same conversation (a WebSocket's previous sentences), after the
    # context: dropped oldest first, with the job's own earlier utterances, when the window
    # runs short.
    history: tuple[Segment, ...] = ()
    max_audio_length_ms: int = 10_000
    temperature: float = 0.9
    topk: int = 50
    seed: int = 0
    # Further utterances spoken after `text`, each conditioned on everything before it.
    then: tuple[Utterance, ...] = ()
    # Benchmarks turn this off to time a fixed number of frames.
    stop_at_end_frame: bool = True

    @property
    def utterances(self) -> tuple[Utterance, ...]:
        return (Utterance(self.speaker, self.text, self.max_audio_length_ms), *self.then)


@dataclass
class AudioBlock:
    """Audio as the loop decodes it (not yet watermarked), with its codes [32, frames]."""

    audio: Tensor
    codes: Tensor
    utterance: int


@dataclass
class GenerationResult:
    audio: Tensor  # 1-D float32, 24 kHz, on the CPU
    codes: Tensor  # [32, frames], all utterances
    stop_reason: str  # "end_of_speech", "max_length" (any utterance hit its limit), "cancelled"
    seed: int
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


class Generation:
    """One running request: a scheduler job and where its events go.

    Events (AudioBlock, then StopIteration or the job's exception) are handed to `deliver`
    on the loop thread; by default they go to a queue that `blocks()` reads. An asyncio
    caller passes a `deliver` that hops onto its event loop instead.
    """

    def __init__(self, engine: "Engine", request: GenerationRequest,
                 deliver: Callable[[object], None] | None = None):
        self.engine = engine
        self.request = request
        self.events: queue.Queue = queue.Queue()
        self.deliver = deliver or self.events.put
        self.reasons: list[str] = []  # each finished utterance's stop reason
        self.started = time.perf_counter()
        self.first_audio_ms: float | None = None
        self.conversation = engine.conversation(request.context, request.history)
        # Every utterance must fit on its own (history can be dropped, context can't):
        # refuse now, before any work, rather than after the first pieces were spoken.
        for utterance in request.utterances[1:]:
            self.conversation.check(utterance)
        first = self.conversation.piece(request.utterances[0])
        self.prompt_positions = len(first.tokens)
        self.job = Job(piece=first, temperature=request.temperature, topk=request.topk,
                       seed=request.seed, on_audio=self._on_audio, next_piece=self._next_piece,
                       on_done=self._on_done, stop_at_end_frame=request.stop_at_end_frame)

    def _on_audio(self, audio: Tensor, codes: Tensor) -> None:
        if self.first_audio_ms is None:
            self.first_audio_ms = 1000 * (time.perf_counter() - self.started)
        self.deliver(AudioBlock(audio, codes, len(self.reasons)))

    def _next_piece(self, codes: Tensor, reason: str) -> Piece | None:
        """Called on the loop thread: cheap, every turn is already tokenised."""
        utterances = self.request.utterances
        self.conversation.add(utterances[len(self.reasons)], codes)
        self.reasons.append(reason)
        if len(self.reasons) == len(utterances):
            return None
        return self.conversation.piece(utterances[len(self.reasons)])

    def _on_done(self, error: BaseException | None) -> None:
        self.deliver(error if error is not None else StopIteration())

    def cancel(self) -> None:
        self.engine.scheduler.cancel(self.job)

    @staticmethod
    def unpack(event: object) -> AudioBlock | None:
        """An event as delivered: the block, None at the end, or the job's error raised."""
        if isinstance(event, StopIteration):
            return None
        if isinstance(event, BaseException):
            raise event
        return event  # type: ignore[return-value]

    def blocks(self) -> Iterator[AudioBlock]:
        """Audio blocks as they come; raises the job's error if it failed."""
        while (block := self.unpack(self.events.get())) is not None:
            yield block

    def stop_reason(self) -> str:
        if len(self.reasons) < len(self.request.utterances):
            return "cancelled"  # it ended before its last utterance did: only cancel does that
        return "max_length" if "max_length" in self.reasons else "end_of_speech"


class Engine:
    def __init__(self, model: CSM, tokenizer: TextTokenizer, codec: MimiCodec,
                 watermarker: Watermarker | None, max_batch: int = 1,
                 startup_ms: dict[str, float] | None = None, use_graphs: bool | None = None,
                 stall_timeout_s: float = STALL_TIMEOUT_S, key_block: int = KEY_BLOCK,
                 compile_backend: str | Callable | None = None, decoder_int8: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.codec = codec
        self.watermarker = watermarker
        self.device = model.codebook0_head.weight.device
        start = time.perf_counter()
        model.prepare_for_serving(decoder_int8)
        self.scheduler = Scheduler(model, codec, max_batch, use_graphs, stall_timeout_s,
                                   key_block, compile_backend)
        self.prefixes: list[tuple[Segment, Prefix]] = []
        # Where start-up time went: weights, codec, watermark, compiling, caches and graphs,
        # checking the graphs.
        self.startup_ms = dict(startup_ms or {})
        compile_ms = self.scheduler.stepper.compile_ms
        check_ms = self.scheduler.graph_check_ms
        if compile_backend is not None:
            self.startup_ms["compile"] = compile_ms
        if self.scheduler.stepper.use_graphs:
            self.startup_ms["graph_check"] = check_ms
        self.startup_ms["caches_and_graphs"] = (1000 * (time.perf_counter() - start)
                                                - compile_ms - check_ms)

    def close(self) -> None:
        """Stop the frame loop and let go of the model, codec and caches (device memory)."""
        self.scheduler.close()
        for name in ("scheduler", "model", "codec", "watermarker", "prefixes"):
            setattr(self, name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def load_ms(self) -> float:
        return sum(self.startup_ms.values())

    @classmethod
    def load(cls, model_dir: Path, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None, max_batch: int = 1,
             use_graphs: bool | None = None, stall_timeout_s: float = STALL_TIMEOUT_S,
             key_block: int = KEY_BLOCK,
             compile_backend: str | Callable | None = None,
             decoder_int8: bool = False) -> "Engine":
        """Weights in bf16 on a GPU and fp32 on the CPU unless `dtype` says otherwise.

        `key_block`: attention reads the cache in spans of this many positions (see
        frame_step.py); the window's length gives the whole-window baseline benchmarks use.
        `compile_backend`: torch.compile's backend for the depth decoder ("inductor"), or None
        not to compile it (see FrameStepper.compile). `decoder_int8`: the depth decoder's
        projections in int8 (Transformer.quantize_int8), read 31 times a frame; it pays only
        compiled.
        """
        model_dir = Path(model_dir)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        startup: dict[str, float] = {}

        def timed(name, build):
            start = time.perf_counter()
            value = build()
            startup[name] = 1000 * (time.perf_counter() - start)
            return value

        model = timed("weights", lambda: load_model(model_dir, device, dtype))
        tokenizer = timed("tokenizer", lambda: TextTokenizer(model_dir / "tokenizer.json"))
        codec = timed("codec", lambda: MimiCodec.load(model_dir / "mimi", device))
        watermarker = timed("watermark",
                            lambda: Watermarker.load(model_dir / "silentcipher", device))
        return cls(model, tokenizer, codec, watermarker, max_batch=max_batch,
                   startup_ms=startup, use_graphs=use_graphs, stall_timeout_s=stall_timeout_s,
                   key_block=key_block, compile_backend=compile_backend,
                   decoder_int8=decoder_int8)

    @property
    def max_positions(self) -> int:
        return self.model.cfg.backbone.max_seq_len

    def encode(self, audio: Tensor, sample_rate: int) -> Tensor:
        """Mono audio at any rate -> its Mimi codes [32, frames] (at 24 kHz), on the host."""
        return self.codec.encode(resample(audio, sample_rate, SAMPLE_RATE))

    def segment(self, speaker: int, text: str, audio: Tensor, sample_rate: int) -> Segment:
        """A context turn from mono audio at any rate (Mimi-encoded here)."""
        return Segment(speaker=speaker, text=text, codes=self.encode(audio, sample_rate))

    def register_prefix(self, segment: Segment) -> None:
        """Prefill a context turn once (a preset voice); prompts that start with this very
        segment then copy its keys and values instead of prefilling it again."""
        tokens, mask = build_prompt(
            [(self.tokenizer.encode_turn(segment.speaker, segment.text), segment.codes)], None)
        self.prefixes.append((segment, self.scheduler.compute_prefix(tokens, mask)))

    def conversation(self, context: tuple[Segment, ...],
                     history: tuple[Segment, ...] = ()) -> Conversation:
        """A job's prompt builder; a context that starts with a registered voice reuses its
        prefilled keys and values."""
        prefix = next((p for s, p in self.prefixes if context and context[0] is s), None)
        return Conversation(self.tokenizer, context, self.max_positions, prefix, history)

    @property
    def fault(self) -> DeviceFaultError | None:
        """Set once the device failed: every later job is refused; restart the process."""
        return self.scheduler.fault if self.scheduler is not None else None

    def start(self, request: GenerationRequest,
              deliver: Callable[[object], None] | None = None) -> Generation:
        """Build the job's prompts (PromptTooLongError if one can't fit) and queue it."""
        if self.scheduler is None:
            raise EngineClosedError("the engine is closed")
        generation = Generation(self, request, deliver)
        self.scheduler.submit(generation.job)
        return generation

    def generate(self, request: GenerationRequest) -> GenerationResult:
        generation = self.start(request)
        blocks = list(generation.blocks())
        return self.finish(generation, blocks)

    def finish(self, generation: Generation, blocks: list[AudioBlock]) -> GenerationResult:
        """Join the blocks and account for where the time went."""
        request = generation.request
        generated = time.perf_counter()
        audio = torch.cat([b.audio for b in blocks]) if blocks else torch.zeros(0)
        codes = (torch.cat([b.codes for b in blocks], dim=1) if blocks
                 else torch.zeros(self.model.cfg.num_codebooks, 0, dtype=torch.long))
        done = time.perf_counter()
        seconds = audio.shape[0] / SAMPLE_RATE
        total_ms = 1000 * (done - generation.started)
        timings = {
            "generate_ms": 1000 * (generated - generation.started),
            "first_audio_ms": generation.first_audio_ms or 0.0,
            "total_ms": total_ms,
            "real_time_factor": total_ms / 1000 / seconds if seconds else 0.0,
        }
        return GenerationResult(audio=audio.float().cpu(), codes=codes,
                                stop_reason=generation.stop_reason(), seed=request.seed,
                                prompt_positions=generation.prompt_positions, timings_ms=timings)
