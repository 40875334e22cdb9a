"""The per-frame step over a batch of rows, on static buffers, replayed as a CUDA graph.

Everything one frame needs lives in preallocated per-row buffers (backbone hidden, position,
sampling settings, frame counter), so a step has fixed shapes and no host synchronisation.
On CUDA each batch-size bucket is captured once per key span as a graph and replayed per
frame: the ~2,700 kernel launches of a csm-1b frame become one. Before the first job, a replay
of each bucket is checked against the same steps run eagerly (`check_replay`). On the CPU the
same function runs eagerly.

Optionally the step is compiled by torch.compile at start-up (the depth decoder and sampling,
`CSM.decode_codes`, ~90% of its operations, most of them small, and the backbone's pass over
the frame drawn), so that a replay runs fewer, fused kernels.

A key span is how many cache positions the backbone's attention reads: the smallest multiple
of `key_block` that holds every live row's position, not the whole window. At csm-1b shapes
the whole window's keys and values are 64 MiB per row per frame: at 64 rows, twice the bytes
of the backbone's weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from .model import CSM, SamplingState


# A multiple of 512 keeps the CPU's attention kernel, which reads keys in blocks of 512,
# summing in the same order whatever the span: a row draws the same codes in any batch.
KEY_BLOCK = 512


class GraphCaptureError(RuntimeError):
    """The frame step could not be captured as CUDA graphs; the worker can serve without them."""


class CompileError(RuntimeError):
    """torch.compile failed on the frame step; the worker can serve without it."""


def batch_buckets(max_batch: int) -> list[int]:
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch]


def key_spans(window: int, key_block: int) -> list[int]:
    """Every span a step may attend over: multiples of key_block, the last one the window."""
    return sorted({min(window, k) for k in range(key_block, window + key_block, key_block)})


class FrameStepper:
    """The device side of every row, and its one owner.

    A row is live while its frame budget (`remaining`) is above zero: each step draws a frame
    for every row of the bucket, but only live rows advance their position and frame counter,
    and a row stops by itself once it has drawn its piece's frames, mid-block, with no host
    sync. So no row ever writes past `position + frames` of its piece, which the scheduler
    keeps inside the window (see `start`). A parked row has no budget and sits at `park`,
    the last cache position of its own row, which no live position attends to.
    """

    def __init__(self, model: CSM, max_batch: int, use_graphs: bool | None = None,
                 key_block: int = KEY_BLOCK, compile_backend: str | Callable | None = None):
        self.model = model
        self.window = model.cfg.backbone.max_seq_len
        self.park_position = self.window - 1
        self.key_block = key_block
        dev = model.codebook0_head.weight.device
        dtype = model.codebook0_head.weight.dtype
        self.h = torch.zeros(max_batch, model.cfg.backbone.dim, dtype=dtype, device=dev)
        self.position = torch.full((max_batch,), self.park_position, dtype=torch.long,
                                   device=dev)
        self.remaining = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.sampling = SamplingState(
            temperature=torch.ones(max_batch, device=dev),
            topk=torch.ones(max_batch, dtype=torch.long, device=dev),
            seed=torch.zeros(max_batch, dtype=torch.long, device=dev),
            frame_index=torch.zeros(max_batch, dtype=torch.long, device=dev))
        self.codes = torch.zeros(max_batch, model.cfg.num_codebooks, dtype=torch.long, device=dev)
        self.buckets = batch_buckets(max_batch)
        self.spans = key_spans(self.window, key_block)
        self.use_graphs = dev.type == "cuda" if use_graphs is None else use_graphs
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (rows, span) -> graph
        self.compile_ms = 0.0
        self.check_ms = 0.0
        if compile_backend is not None:
            self.compile(compile_backend)
        if self.use_graphs:
            try:
                self.capture()
            except Exception as e:
                # Nothing in the checkpoint causes this (a driver, a torch build, an op that
                # can't be captured), so say how to serve anyway rather than blame the folder.
                raise GraphCaptureError(
                    f"capturing the frame step as CUDA graphs failed ({type(e).__name__}: {e}); "
                    "CSM_CUDA_GRAPHS=0 serves without them, slower") from e
            self.check_replay()

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def key_span(self, positions: int) -> int:
        """The span that holds cache positions [0, positions)."""
        return min(self.window, -(-positions // self.key_block) * self.key_block)

    def start(self, row: int, h: Tensor, position: int, frames: int, temperature: float,
              topk: int, noise_key: int) -> None:
        """Make `row` live: its prompt's last hidden state at `position`, `frames` to draw."""
        if position + frames > self.park_position:
            # The piece builder keeps prompts inside the window; this is the last line before
            # an out-of-range cache index, which on a GPU poisons the whole CUDA context.
            raise ValueError(f"a piece of {frames} frames after {position} prompt positions "
                             f"does not fit the {self.window}-position window")
        self.h[row].copy_(h)
        self.position[row] = position
        self.remaining[row] = frames
        self.sampling.temperature[row] = temperature
        self.sampling.topk[row] = topk
        self.sampling.seed[row] = noise_key
        self.sampling.frame_index[row] = 0

    def park(self, row: int) -> None:
        self.remaining[row] = 0
        self.position[row] = self.park_position

    def _step(self, n: int, keys: int) -> Tensor:
        rows = slice(0, n)
        codes, h_next = self.model.frame_step(self.h[rows], self.position[rows],
                                              self.sampling.rows(rows), rows, keys)
        self.h[rows].copy_(h_next)
        self.codes[rows].copy_(codes)
        live = (self.remaining[rows] > 0).long()
        self.position[rows] += live
        self.sampling.frame_index[rows] += live
        self.remaining[rows] -= live
        return self.codes[rows]

    def step(self, n: int, keys: int) -> Tensor:
        """One frame for rows [0, n) (n a bucket), attending over cache positions [0, keys)
        (a span: every live row's position below it); returns their codes [n, 32] on the
        device."""
        graph = self.graphs.get((n, keys))
        if graph is None:
            return self._step(n, keys)
        graph.replay()
        return self.codes[:n]

    def compile(self, backend: str | Callable) -> None:
        """Compile the frame step (`CSM.compile_frame_step`) with torch.compile's `backend`
        ("inductor" in production), and run a first step of every bucket over every key span
        here: no job waits minutes for a compile, a failure is a start-up error of its own,
        and graphs then capture the compiled kernels.

        A few small versions, whatever the numbers of buckets and spans: the depth decoder's
        first two codebooks are one function and codebooks 2..31 another, each compiled static
        for batch 1 and then, as the batch size (and the codebook index) change, once with them
        symbolic: five at most; the backbone's pass over the frame (`feed_frame`) static, then
        with the key span symbolic, then the batch size too: three. Compiling the frame's 31
        decoder passes unrolled traced the pass 31 times per version: 142 s of start-up cold
        instead of 38 s, at batch 1 on a 2-core CPU (BENCHMARKS.md).
        """
        start = time.perf_counter()
        try:
            self.model.compile_frame_step(backend)
            with torch.inference_mode():
                for n in self.buckets:
                    for keys in self.spans:
                        self._step(n, keys)
        except Exception as e:
            raise CompileError(f"compiling the frame step failed ({type(e).__name__}: {e}); "
                               "CSM_COMPILE=0 serves without it") from e
        self.h.zero_()
        self.compile_ms = 1000 * (time.perf_counter() - start)

    @torch.inference_mode()
    def check_replay(self) -> None:
        """Replay one graph of every bucket (the spans taken in turn) from live rows in a
        random state, unlike the parked rows they were captured with, and compare with the
        same two steps run eagerly. A graph that kept a value from capture time, or read
        memory that another graph reused, disagrees: start-up fails rather than serve noise.
        This runs on the deployment's own GPU, driver and torch before the first job.

        A row agrees when its codes are equal and its hidden state ends within 5% (rounding
        drift, were cuBLAS to pick other kernels while capturing; a broken graph is off by
        ~100%). A replay runs the eager step's kernels, so every row should agree; a row that
        turned a near-tie draw is forgiven: a second random state is tried when fewer than
        half the rows agree in the first.
        """
        start = time.perf_counter()
        for i, n in enumerate(self.buckets):
            keys = self.spans[i % len(self.spans)]
            agreeing = []
            for seed in (i, i + len(self.buckets)):
                agreeing.append(self._replay_agreement(n, keys, seed))
                if agreeing[-1] >= (n + 1) // 2:
                    break
            else:
                self._reset_rows()
                raise GraphCaptureError(
                    f"the CUDA graph of {n} rows over {keys} positions disagrees with the "
                    f"same steps run eagerly (rows agreeing: {agreeing[0]} and {agreeing[1]} "
                    f"of {n}); CSM_CUDA_GRAPHS=0 serves without graphs, slower")
        self._reset_rows()
        self.check_ms = 1000 * (time.perf_counter() - start)

    def _replay_agreement(self, n: int, keys: int, seed: int) -> int:
        """How many of rows [0, n) draw the same two frames replayed as eagerly."""
        self._random_rows(n, keys, seed)
        start = [t.clone() for t in self._row_state()]
        eager = torch.stack([self._step(n, keys).clone() for _ in range(2)], dim=1)
        eager_h = self.h[:n].float().clone()
        for t, saved in zip(self._row_state(), start):
            t.copy_(saved)
        graph = self.graphs[n, keys]
        replayed = []
        for _ in range(2):
            graph.replay()
            replayed.append(self.codes[:n].clone())
        codes_equal = (torch.stack(replayed, dim=1) == eager).flatten(1).all(dim=1)
        error = (self.h[:n].float() - eager_h).norm(dim=1)
        return int((codes_equal & (error <= 0.05 * eager_h.norm(dim=1))).sum())

    def _row_state(self) -> list[Tensor]:
        """Every per-row buffer a step reads or advances."""
        s = self.sampling
        return [self.h, self.codes, self.position, self.remaining, s.temperature, s.topk,
                s.seed, s.frame_index]

    def _random_rows(self, n: int, keys: int, seed: int) -> None:
        """Rows [0, n) live for two frames just below `keys`, with random hidden states."""
        generator = torch.Generator().manual_seed(seed)
        h = torch.randn(n, self.h.shape[1], generator=generator)
        for row in range(n):
            self.start(row, h[row], keys - 3, 2, temperature=0.9,
                       topk=min(50, self.model.cfg.audio_vocab_size),
                       noise_key=int(torch.randint(0, 2**62, (1,), generator=generator)))

    def _reset_rows(self) -> None:
        for row in range(self.h.shape[0]):
            self.park(row)
        self.h.zero_()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every (bucket, span) step. Call with no live rows: the warm-up steps run
        for real."""
        shapes = [(n, keys) for n in self.buckets for keys in self.spans]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for n, keys in shapes:
                for _ in range(2):  # warm-up: allocator pools, cuBLAS handles, lazy inits
                    self._step(n, keys)
        torch.cuda.current_stream().wait_stream(stream)
        pool = None
        for n, keys in reversed(shapes):  # largest first, so smaller graphs reuse its pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(n, keys)
            pool = graph.pool()
            self.graphs[n, keys] = graph
        self.h.zero_()
