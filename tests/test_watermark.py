"""Tests for csm.watermark on random-weight SilentCipher checkpoints of the real shapes.

Random weights cannot carry a key, so these tests check the plumbing (loading, resampling,
length and dtype, locking, key handling) and that the numerics match stock silentcipher; they
cannot show that a real watermark survives.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch

from csm.codec import SAMPLES_PER_FRAME
from csm.scheduler import CHECK_EVERY
from csm.testing.silentcipher_weights import write_random_silentcipher
from csm.watermark import (
    CSM_PUBLIC_KEY,
    MODEL_FILES,
    Watermarker,
    WatermarkStream,
    import_silentcipher,
    parse_key,
)

# Sizes of the real 44_1_khz/73999_iteration checkpoints on the hub (sony/silentcipher).
REAL_CHECKPOINT_BYTES = {
    "enc_c.ckpt": 184_765,
    "dec_c.ckpt": 2_008_794,
    "dec_m_0.ckpt": 9_554_818,
}


def _speechlike(seconds: float, sample_rate: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    voiced = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    audio = 0.1 * envelope * voiced + 0.005 * rng.standard_normal(t.shape)
    return torch.from_numpy(audio.astype(np.float32))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("silentcipher")
    write_random_silentcipher(folder)
    return folder


@pytest.fixture(scope="module")
def watermarker(model_dir: Path) -> Watermarker:
    return Watermarker.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def clip_24k() -> torch.Tensor:
    return _speechlike(1.0, 24000)


@pytest.fixture(scope="module")
def marked_24k(watermarker: Watermarker, clip_24k: torch.Tensor) -> torch.Tensor:
    return watermarker.embed(clip_24k, 24000, CSM_PUBLIC_KEY)


def test_embed_keeps_length_dtype_and_changes_audio(
    clip_24k: torch.Tensor, marked_24k: torch.Tensor
) -> None:
    assert marked_24k.shape == clip_24k.shape
    assert marked_24k.dtype == torch.float32
    assert torch.isfinite(marked_24k).all()
    difference = (marked_24k - clip_24k).abs().max().item()
    assert 1e-5 < difference < 0.1 * clip_24k.abs().max().item()


def test_embed_matches_stock_silentcipher(model_dir: Path, watermarker: Watermarker) -> None:
    # Same numerics as silentcipher's own (never eval()'d) model, and no state written.
    stock = import_silentcipher().get_model(
        model_type="44.1k", ckpt_path=str(model_dir), config_path=str(model_dir / "hparams.yaml")
    )
    audio = _speechlike(0.25, 44100, seed=1)
    expected, _ = stock.encode_wav(
        audio.numpy(), 44100, list(CSM_PUBLIC_KEY), calc_sdr=False, message_sdr=36
    )
    state_before = {k: v.clone() for k, v in watermarker._model.dec_c.state_dict().items()}
    marked = watermarker.embed(audio, 44100, CSM_PUBLIC_KEY)
    np.testing.assert_allclose(marked.numpy(), expected, atol=1e-6)
    state_after = watermarker._model.dec_c.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)


def test_concurrent_embeds_match_sequential(
    watermarker: Watermarker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # silentcipher hands the clip length to its shared STFT's inverse through an attribute; a
    # slowed-down inverse makes two unlocked calls of different lengths trim each other's output.
    clips = [_speechlike(seconds, 24000, seed=i) for i, seconds in enumerate((0.2, 0.45))]
    sequential = [watermarker.embed(clip, 24000, CSM_PUBLIC_KEY) for clip in clips]
    stft = watermarker._model.stft
    inverse = stft.inverse

    def slow_inverse(*args: object) -> torch.Tensor:
        time.sleep(0.5)
        return inverse(*args)

    monkeypatch.setattr(stft, "inverse", slow_inverse)
    results: list[torch.Tensor | None] = [None, None]

    def run(index: int) -> None:
        results[index] = watermarker.embed(clips[index], 24000, CSM_PUBLIC_KEY)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, sequential):
        assert got is not None and torch.equal(got, want)


def test_short_audio_is_marked_and_empty_or_silent_audio_is_returned(
    watermarker: Watermarker,
) -> None:
    short = _speechlike(0.01, 24000)
    marked = watermarker.embed(short, 24000, CSM_PUBLIC_KEY)
    assert marked.shape == short.shape and torch.isfinite(marked).all()
    assert not torch.equal(marked, short)
    for unmarkable in (torch.zeros(0), torch.zeros(2400)):
        assert torch.equal(watermarker.embed(unmarkable, 24000, CSM_PUBLIC_KEY), unmarkable)
        assert watermarker.verify(unmarkable, 24000, CSM_PUBLIC_KEY) is False


def test_embed_keeps_dtype(watermarker: Watermarker) -> None:
    audio = _speechlike(0.05, 24000).to(torch.float64)
    marked = watermarker.embed(audio, 24000, CSM_PUBLIC_KEY)
    assert marked.dtype == torch.float64 and marked.shape == audio.shape


def test_embed_refuses_non_1d_audio(watermarker: Watermarker) -> None:
    with pytest.raises(ValueError, match="1-D"):
        watermarker.embed(torch.zeros(1, 2400), 24000, CSM_PUBLIC_KEY)


def test_verify_runs_and_returns_bool(
    watermarker: Watermarker, marked_24k: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The phase search runs the 10-layer message decoder ~200 times, minutes on a small CPU;
    # one pass is enough to exercise the path.
    monkeypatch.setattr(watermarker._model, "get_best_ps", lambda audio: 0)
    assert isinstance(watermarker.verify(marked_24k, 24000, CSM_PUBLIC_KEY), bool)


def test_verify_compares_the_decoded_message_with_the_key(
    watermarker: Watermarker, clip_24k: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = {"status": True, "messages": [list(CSM_PUBLIC_KEY)], "confidences": [1.0]}
    monkeypatch.setattr(watermarker._model, "decode_wav", lambda *args, **kwargs: decoded)
    assert watermarker.verify(clip_24k, 24000, CSM_PUBLIC_KEY) is True
    assert watermarker.verify(clip_24k, 24000, "1,2,3,4,5") is False
    decoded["status"] = False
    assert watermarker.verify(clip_24k, 24000, CSM_PUBLIC_KEY) is False


def test_parse_key_accepts_sequences_and_strings() -> None:
    assert parse_key([212, 211, 146, 56, 201]) == CSM_PUBLIC_KEY
    assert parse_key(" 212, 211 ,146,56,  201 ") == CSM_PUBLIC_KEY
    assert parse_key((0, 255, 0, 255, np.int64(7))) == (0, 255, 0, 255, 7)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ([1, 2, 3], "watermark key must have 5 integers, got 3"),
        ("1,2,3,4,5,6", "watermark key must have 5 integers, got 6"),
        ([1, 2, 3, 4, 300], "watermark key values must be 0..255, got 300"),
        ("1,2,3,4,-1", "watermark key values must be 0..255, got -1"),
        ([1, 2, 3, 4, 5.0], "watermark key values must be integers, got 5.0"),
        ([1, 2, 3, 4, True], "watermark key values must be integers, got True"),
        ("1,2,3,4,x", "watermark key values must be integers, got '1,2,3,4,x'"),
        (42, 'watermark key must be 5 integers or a string "a,b,c,d,e", got 42'),
    ],
)
def test_parse_key_refuses_bad_keys(key: object, message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_key(key)  # type: ignore[arg-type]
    assert str(error.value) == message


def test_embed_validates_the_key(watermarker: Watermarker, clip_24k: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="0..255, got 256"):
        watermarker.embed(clip_24k, 24000, [1, 2, 3, 4, 256])


@pytest.mark.parametrize("missing", MODEL_FILES)
def test_missing_file_raises_without_download(
    model_dir: Path, tmp_path: Path, missing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download SilentCipher from the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    for name in MODEL_FILES:
        if name != missing:
            (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / missing))):
        Watermarker.load(tmp_path)


def test_random_checkpoints_have_the_real_sizes(model_dir: Path) -> None:
    for name, real_bytes in REAL_CHECKPOINT_BYTES.items():
        size = (model_dir / name).stat().st_size
        assert abs(size - real_bytes) <= 0.1 * real_bytes, (name, size, real_bytes)


def test_the_light_checkpoint_loads_with_its_own_layer_counts(tmp_path: Path,
                                                                clip_24k: torch.Tensor) -> None:
    """Tests' tiny model folders carry the light model: silentcipher builds it from its
    hparams.yaml like the real one, with the same framing, at a fraction of the weights."""
    write_random_silentcipher(tmp_path, light=True)
    light = Watermarker.load(tmp_path, device="cpu")
    model = light._model
    assert len(model.enc_c.main) == 2 and len(model.dec_c.main) == 2
    assert (tmp_path / "dec_c.ckpt").stat().st_size < 0.5 * REAL_CHECKPOINT_BYTES["dec_c.ckpt"]
    marked = light.embed(clip_24k, 24000, CSM_PUBLIC_KEY)
    assert marked.shape == clip_24k.shape and torch.isfinite(marked).all()
    assert not torch.equal(marked, clip_24k)


def _marked_stream(watermarker: Watermarker, audio: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    stream = watermarker.stream(24_000, (9, 8, 7, 6, 5))
    out = [stream.push(audio[i:i + chunk]) for i in range(0, audio.shape[0], chunk)]
    return out + [stream.close()]


def test_streamed_marking_does_not_depend_on_how_audio_arrives(watermarker: Watermarker) -> None:
    """Marked at fixed points of each message period on one resampling grid: the chunking is
    invisible, which is what keeps the key's symbol sequence whole across a stream."""
    audio = _speechlike(3.2, 24_000, seed=3)
    by_frames = _marked_stream(watermarker, audio, 1920 * 4)  # a scheduler block at a time
    by_odd = _marked_stream(watermarker, audio, 5003)
    a, b = torch.cat(by_frames), torch.cat(by_odd)
    assert a.shape == b.shape == audio.shape
    assert (a - b).abs().max() < 1e-5
    assert not torch.equal(a, audio)


