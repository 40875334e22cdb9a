"""Mimi through moshi, the text tokenizer, and the make-tiny command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from csm.codec import SAMPLES_PER_FRAME, MimiCodec
from csm.testing.tiny import write_random_mimi
from csm.text_tokenizer import BEGIN_OF_TEXT, END_OF_TEXT, TextTokenizer


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_mimi_round_trip_shapes(tiny_model_dir, tmp_path, size):
    if size == "tiny":
        codec = MimiCodec.load(tiny_model_dir / "mimi")
    else:  # Mimi's real architecture with random weights (about 80M parameters)
        write_random_mimi(tmp_path, seed=0, config=None)
        assert not (tmp_path / "config.json").exists()
        codec = MimiCodec.load(tmp_path)
    audio = 0.1 * torch.randn(int(2.5 * 24_000))
    codes = codec.encode(audio)
    frames = -(-audio.shape[0] // SAMPLES_PER_FRAME)  # a partial last frame is kept
    assert codes.shape == (32, frames) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 2048
    decoded = codec.decode(codes)
    assert decoded.shape == (frames * SAMPLES_PER_FRAME,) and torch.isfinite(decoded).all()


def test_codes_mimi_cannot_decode_become_zero(tiny_model_dir):
    codec = MimiCodec.load(tiny_model_dir / "mimi")
    codes = torch.full((32, 3), 2050)
    assert int(codec.valid_codes(codes).max()) == 0
    assert codec.decode(codes).shape == (3 * SAMPLES_PER_FRAME,)


def test_missing_mimi_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer-e351c8d8"):
        MimiCodec.load(tmp_path)


def test_text_turn_has_speaker_prefix_and_llama3_specials(tiny_model_dir):
    tok = TextTokenizer(tiny_model_dir / "tokenizer.json")
    ids = tok.encode_turn(1, "Hello there.")
    assert ids[0] == BEGIN_OF_TEXT and ids[-1] == END_OF_TEXT
    assert BEGIN_OF_TEXT not in ids[1:-1] and END_OF_TEXT not in ids[1:-1]
    inner = tok._tok.decode(ids[1:-1])
    assert inner == "[1]Hello there."


def test_a_tokenizer_without_llama3_ids_is_refused(tiny_model_dir, tmp_path):
    spec = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    spec["added_tokens"] = spec["added_tokens"][2:]  # no <|begin_of_text|>
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="begin_of_text.*128000"):
        TextTokenizer(tmp_path / "tokenizer.json")


def test_make_tiny_command_writes_the_image_layout(tmp_path):
    out = tmp_path / "tiny"
    proc = subprocess.run([sys.executable, "-m", "csm.testing", "make-tiny", str(out),
                           "--format", "transformers"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "noise, not speech" in proc.stdout
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "tokenizer.json", "transformers.safetensors.index.json",
            "transformers-00001-of-00002.safetensors", "transformers-00002-of-00002.safetensors",
            "prompts/conversational_a.wav", "prompts/conversational_b.wav",
            "mimi/tokenizer-e351c8d8-checkpoint125.safetensors", "mimi/config.json",
            "silentcipher/enc_c.ckpt", "silentcipher/dec_c.ckpt", "silentcipher/dec_m_0.ckpt",
            "silentcipher/hparams.yaml", "RANDOM_WEIGHTS.txt"} <= names
    assert "model.safetensors" not in names
