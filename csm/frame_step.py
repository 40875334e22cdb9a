"""The per-frame step over a batch of rows, on static buffers, replayed as a CUDA graph.

Everything one frame needs lives in preallocated per-row buffers (backbone hidden, position,
sampling settings, frame counter), so a step has fixed shapes and no host synchronisation.
On CUDA each batch-size bucket is captured once as a graph and replayed per frame: the ~200
kernel launches of a frame become one. On the CPU the same function runs eagerly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import CSM, SamplingState


def batch_buckets(max_batch: int) -> list[int]:
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch]


class FrameStepper:
    def __init__(self, model: CSM, max_batch: int, park_position: int,
                 use_graphs: bool | None = None):
        self.model = model
        dev = model.codebook0_head.weight.device
        dtype = model.codebook0_head.weight.dtype
        self.park = park_position
        self.h = torch.zeros(max_batch, model.cfg.backbone.dim, dtype=dtype, device=dev)
        self.position = torch.full((max_batch,), park_position, dtype=torch.long, device=dev)
        self.active = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.sampling = SamplingState(
            temperature=torch.ones(max_batch, device=dev),
            topk=torch.ones(max_batch, dtype=torch.long, device=dev),
            seed=torch.zeros(max_batch, dtype=torch.long, device=dev),
            frame_index=torch.zeros(max_batch, dtype=torch.long, device=dev))
        self.codes = torch.zeros(max_batch, model.cfg.num_codebooks, dtype=torch.long, device=dev)
        self.buckets = batch_buckets(max_batch)
        self.use_graphs = dev.type == "cuda" if use_graphs is None else use_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.use_graphs:
            self.capture()

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def start_row(self, slot: int, h: Tensor, position: int, temperature: float, topk: int,
                  seed: int) -> None:
        """Make `slot` live: its prompt's last hidden state and its sampling settings."""
        self.h[slot].copy_(h)
        self.position[slot] = position
        self.active[slot] = 1
        self.sampling.temperature[slot] = temperature
        self.sampling.topk[slot] = topk
        self.sampling.seed[slot] = seed
        self.sampling.frame_index[slot] = 0

    def park_row(self, slot: int) -> None:
        self.active[slot] = 0
        self.position[slot] = self.park

    def _step(self, n: int) -> Tensor:
        rows = slice(0, n)
        codes, h_next = self.model.frame_step(self.h[rows], self.position[rows],
                                              self.sampling.rows(rows), rows)
        self.h[rows].copy_(h_next)
        self.codes[rows].copy_(codes)
        self.position[rows] += self.active[rows]
        self.sampling.frame_index[rows] += self.active[rows]
        return self.codes[rows]

    def step(self, n: int) -> Tensor:
        """One frame for rows [0, n) (n a bucket); returns their codes [n, 32] on the device."""
        graph = self.graphs.get(n)
        if graph is None:
            return self._step(n)
        graph.replay()
        return self.codes[:n]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket's step. Call with no live rows: the warm-up steps run for real."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for n in self.buckets:
                for _ in range(2):  # warm-up: allocator pools, cuBLAS handles, lazy inits
                    self._step(n)
        torch.cuda.current_stream().wait_stream(stream)
        pool = None
        for n in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._step(n)
            pool = graph.pool()
            self.graphs[n] = graph
        self.h.zero_()