HOP_24K = WatermarkStream.HOP * 24_000 / 44_100


def test_streamed_audio_leaves_with_each_block_not_each_period(watermarker: Watermarker) -> None:
    """The first scheduler block (4 frames) already brings marked audio, and until the first
    period is complete no more than ~10 hops (~0.46 s) plus a block is held back; marking
    whole periods held back up to ~1.3 s there. Later periods leave whole."""
    audio = _speechlike(4.0, 24_000, seed=5)
    block = CHECK_EVERY * SAMPLES_PER_FRAME  # what the scheduler hands out at a time
    stream = watermarker.stream(24_000, (9, 8, 7, 6, 5))
    first = stream.push(audio[:block])
    assert 3.5 * HOP_24K < len(first) <= 4 * HOP_24K  # 4 hops, less the resamplers' delay
    pushed, left, sizes = block, len(first), []
    while pushed < len(audio):
        sizes.append(len(stream.push(audio[pushed:pushed + block])))
        left += sizes[-1]
        pushed += block
        if pushed < 21 * HOP_24K:
            assert pushed - left <= block + 10 * HOP_24K + 1000, (pushed, left)
    assert left + len(stream.close()) == len(audio)
    later = [size for size in sizes if size][2:]  # after the first period's last points
    assert later and all(abs(size - 21 * HOP_24K) < 1000 for size in later), sizes


