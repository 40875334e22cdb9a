"""Our engine computes what CSM computes: checked against transformers' CsmForConditionalGeneration.

transformers is an independent implementation of CSM. A tiny random one (odd sizes, GQA in
both transformers, 32 codebooks, audio vocabulary 2051, the full Llama-3 text vocabulary) is
saved with `save_pretrained` and loaded with our `load_model`; both then run in fp32 on the CPU.
transformers only agrees with CSM when (see /work/shared/csm-facts.md):
- rope_scaling is set explicitly on CsmConfig AND on the depth decoder config (its code
  defaults to plain RoPE);
- an explicit attention_mask is passed (its pad id equals the <|AUDIO|> placeholder, so an
  inferred mask would hide every context audio frame);
- fp32;
- its end-of-speech rule differs (codebooks 0..30 all zero, frame kept): these tests check that
  it never fires instead of depending on it.

Relative errors are reported two ways: ||a - b|| / ||b|| (Frobenius) and max|a - b| / max|b|
(max-abs), `a` ours and `b` transformers; both must be under 1e-5.

The Mimi codec inside the transformers model is tiny and never run: its `encode` is replaced by
a function that returns our hand-made random codes, so the prompt goes through transformers' own
merge of <|AUDIO|> / <|audio_eos|> placeholders with the codec's codes.
"""

from __future__ import annotations

import json
import math
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CsmConfig, CsmForConditionalGeneration, MimiConfig
from transformers.models.csm.modeling_csm import CsmRotaryEmbedding
from transformers.utils import logging as hf_logging

import csm.model
from csm.checkpoint import build_empty_model, load_model
from csm.config import CSM_1B, RopeScaling, config_to_hf
from csm.engine import Engine, GenerationRequest
from csm.llama import rope_frequencies
from csm.model import CSM, SamplingState
from csm.presets import PRESETS
from csm.prompt import build_prompt
from csm.testing.tiny import make_tiny

TOL = 1e-5
NUM_CODEBOOKS = 32
AUDIO_VOCAB = 2051
BOS, EOS = 128000, 128001
AUDIO_TOKEN, AUDIO_EOS_TOKEN = 128002, 128003  # transformers' <|AUDIO|> and <|audio_eos|>
GREEDY_FRAMES = 32
ROWS = slice(0, 1)

# The same Llama-3 curve in both parameterisations: transformers' on the backbone, the
# reference's on the depth decoder, so that our config reader converts both.
HF_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 0.125,
           "high_freq_factor": 0.5, "original_max_position_embeddings": 1024}
REF_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# The backbone's tied copy of the audio embeddings, which save_pretrained drops (see below).
HF_BACKBONE_AUDIO = "backbone_model.embed_tokens.embed_audio_tokens.weight"
HF_DECODER_AUDIO = "depth_decoder.model.embed_tokens.weight"

RESULTS: dict[str, tuple[float, float]] = {}


hf_logging.set_verbosity_error()


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    """Print the measured relative errors (pytest -s shows them)."""
    yield
    if RESULTS:
        print("\nrelative errors (ours vs transformers): name: frobenius, max-abs")
        for name, (fro, mx) in RESULTS.items():
            print(f"  {name}: {fro:.2e}, {mx:.2e}")


def rel_errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.double(), b.double()
    fro = ((a - b).norm() / b.norm()).item()
    mx = ((a - b).abs().max() / b.abs().max()).item()
    return fro, mx


