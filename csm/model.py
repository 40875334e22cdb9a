"""The CSM model: backbone, depth decoder, embeddings and heads, and its one-frame step.

A prompt position has 33 columns: 32 audio codebooks and one text token, with a mask saying
which are present; its input vector is the sum of the present columns' embeddings. One frame
of audio is: backbone hidden h -> codebook 0 from `codebook0_head(h)` -> the depth decoder
walks codebooks 1..31 from `projection(h)` and the embeddings of the codes drawn so far ->
the 32 codes go back into the backbone as the next position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import CSMConfig
from .llama import Embedding, Linear, Transformer
from .sampling import gumbel_noise, kth_index, sample_topk


@dataclass
class SamplingState:
    """Per-row sampling inputs of a frame step, all on the model's device."""

    temperature: Tensor  # [B] float32
    topk: Tensor  # [B] int64
    seed: Tensor  # [B] int64
    frame_index: Tensor  # [B] int64, the job's own frame counter (drives the noise)

    def rows(self, rows: slice) -> "SamplingState":
        return SamplingState(self.temperature[rows], self.topk[rows], self.seed[rows],
                             self.frame_index[rows])


class CSM(nn.Module):
    def __init__(self, cfg: CSMConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Transformer(cfg.backbone)
        self.decoder = Transformer(cfg.decoder)
        self.text_embeddings = Embedding(cfg.text_vocab_size, cfg.backbone.dim)
        self.audio_embeddings = Embedding(cfg.audio_vocab_size * cfg.num_codebooks,
                                             cfg.backbone.dim)
        self.projection = Linear(cfg.backbone.dim, cfg.decoder.dim, bias=False)
        self.codebook0_head = Linear(cfg.backbone.dim, cfg.audio_vocab_size, bias=False)
        self.audio_head = nn.Parameter(
            torch.empty(cfg.num_codebooks - 1, cfg.decoder.dim, cfg.audio_vocab_size))
        self.init_buffers(torch.device("cpu"))

    def init_buffers(self, device: torch.device) -> None:
        """Derived tables, rebuilt after weights are materialised (they are never saved)."""
        self.backbone.init_buffers(device)
        self.decoder.init_buffers(device)
        offsets = torch.arange(self.cfg.num_codebooks, device=device) * self.cfg.audio_vocab_size
        self.register_buffer("codebook_offsets", offsets, persistent=False)
        self.register_buffer("codebooks", torch.arange(self.cfg.num_codebooks, device=device),
                             persistent=False)

    def prepare_for_serving(self, decoder_int8: bool = False) -> None:
        """The weights as the engine serves them: fused projections (fewer, larger matmuls,
        same numbers) and, with `decoder_int8`, the depth decoder's in int8
        (Transformer.quantize_int8)."""
        self.backbone.fuse()
        self.decoder.fuse()
        if decoder_int8:
            self.decoder.quantize_int8()

    def setup_caches(self, max_batch: int) -> None:
        self.backbone.setup_cache(max_batch)
        self.decoder.setup_cache(max_batch)

    def embed(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """tokens, mask: [B, S, 33] -> summed embeddings of the present columns [B, S, dim]."""
        audio = self.audio_embeddings(tokens[..., :-1] + self.codebook_offsets)
        text = self.text_embeddings(tokens[..., -1:])
        embeds = torch.cat([audio, text], dim=-2) * mask.unsqueeze(-1).to(audio.dtype)
        return embeds.sum(dim=-2)

    def prefill(self, tokens: Tensor, mask: Tensor, pos: Tensor, rows: slice,
                keys: int | None = None) -> Tensor:
        """Backbone over new prompt positions, attending over cache positions [0, keys) (see
        Transformer.forward); returns the last position's hidden [B, dim]."""
        return self.backbone(self.embed(tokens, mask), pos, rows, keys)[:, -1]

    def decode_codes(self, h: Tensor, sampling: SamplingState, rows: slice) -> Tensor:
        """The 32 codes of one frame from the backbone hidden h: [B, dim] -> [B, 32]."""
        kth = kth_index(sampling.topk, self.cfg.audio_vocab_size)
        codes, noise = self.decode_first(h, sampling, kth, rows)
        for i in range(2, self.cfg.num_codebooks):
            # The draw's noise goes in as a view: indexed inside decode_next, it would make a
            # compiled decode_next specialise on i, a version per codebook.
            codes.append(self.decode_next(codes[-1], i, sampling.temperature, kth, noise[:, i],
                                          rows))
        return torch.stack(codes, dim=1)

    def decode_first(self, h: Tensor, sampling: SamplingState, kth: Tensor,
                     rows: slice) -> tuple[list[Tensor], Tensor]:
        """Codebooks 0 and 1, and the frame's noise for all 32 draws [B, 32, V]."""
        n = self.cfg.num_codebooks
        draws = sampling.frame_index[:, None] * n + self.codebooks  # frame * 32 + codebook
        noise = gumbel_noise(sampling.seed, draws, self.cfg.audio_vocab_size)
        c0 = sample_topk(self.codebook0_head(h), sampling.temperature, kth, noise[:, 0])
        # Positions 0 and 1 together: the backbone state, then codebook 0's embedding.
        x = torch.stack([h, self.audio_embeddings(c0)], dim=1)
        return [c0, self._draw(x, 1, sampling.temperature, kth, noise[:, 1], rows)], noise

    def decode_next(self, previous: Tensor, i: int, temperature: Tensor, kth: Tensor,
                    gumbel: Tensor, rows: slice) -> Tensor:
        """Codebook i (2..31) from codebook i-1's code [B]. One function for all 30, so that
        compiling it traces one decoder pass, not 30 (see FrameStepper.compile)."""
        x = self.audio_embeddings(previous + self.codebook_offsets[i - 1]).unsqueeze(1)
        return self._draw(x, i, temperature, kth, gumbel, rows)

    def _draw(self, x: Tensor, i: int, temperature: Tensor, kth: Tensor, gumbel: Tensor,
              rows: slice) -> Tensor:
        # The decoder's short window holds the backbone state at position 0 and codebook j's
        # embedding at j + 1, for every row alike; codebook i is drawn from position i.
        pos = slice(i + 1 - x.shape[1], i + 1)
        out = self.decoder(self.projection(x), pos, rows)[:, -1]
        logits = torch.mm(out, self.audio_head[i - 1])
        return sample_topk(logits, temperature, kth, gumbel)

    def compile_frame_step(self, backend: str | Callable) -> None:
        """Compile the frame step's three parts with torch.compile's `backend` (see
        FrameStepper.compile): the depth decoder's `decode_first` and `decode_next`, nearly
        every operation of a step, most of them small, and `feed_frame`, the backbone's pass
        over the frame drawn. Prompts are prefilled eagerly, at lengths of their own.

        On a GPU, inductor is asked for coordinate-descent tuning, as gpt-fast does: with it,
        a matrix product of one row (batch 1) becomes a fused reduction instead of a cuBLAS
        call, which is how gpt-fast's batch-1 products reach the memory bandwidth, and the
        only way an int8 weight's conversion and scale (Int8Linear) are folded into the
        product rather than run as kernels of their own. It tunes each kernel's launch
        settings by timing them, so compiling takes longer.
        """
        options = None
        if backend == "inductor" and self.codebook0_head.weight.device.type == "cuda":
            options = {"coordinate_descent_tuning": True}
        for name in ("decode_first", "decode_next", "feed_frame"):
            setattr(self, name, torch.compile(getattr(self, name), backend=backend,
                                              fullgraph=True, options=options))

    def frame_step(self, h: Tensor, pos: Tensor, sampling: SamplingState, rows: slice,
                   keys: int | None = None) -> tuple[Tensor, Tensor]:
        """Draw one frame from h, then feed it to the backbone at `pos` ([B]), attending over
        cache positions [0, keys).

        Returns (codes [B, 32], next hidden [B, dim]). Fixed shapes, no host sync and no
        data-dependent control flow: this is the unit that gets compiled and graph-captured.
        """
        codes = self.decode_codes(h, sampling, rows)
        return codes, self.feed_frame(codes, pos, rows, keys)

    def feed_frame(self, codes: Tensor, pos: Tensor, rows: slice,
                   keys: int | None = None) -> Tensor:
        """The backbone over one frame's codes [B, 32] at `pos` ([B]): the next hidden."""
        tokens = torch.cat([codes, torch.zeros_like(codes[:, :1])], dim=1).unsqueeze(1)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[..., -1] = False
        return self.prefill(tokens, mask, pos.unsqueeze(1), rows, keys)
