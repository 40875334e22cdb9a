"""Mimi's streaming decode for the scheduler's rows, run on only the bucket of rows in use.

moshi keeps a streaming decode's state on the modules, for a batch size fixed when streaming
starts, and its `exec_mask` masks state updates, not compute: a Mimi streaming for 64 rows
decodes 64 rows every frame, however few are live (on the 2-core CPU, 347 ms a frame for 64
rows against 54 ms for one). So one state is kept for all the rows, and each smaller bucket of
the frame loop gets its own moshi state objects whose tensors are views of the first rows of
that one state: decoding with a bucket's state updates the shared rows in place, and switching
bucket copies nothing. moshi updates its streaming state in place (its own CUDA graphs rely on
it), and each bucket's state has its own graphs, captured for that batch size.

This reaches into moshi's streaming internals (`_init_streaming_state`, `_streaming_state`,
the state dataclasses' fields) of the pinned moshi 0.2.13; tests/test_mimi_rows.py fails if a
new version's states stop sharing rows this way.
"""

from __future__ import annotations

import dataclasses

import torch
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import RingKVCache
from moshi.utils.compile import no_cuda_graph
from torch import Tensor

from .codec import NUM_CODEBOOKS


class MimiRows:
    """`streamer` (a Mimi) kept streaming for `buckets[-1]` rows, decoded a bucket at a time.
    The one owner of that streaming state."""

    def __init__(self, streamer: torch.nn.Module, buckets: list[int]):
        self.streamer = streamer
        self.rows = buckets[-1]
        streamer.streaming_forever(self.rows)
        self.modules = [m for m in streamer.modules()
                        if isinstance(m, StreamingModule) and m._streaming_state is not None]
        full = [m._streaming_state for m in self.modules]
        self.states = {b: [_rows_view(m, state, b, self.rows)
                           for m, state in zip(self.modules, full)] for b in buckets[:-1]}
        self.states[self.rows] = full
        self.bucket = self.rows

    def reset(self, rows: Tensor) -> None:
        """Start the rows where `rows` [self.rows] (bool) is set afresh, whatever the bucket."""
        for state in self.states[self.rows]:
            state.reset(rows)

    def decode(self, codes: Tensor, live: Tensor) -> Tensor:
        """One frame for the first len(codes) rows (a bucket): codes [rows, 32] -> audio
        [rows, 1920]; only rows where `live` is set advance, the others' audio is garbage."""
        self._use(len(codes))
        self.streamer.set_exec_mask(live)
        return self.streamer.decode(codes[:, :, None])[:, 0]

    def _use(self, bucket: int) -> None:
        if bucket != self.bucket:
            for module, state in zip(self.modules, self.states[bucket]):
                module._streaming_state = state
            self.bucket = bucket

    @torch.inference_mode()
    def graph_error(self, bucket: int, codebook_size: int, frames: int = 6) -> float:
        """How far the bucket's audio under moshi's CUDA graphs (captured on its second call,
        replayed after) is from its audio without them, relative to the peak: random codes
        for every row, a third of the rows paused at each frame as the scheduler pauses rows.
        Without CUDA both runs are eager (0.0). Every row is reset after; the bucket's graphs
        stay captured for serving."""
        device = next(self.streamer.parameters()).device
        generator = torch.Generator().manual_seed(0)
        codes = torch.randint(0, codebook_size, (frames, bucket, NUM_CODEBOOKS),
                              generator=generator).to(device)
        live = ((torch.arange(frames)[:, None] + torch.arange(bucket)) % 3 != 2).to(device)
        every_row = torch.ones(self.rows, dtype=torch.bool, device=device)

        def decode() -> Tensor:
            self.reset(every_row)
            pcm = [self.decode(codes[s], live[s]).float() * live[s, :, None]
                   for s in range(frames)]
            self.reset(every_row)
            return torch.stack(pcm)

        graphed = decode()
        with no_cuda_graph():
            eager = decode()
        return float((graphed - eager).abs().max() / eager.abs().max())


def _rows_view(module: StreamingModule, full: object, rows: int, full_rows: int) -> object:
    """A fresh moshi state of `module` for `rows` rows whose tensors are views of the first
    rows of `full`'s. A tensor that is not batch-major is refused rather than shared wrongly."""
    state = module._init_streaming_state(rows)
    state.exec_mask = _first_rows(full.exec_mask, state.exec_mask, full_rows)
    for field in dataclasses.fields(state):
        mine, shared = getattr(state, field.name), getattr(full, field.name)
        if isinstance(mine, Tensor):
            setattr(state, field.name, _first_rows(shared, mine, full_rows))
        elif isinstance(mine, RingKVCache):  # [2 (keys, values), rows, ...]
            mine.cache = _first_rows(shared.cache, mine.cache, full_rows, dim=1)
            mine.end_offset = _first_rows(shared.end_offset, mine.end_offset, full_rows)
    return state


def _first_rows(shared: Tensor, mine: Tensor, full_rows: int, dim: int = 0) -> Tensor:
    """`shared`'s first rows, shaped as `mine` (the same tensor of a smaller state)."""
    view = shared.narrow(dim, 0, mine.shape[dim])
    if shared.shape[dim] != full_rows or view.shape != mine.shape:
        raise RuntimeError(f"a Mimi streaming state tensor of shape {tuple(shared.shape)} "
                           f"has no batch of {full_rows} rows at dim {dim}: its rows can't "
                           "be shared between batch sizes")
    return view