def assert_close(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all(), name
    fro, mx = rel_errors(ours, theirs)
    RESULTS[name] = (fro, mx)
    assert fro < TOL and mx < TOL, f"{name}: relative error frobenius {fro:.3e}, max-abs {mx:.3e}"


# --------------------------------------------------------------------------------------------
# The transformers model and our copy of it


def tiny_mimi_config() -> MimiConfig:
    """A Mimi small enough to build and save in milliseconds (it is never run here)."""
    return MimiConfig(hidden_size=16, num_filters=4, num_hidden_layers=1, intermediate_size=32,
                      num_attention_heads=2, num_key_value_heads=2, codebook_dim=8,
                      vector_quantization_hidden_dimension=8, upsample_groups=16,
                      num_quantizers=NUM_CODEBOOKS, codebook_size=2048)


def tiny_csm_config() -> CsmConfig:
    depth = dict(num_codebooks=NUM_CODEBOOKS, backbone_hidden_size=108, vocab_size=AUDIO_VOCAB,
                 hidden_size=72, intermediate_size=92, num_hidden_layers=2,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=33,
                 rope_theta=500_000, rope_scaling=dict(REF_ROPE))
    return CsmConfig(num_codebooks=NUM_CODEBOOKS, vocab_size=AUDIO_VOCAB, text_vocab_size=128_256,
                     hidden_size=108, intermediate_size=148, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=2048,
                     rope_theta=500_000, rope_scaling=dict(HF_ROPE),
                     depth_decoder_config=depth, codec_config=tiny_mimi_config().to_dict())


def randomise_(model: CsmForConditionalGeneration, seed: int) -> None:
    """transformers' init (std 0.02) gives near-zero logits with near-ties; use O(1) activations
    so that greedy choices are well separated. Tied parameters stay tied (filled in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("codec_model."):
                continue
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                head = name == "depth_decoder.codebooks_head.weight"  # [31, in, out]
                fan_in = p.shape[1] if head else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


@dataclass
class Pair:
    hf: CsmForConditionalGeneration
    ours: CSM
    folder: Path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    torch.manual_seed(0)
    hf = CsmForConditionalGeneration(tiny_csm_config()).eval()
    randomise_(hf, seed=1)
    assert hf.backbone_model.embed_tokens.embed_audio_tokens.weight is \
        hf.depth_decoder.model.embed_tokens.weight
    folder = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(folder)  # safetensors, a single model.safetensors at this size
    ours = load_model(folder, "cpu", torch.float32)
    ours.setup_caches(1)
    # The codec is not under test: hand transformers our codes instead of running Mimi.
    hf.codec_model.encode = types.MethodType(_fake_encode, hf.codec_model)
    return Pair(hf, ours, folder)


# --------------------------------------------------------------------------------------------
# The prompt, in both layouts

SAMPLES_PER_FRAME = 1920


@dataclass
class Prompt:
    tokens: torch.Tensor  # ours: [S, 33]
    mask: torch.Tensor  # ours: [S, 33]
    input_ids: torch.Tensor  # transformers: [1, S] with placeholders
    input_values: torch.Tensor  # [1, 1, samples]: segment k is filled with the value k + 1
    input_values_cutoffs: torch.Tensor  # [1, segments]
    attention_mask: torch.Tensor  # [1, S]


_SEGMENT_CODES: list[torch.Tensor] = []  # codes [32, T] of context segment k, for _fake_encode


def _fake_encode(self, audio: torch.Tensor, *args, **kwargs):
    """Stands in for MimiModel.encode: `audio` [1, 1, T * 1920] -> the segment's codes."""
    k = int(audio[0, 0, 0].item()) - 1
    codes = _SEGMENT_CODES[k]
    assert audio.shape[-1] == codes.shape[1] * SAMPLES_PER_FRAME
    return types.SimpleNamespace(audio_codes=codes[None])


def make_prompt(seed: int, frames: tuple[int, int] = (7, 5)) -> Prompt:
    """Two context turns (text + random codes) and a turn to generate (text only)."""
    gen = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        return [BOS, *torch.randint(0, 128_000, (n,), generator=gen).tolist(), EOS]

    context = [(text(4), torch.randint(0, AUDIO_VOCAB, (NUM_CODEBOOKS, frames[0]), generator=gen)),
               (text(3), torch.randint(0, AUDIO_VOCAB, (NUM_CODEBOOKS, frames[1]), generator=gen))]
    target = text(5)
    tokens, mask = build_prompt(context, target)

    _SEGMENT_CODES[:] = [codes for _, codes in context]
    ids: list[int] = []
    values = []
    for k, (t, codes) in enumerate(context):
        ids += t + [AUDIO_TOKEN] * codes.shape[1] + [AUDIO_EOS_TOKEN]
        values.append(torch.full((codes.shape[1] * SAMPLES_PER_FRAME,), float(k + 1)))
    ids += target
    cutoffs = torch.tensor([[v.numel() for v in values]]).cumsum(-1)
    input_ids = torch.tensor([ids])
    assert input_ids.shape[1] == tokens.shape[0]
    return Prompt(tokens, mask, input_ids, torch.cat(values)[None, None], cutoffs,
                  torch.ones_like(input_ids))


def hf_inputs(p: Prompt) -> dict:
    return dict(input_ids=p.input_ids, input_values=p.input_values,
                input_values_cutoffs=p.input_values_cutoffs, attention_mask=p.attention_mask)


# --------------------------------------------------------------------------------------------
# Our generation loop at model level


def sampling_state(temperature: float, topk: int, seed: int) -> SamplingState:
    return SamplingState(temperature=torch.tensor([temperature], dtype=torch.float32),
                         topk=torch.tensor([topk]), seed=torch.tensor([seed]),
                         frame_index=torch.zeros(1, dtype=torch.long))


@torch.inference_mode()
def our_frames(model: CSM, tokens: torch.Tensor, mask: torch.Tensor, frames: int,
               temperature: float = 1.0, topk: int = 1, seed: int = 0) -> torch.Tensor:
    """prefill + `frames` frame steps -> codes [frames, 32]. topk=1 is greedy argmax."""
    model.setup_caches(1)
    n = tokens.shape[0]
    h = model.prefill(tokens[None], mask[None], torch.arange(n)[None], ROWS)
    sampling = sampling_state(temperature, topk, seed)
    position = torch.tensor([n])
    out = []
    for _ in range(frames):
        codes, h = model.frame_step(h, position, sampling, ROWS)
        out.append(codes[0].clone())
        position += 1
        sampling.frame_index += 1
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# Tests


def test_config_and_rope_match(pair):
    """The config.json transformers wrote reads back as our shapes, with CSM's RoPE scaling
    (from either parameterisation), and both RoPE frequency tables agree."""
    cfg = pair.ours.cfg
    saved = json.loads((pair.folder / "config.json").read_text())
    assert saved["rope_scaling"]["original_max_position_embeddings"] == 1024
    assert saved["depth_decoder_config"]["rope_scaling"]["original_max_position_embeddings"] == 8192
    assert (cfg.backbone.num_layers, cfg.backbone.dim, cfg.backbone.num_heads,
            cfg.backbone.num_kv_heads, cfg.backbone.intermediate_size,
            cfg.backbone.max_seq_len) == (3, 108, 6, 3, 148, 2048)
    assert (cfg.decoder.num_layers, cfg.decoder.dim, cfg.decoder.num_heads,
            cfg.decoder.num_kv_heads, cfg.decoder.intermediate_size,
            cfg.decoder.max_seq_len) == (2, 72, 6, 2, 92, 33)
    assert (cfg.text_vocab_size, cfg.audio_vocab_size, cfg.num_codebooks) == (128_256, 2051, 32)
    assert cfg.backbone.rope_scaling == RopeScaling() == cfg.decoder.rope_scaling
    assert_close("rope inv_freq backbone", rope_frequencies(cfg.backbone),
                 pair.hf.backbone_model.rotary_emb.inv_freq)
    assert_close("rope inv_freq decoder", rope_frequencies(cfg.decoder),
                 pair.hf.depth_decoder.model.rotary_emb.inv_freq)


def test_codec_weights_are_ignored(pair):
    with safe_open(str(pair.folder / "model.safetensors"), framework="pt") as f:
        assert any(k.startswith("codec_model.") for k in f.keys())
    assert not any("codec" in k for k in pair.ours.state_dict())


# Short, and long enough (about 430 positions) that Llama-3 RoPE scaling matters more: with
# plain RoPE in our backbone, the logits move by 2.4e-3 (max-abs 1.5e-2) on the long prompt
# and 1.0e-3 (1.8e-3) on the short one; both far above TOL. (Greedy codes of this tiny random
# model did not change with plain RoPE: the logit checks are the sensitive ones.)
PROMPTS = {"short": (7, 5), "long": (250, 160)}


@pytest.mark.parametrize("length", PROMPTS)
@torch.inference_mode()
def test_backbone_logits_match(pair, length):
    """codebook0_head logits at every prompt position (text positions, context audio frames,
    end-of-audio frames), and of the last hidden as `prefill` returns it."""
    p = make_prompt(seed=2, frames=PROMPTS[length])
    n = p.tokens.shape[0]
    ours = pair.ours
    ours.setup_caches(1)
    hidden = ours.backbone(ours.embed(p.tokens[None], p.mask[None]), torch.arange(n)[None], ROWS)
    theirs = pair.hf(**hf_inputs(p), logits_to_keep=0).logits[0]
    assert theirs.shape == (n, AUDIO_VOCAB)
    assert_close(f"backbone logits, all {n} positions", ours.codebook0_head(hidden)[0], theirs)

    ours.setup_caches(1)
    last = ours.prefill(p.tokens[None], p.mask[None], torch.arange(n)[None], ROWS)
    assert_close(f"backbone logits, last of {n} positions (prefill)", ours.codebook0_head(last)[0],
                 theirs[-1])


@torch.inference_mode()
def test_depth_decoder_logits_match(pair, monkeypatch):
    """Teacher-forced: our real decode_codes path (its sampler replaced by a recorder that
    returns fixed codes) against transformers' depth decoder fed the same codes."""
    p = make_prompt(seed=3)
    n = p.tokens.shape[0]
    ours = pair.ours
    ours.setup_caches(1)
    h = ours.prefill(p.tokens[None], p.mask[None], torch.arange(n)[None], ROWS)
    forced = torch.randint(0, AUDIO_VOCAB, (NUM_CODEBOOKS,),
                           generator=torch.Generator().manual_seed(4))
    recorded: list[torch.Tensor] = []

    def record(logits, temperature, kth, gumbel):
        recorded.append(logits.clone())
        return forced[len(recorded) - 1].view(1)

    monkeypatch.setattr(csm.model, "sample_topk", record)
    codes = ours.decode_codes(h, sampling_state(1.0, 1, 0), ROWS)
    assert torch.equal(codes[0], forced) and len(recorded) == NUM_CODEBOOKS

    hf = pair.hf
    dd_ids = torch.cat([torch.zeros(1, dtype=torch.long), forced[:-1]])[None]  # [0, c0..c30]
    theirs = hf.depth_decoder(input_ids=dd_ids, backbone_last_hidden_state=h.clone()).logits[0]
    assert theirs.shape == (NUM_CODEBOOKS - 1, AUDIO_VOCAB)
    assert_close("codebook 0 logits", recorded[0][0], hf.lm_head(h)[0])
    mine = torch.stack([r[0] for r in recorded[1:]])
    assert_close("depth decoder logits, codebooks 1..31", mine, theirs)
    per_codebook = [rel_errors(mine[i], theirs[i]) for i in range(NUM_CODEBOOKS - 1)]
    RESULTS["depth decoder, worst single codebook"] = (max(e[0] for e in per_codebook),
                                                       max(e[1] for e in per_codebook))
    for i, (fro, mx) in enumerate(per_codebook):
        assert fro < TOL and mx < TOL, f"codebook {i + 1}: {fro:.3e} {mx:.3e}"


@pytest.mark.parametrize("length", PROMPTS)
@torch.inference_mode()
def test_greedy_codes_identical(pair, length):
    """Greedy (our topk=1; transformers do_sample=False for both stages) with context audio in
    the prompt: identical codes for every frame, and transformers' stop rule never fired."""
    p = make_prompt(seed=2, frames=PROMPTS[length])
    ours = our_frames(pair.ours, p.tokens, p.mask, GREEDY_FRAMES)
    theirs = pair.hf.generate(**hf_inputs(p), do_sample=False, depth_decoder_do_sample=False,
                              max_new_tokens=GREEDY_FRAMES)
    # transformers stops after a frame whose codebooks 0..30 are all zero; it must not have.
    assert not (ours[:, :31] == 0).all(dim=1).any()
    assert theirs.shape == (1, GREEDY_FRAMES, NUM_CODEBOOKS)
    same = (ours == theirs[0]).all(dim=1)
    first_diff = int((~same).nonzero()[0]) if not same.all() else None
    assert first_diff is None, f"codes differ from frame {first_diff}"
    assert len(set(map(tuple, ours.tolist()))) > GREEDY_FRAMES // 2  # not a constant stream


@torch.inference_mode()
def test_original_and_transformers_copies_generate_identically(pair, tmp_path):
    """The same weights written in the original format (our key names, model.safetensors)
    load to the same parameters and generate the same codes, greedy and sampled."""
    state = {k: v.contiguous() for k, v in pair.ours.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(pair.ours.cfg)))
    original = load_model(tmp_path, "cpu", torch.float32)
    assert original.cfg == pair.ours.cfg
    for k, v in original.state_dict().items():
        assert torch.equal(v, state[k]), k
    p = make_prompt(seed=5)
    for kwargs in (dict(), dict(temperature=0.9, topk=50, seed=11)):
        a = our_frames(original, p.tokens, p.mask, 30, **kwargs)
        b = our_frames(pair.ours, p.tokens, p.mask, 30, **kwargs)
        assert torch.equal(a, b), kwargs


