"""Mimi's streaming decode a bucket of rows at a time (csm.mimi_rows), on the tiny Mimi: its
architecture is Mimi's (convolutions, transposed ones, a transformer with a ring KV cache),
at toy widths."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from moshi.modules.streaming import State, StreamingModule

from csm.codec import NUM_CODEBOOKS, MimiCodec
from csm.mimi_rows import MimiRows

FRAMES = 14
# Rows in use per frame: 1, then 3 (bucket 4) as rows 1 and 2 join, back down to 1, up again.
IN_USE = [1, 1, 3, 3, 3, 3, 1, 1, 1, 3, 3, 2, 2, 1]


@dataclass(frozen=True)
class Clip:
    row: int
    frames: tuple[int, ...]  # the frames at which this clip's next code is decoded


CLIPS = [
    Clip(0, tuple(range(FRAMES))),          # throughout
    Clip(1, (2, 3, 5, 9, 10, 11, 12)),      # pauses at frame 4, and outside the bucket at 6-8
    Clip(2, (2, 3, 4, 5)),                  # leaves ...
    Clip(2, (9, 10)),                       # ... its row reused
]


def decode_in_buckets(rows: MimiRows, codes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each clip's audio, decoding only the bucket of rows in use at each frame."""
    audio: list[list[torch.Tensor]] = [[] for _ in CLIPS]
    garbage = torch.randint(0, 2048, (4, NUM_CODEBOOKS), generator=torch.Generator().manual_seed(9))
    for frame in range(FRAMES):
        live = {i: c for i, c in enumerate(CLIPS) if frame in c.frames}
        joining = torch.zeros(rows.rows, dtype=torch.bool)
        for clip in live.values():
            joining[clip.row] = clip.frames[0] == frame
        rows.reset(joining)
        bucket = next(b for b in rows.states if b >= IN_USE[frame])
        frame_codes, mask = garbage[:bucket].clone(), torch.zeros(bucket, dtype=torch.bool)
        for i, clip in live.items():
            frame_codes[clip.row] = codes[i][:, clip.frames.index(frame)]
            mask[clip.row] = True
        pcm = rows.decode(frame_codes, mask)
        assert rows.bucket == bucket
        for i, clip in live.items():
            audio[i].append(pcm[clip.row])
    return [torch.cat(a) for a in audio]


@pytest.fixture
def codes() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 2048, (NUM_CODEBOOKS, len(c.frames)), generator=generator)
            for c in CLIPS]


@torch.inference_mode()
def test_rows_decoded_a_bucket_at_a_time_equal_each_clip_streamed_alone(tiny_model_dir, codes):
    """Rows join (the bucket grows), pause, wait outside a smaller bucket and go on, leave,
    and a row is reused after a reset that comes while the bucket does not hold it: each
    clip's audio is its own."""
    rows = MimiRows(MimiCodec.load(tiny_model_dir / "mimi").streamer, [1, 2, 4])
    batched = decode_in_buckets(rows, codes)
    alone = MimiCodec.load(tiny_model_dir / "mimi").streamer
    for clip_codes, audio in zip(codes, batched):
        with alone.streaming(1):
            solo = torch.cat([alone.decode(clip_codes[None, :, f:f + 1])[0, 0]
                              for f in range(clip_codes.shape[1])])
        assert audio.shape == solo.shape
        # Convolutions round differently at another batch size (~1e-7 of the peak); a
        # state not shared between buckets is off by the signal itself.
        assert (audio - solo).abs().max() <= 1e-5 * solo.abs().max()


@dataclass
class _Counter(State):
    calls: torch.Tensor


class _PerChannel(StreamingModule[_Counter]):
    """A streaming state with a tensor that is not per row."""

    def _init_streaming_state(self, batch_size: int) -> _Counter:
        return _Counter(batch_size, torch.device("cpu"), torch.zeros(3))


def test_a_state_tensor_without_rows_is_refused() -> None:
    with pytest.raises(RuntimeError, match=r"shape \(3,\) has no batch of 4 rows"):
        MimiRows(_PerChannel(), [1, 2, 4])