def test_each_marking_call_starts_a_message_period(watermarker: Watermarker,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A call restarts the key's symbols, so every call marks a period from its start: the
    first period at 6 and 13 hops and whole, the later ones whole, then the partial last one."""
    calls: list[np.ndarray] = []
    encode = watermarker.encode_44k
    monkeypatch.setattr(watermarker, "encode_44k",
                        lambda samples, message: calls.append(samples.copy()) or
                        encode(samples, message))
    _marked_stream(watermarker, _speechlike(2.7, 24_000, seed=6), 1920 * 4)
    hop, period = WatermarkStream.HOP, WatermarkStream.PERIOD
    assert [len(c) for c in calls[:-1]] == [6 * hop, 13 * hop, period, period]
    assert 0 < len(calls[-1]) < period  # 2.7 s is 2.77 periods
    starts = [0, 0, 0, period, 2 * period]
    upsampled = np.concatenate(calls[2:])
    for call, start in zip(calls, starts):
        assert np.array_equal(call, upsampled[start:start + len(call)])


def test_streamed_marking_leaves_no_click_where_calls_join(watermarker: Watermarker) -> None:
    audio = _speechlike(4.0, 24_000, seed=4)
    marked = torch.cat(_marked_stream(watermarker, audio, 7680))
    residual = marked - audio
    step = (residual[1:] - residual[:-1]).abs()
    first = [leaves for _, leaves in WatermarkStream.FIRST_PERIOD]
    at_44k = torch.tensor(first + [p * WatermarkStream.PERIOD for p in range(2, 5)])
    joins = (at_44k[at_44k < 4 * 44_100] * 24_000 / 44_100).long()
    near = torch.cat([step[j - 48:j + 48] for j in joins])
    assert near.max() <= 4 * step.quantile(0.99)