@torch.inference_mode()
def test_make_tiny_formats_generate_identically(tmp_path):
    """`make_tiny` in both formats with one seed: Engine.generate gives identical codes and
    audio, sampled (temperature 0.9, top-k 50), with a context turn from the prompt wavs."""
    results = []
    for fmt in ("original", "transformers"):
        folder = make_tiny(tmp_path / fmt, fmt=fmt, seed=3)
        engine = Engine.load(folder, device="cpu")
        assert engine.model.codebook0_head.weight.dtype == torch.float32
        preset = PRESETS["conversational_a"]
        audio, rate = sf.read(folder / preset.wav, dtype="float32")
        segment = engine.segment(preset.speaker, preset.transcript[:40],
                                 torch.from_numpy(audio[: rate]), rate)
        request = GenerationRequest(text="Hello there, how are you?", speaker=0,
                                    context=(segment,), max_audio_length_ms=2400,
                                    temperature=0.9, topk=50, seed=1234)
        results.append((engine.model.state_dict(), engine.generate(request)))
    (state_a, a), (state_b, b) = results
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    assert a.frames > 0 and a.prompt_positions == b.prompt_positions
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.audio, b.audio)
    assert a.stop_reason == b.stop_reason


def _fill_random_(model: CSM, seed: int) -> None:
    """Random values in place (no second copy), scaled for O(1) activations as random_model.

    Drawing 1.55e9 numbers one by one takes 12+ s on this CPU; instead each parameter gets
    its own fresh block of PERIOD random numbers, tiled. PERIOD is no multiple of any row
    length, so rows are shifted copies, never equal ones.
    """
    period = 1_048_573  # 2**20 - 3, a prime
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.copy_(1 + 0.1 * (torch.rand(p.shape, generator=gen) - 0.5))
                continue
            fan_in = 1 if "embeddings" in name else (
                p.shape[1] if name == "audio_head" else p.shape[-1])
            bound = math.sqrt(3.0 / fan_in)  # unit variance in, unit variance out
            flat = p.view(-1)
            block = (torch.rand(min(period, flat.numel()), generator=gen) * 2 - 1) * bound
            for start in range(0, flat.numel(), period):
                end = min(start + period, flat.numel())
                flat[start:end].copy_(block[: end - start])


@torch.inference_mode()
def test_real_csm_1b_shapes_run_one_frame():
    """A random-weight model at csm-1b's real shapes (fp32, about 6.2 GB) builds without a
    checkpoint, prefills a short prompt with context audio and runs one sampled frame."""
    start = time.perf_counter()
    cfg = CSM_1B
    # The RoPE tables agree with transformers' at the real head sizes (64 and 128).
    hf_cfg = CsmConfig(**{**config_to_hf(cfg), "rope_scaling": dict(HF_ROPE)})
    assert_close("rope inv_freq, csm-1b backbone", rope_frequencies(cfg.backbone),
                 CsmRotaryEmbedding(hf_cfg).inv_freq)
    dd_cfg = hf_cfg.depth_decoder_config
    dd_cfg.rope_scaling = dict(REF_ROPE)
    assert_close("rope inv_freq, csm-1b decoder", rope_frequencies(cfg.decoder),
                 CsmRotaryEmbedding(dd_cfg).inv_freq)

    model = build_empty_model(cfg, torch.device("cpu"), torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    # The hub's original model.safetensors is 6,211,186,784 bytes: fp32 weights plus a header.
    header = 6_211_186_784 - 4 * n_params
    assert 0 < header < 100_000, n_params
    _fill_random_(model, seed=0)
    model.setup_caches(1)

    gen = torch.Generator().manual_seed(0)
    text = [BOS, *torch.randint(0, 128_000, (6,), generator=gen).tolist(), EOS]
    codes = torch.randint(0, 2048, (NUM_CODEBOOKS, 3), generator=gen)
    tokens, mask = build_prompt([(text, codes)], [BOS, 300, 400, EOS])
    n = tokens.shape[0]
    h = model.prefill(tokens[None], mask[None], torch.arange(n)[None], ROWS)
    assert h.shape == (1, cfg.backbone.dim) and torch.isfinite(h).all()
    out, h_next = model.frame_step(h, torch.tensor([n]), sampling_state(0.9, 50, 7), ROWS)
    assert out.shape == (1, NUM_CODEBOOKS) and out.dtype == torch.int64
    assert ((out >= 0) & (out < cfg.audio_vocab_size)).all()
    assert h_next.shape == (1, cfg.backbone.dim) and torch.isfinite(h_next).all()
    logits = model.codebook0_head(h_next)
    assert torch.isfinite(logits).all() and logits.std() > 0.1  # not collapsed to a constant
    print(f"\ncsm-1b shapes: {n_params:,} parameters, one frame in "
          f"{time.perf_counter() - start:.1f} s total")
