"""Checkpoint loading (csm/checkpoint.py) and the 33-column prompt layout (csm/prompt.py).

One tiny random model (csm.config.TINY, original key names) is written in every layout the
loader accepts; each must load to exactly the same parameters. The transformers layouts are
written two independent ways: csm.testing.tiny's hub-style shards, and transformers' own
`save_pretrained`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CsmConfig, CsmForConditionalGeneration, MimiConfig
from transformers.utils import logging as hf_logging

from csm.checkpoint import CheckpointError, load_model
from csm.config import TINY, CSMConfig, config_to_hf
from csm.model import CSM
from csm.prompt import audio_positions, build_prompt, text_positions
from csm.testing.tiny import make_tiny, random_model, to_transformers_format, write_weights

ROWS = slice(0, 1)
HF_BACKBONE_AUDIO = "backbone_model.embed_tokens.embed_audio_tokens.weight"
HF_DECODER_AUDIO = "depth_decoder.model.embed_tokens.weight"


hf_logging.set_verbosity_error()


@pytest.fixture(scope="module")
def reference() -> CSM:
    return random_model(TINY, seed=5).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def ref_state(reference) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in reference.state_dict().items()}


def same_shapes(a: CSMConfig, b: CSMConfig) -> bool:
    """Equal configs up to head_dim=None vs its value (config.json always spells it out)."""
    def norm(c: CSMConfig) -> CSMConfig:
        return replace(c, backbone=replace(c.backbone, head_dim=c.backbone.head_size),
                       decoder=replace(c.decoder, head_dim=c.decoder.head_size))
    return norm(a) == norm(b)


def write_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_hf(TINY)))
    return folder


def transformers_model(ref_state) -> CsmForConditionalGeneration:
    """A real CsmForConditionalGeneration (config from our config_to_hf) holding our weights."""
    codec = MimiConfig(hidden_size=16, num_filters=4, num_hidden_layers=1, intermediate_size=32,
                       num_attention_heads=2, num_key_value_heads=2, codebook_dim=8,
                       vector_quantization_hidden_dimension=8, upsample_groups=16,
                       num_quantizers=32, codebook_size=2048)
    hf = CsmForConditionalGeneration(CsmConfig(**config_to_hf(TINY),
                                               codec_config=codec.to_dict())).eval()
    result = hf.load_state_dict(to_transformers_format(ref_state, TINY), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("codec_model.") for k in result.missing_keys)
    return hf


LAYOUTS = ("original_safetensors", "ckpt_pt", "ckpt_pt_wrapped", "hub_transformers_shards",
           "save_pretrained")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, reference, ref_state) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    out["original_safetensors"] = d = write_config(root / "original_safetensors")
    save_file(ref_state, str(d / "model.safetensors"))
    out["ckpt_pt"] = d = write_config(root / "ckpt_pt")
    torch.save(ref_state, d / "ckpt.pt")
    out["ckpt_pt_wrapped"] = d = write_config(root / "ckpt_pt_wrapped")
    torch.save({"model": ref_state}, d / "ckpt.pt")
    out["hub_transformers_shards"] = d = write_config(root / "hub_transformers_shards")
    write_weights(reference, d, "transformers")
    out["save_pretrained"] = d = root / "save_pretrained"
    transformers_model(ref_state).save_pretrained(d)  # writes its own config.json
    return out


def test_layout_files(layouts):
    """Each folder holds exactly the files of its layout (so autodetection is what's tested)."""
    names = {k: sorted(p.name for p in v.iterdir()) for k, v in layouts.items()}
    assert names["original_safetensors"] == ["config.json", "model.safetensors"]
    assert names["ckpt_pt"] == ["ckpt.pt", "config.json"]
    assert names["hub_transformers_shards"] == [
        "config.json", "transformers-00001-of-00002.safetensors",
        "transformers-00002-of-00002.safetensors", "transformers.safetensors.index.json"]
    assert names["save_pretrained"] == ["config.json", "generation_config.json",
                                        "model.safetensors"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_identical_parameters(layouts, ref_state, layout):
    model = load_model(layouts[layout], "cpu", torch.float32)
    assert same_shapes(model.cfg, TINY)
    state = model.state_dict()
    assert set(state) == set(ref_state)
    for k, v in state.items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, ref_state[k]), f"{layout}: {k} differs"


@pytest.mark.parametrize("shard", [None, "300KB"])
def test_save_pretrained_output_loads_unmodified(tmp_path, ref_state, shard):
    """save_pretrained keeps only the depth decoder's copy of the tied audio embeddings."""
    kwargs = {} if shard is None else {"max_shard_size": shard}
    transformers_model(ref_state).save_pretrained(tmp_path, **kwargs)
    if shard is not None:
        assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(tmp_path, "cpu", torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


@torch.inference_mode()
def backbone_logits(model: CSM, seed: int = 0) -> torch.Tensor:
    """codebook0_head logits at every position of a prompt with text and context audio."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2051, (32, 6), generator=gen)
    tokens, mask = build_prompt([([128000, 50, 60, 128001], codes)], [128000, 70, 128001])
    model.setup_caches(1)
    n = tokens.shape[0]
    h = model.backbone(model.embed(tokens[None], mask[None]), torch.arange(n)[None], ROWS)
    return model.codebook0_head(h)[0]


def test_qk_permutation_matters(tmp_path, reference, ref_state):
    """A transformers-format file whose q_proj rows were NOT permuted into rotate-half order
    (names mapped, rows left interleaved) loads without complaint but computes other logits:
    the permutation is what makes the transformers layouts above load correctly."""
    hf = to_transformers_format(ref_state, TINY)
    for i in range(TINY.backbone.num_layers):
        hf[f"backbone_model.layers.{i}.self_attn.q_proj.weight"] = \
            ref_state[f"backbone.layers.{i}.attn.q_proj.weight"].clone()
    write_config(tmp_path)
    save_file(hf, str(tmp_path / "model.safetensors"))
    wrong = load_model(tmp_path, "cpu", torch.float32)
    assert not torch.equal(wrong.backbone.layers[0].attn.q_proj.weight,
                           ref_state["backbone.layers.0.attn.q_proj.weight"])
    expected = backbone_logits(reference)
    got = backbone_logits(wrong)
    rel = ((got - expected).norm() / expected.norm()).item()
    print(f"\nunpermuted q_proj: backbone logits off by {rel:.1%} (frobenius, relative)")
    assert rel > 0.05, f"unpermuted q_proj changed the logits by only {rel:.2e}"
    # Control: the same file with the permutation applied gives the reference's logits.
    write_weights(reference, write_config(tmp_path / "right"), "transformers")
    assert torch.equal(backbone_logits(load_model(tmp_path / "right")), expected)


# --- errors name the file and the key ---------------------------------------------------------


def test_missing_weights_file(tmp_path):
    write_config(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg
    for name in ("model.safetensors", "ckpt.pt", "transformers.safetensors.index.json"):
        assert name in msg


def test_missing_shard(tmp_path, reference):
    write_config(tmp_path)
    write_weights(reference, tmp_path, "transformers")
    (tmp_path / "transformers-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_model(tmp_path)
    assert "transformers-00002-of-00002.safetensors" in str(e.value)
    assert "transformers.safetensors.index.json" in str(e.value)


def _write(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    write_config(folder)
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("fmt", ["original", "transformers"])
def test_wrong_shape_names_file_and_key(tmp_path, ref_state, fmt):
    if fmt == "original":
        state, key = dict(ref_state), "backbone.layers.1.attn.k_proj.weight"
    else:
        state, key = to_transformers_format(ref_state, TINY), \
            "backbone_model.layers.1.self_attn.k_proj.weight"
    state[key] = state[key][:-2].clone()
    path = _write(tmp_path, state)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert str(path) in msg and key in msg and "shape" in msg


@pytest.mark.parametrize("fmt", ["original", "transformers"])
def test_unknown_key_names_file_and_key(tmp_path, ref_state, fmt):
    if fmt == "original":
        state, key = dict(ref_state), "backbone.layers.0.attn.q_norm.scale"
    else:
        state, key = to_transformers_format(ref_state, TINY), \
            "backbone_model.layers.0.self_attn.q_norm.weight"
    state[key] = torch.ones(4)
    path = _write(tmp_path, state)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert str(path) in msg and key in msg and "unknown" in msg


def test_missing_key_names_file_and_key(tmp_path, ref_state):
    state = {k: v for k, v in ref_state.items() if k != "codebook0_head.weight"}
    path = _write(tmp_path, state)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "codebook0_head.weight" in msg and "missing" in msg


def test_untied_decoder_copy_is_refused(tmp_path, ref_state):
    state = to_transformers_format(ref_state, TINY)
    state[HF_DECODER_AUDIO] = state[HF_DECODER_AUDIO] + 1
    path = _write(tmp_path, state)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    assert str(path) in str(e.value) and HF_DECODER_AUDIO in str(e.value)


def test_make_tiny_writes_its_weights_in_the_dtype_asked(tmp_path):
    """The GPU suite's csm-1b folder is bf16 on disk, as the image bakes it; an fp32 engine
    then computes on exactly those bf16 values."""
    folder = make_tiny(tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = load_model(folder, "cpu", torch.float32)
    for k, v in random_model(TINY, 0).state_dict().items():
        assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16).float()), k


@pytest.mark.parametrize("layout", ["original_safetensors", "hub_transformers_shards"])
def test_bf16_loading(layouts, ref_state, layout):
    model = load_model(layouts[layout], "cpu", torch.bfloat16)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.bfloat16, k
        assert torch.equal(v, ref_state[k].to(torch.bfloat16)), k
    # Derived tables stay in fp32 whatever the weights' dtype (llama.rope_table).
    assert model.backbone.rope.dtype == torch.float32  # (cos, sin) pairs
    assert model.decoder.rope.dtype == torch.float32


# --- the prompt -----------------------------------------------------------------------------

BOS, EOS = 128000, 128001


def _text_row(token: int) -> tuple[list[int], list[bool]]:
    """A text position: only column 32 (the text column) is present."""
    return [0] * 32 + [token], [False] * 32 + [True]


def _audio_row(frame: list[int]) -> tuple[list[int], list[bool]]:
    """An audio position: columns 0..31 (the codebooks) present, the text column absent."""
    assert len(frame) == 32
    return list(frame) + [0], [True] * 32 + [False]


def test_prompt_layout_position_by_position():
    # Context turn: 2 text tokens and 3 frames of codes; code of codebook k in frame t is
    # 100 * t + k + 1 (so no frame is all zero and every value says where it belongs).
    codes = torch.tensor([[100 * t + k + 1 for t in range(3)] for k in range(32)])
    assert codes.shape == (32, 3)
    frame = [[100 * t + k + 1 for k in range(32)] for t in range(3)]
    tokens, mask = build_prompt([([BOS, 791, 1917, EOS], codes)], [BOS, 9906, EOS])

    expected = [
        _text_row(BOS),  # 0  context turn: text segment
        _text_row(791),  # 1
        _text_row(1917),  # 2
        _text_row(EOS),  # 3
        _audio_row(frame[0]),  # 4  context turn: audio segment, one position per frame
        _audio_row(frame[1]),  # 5
        _audio_row(frame[2]),  # 6
        _audio_row([0] * 32),  # 7  end of audio: all-zero frame, codebook columns present
        _text_row(BOS),  # 8  the turn to generate: text only
        _text_row(9906),  # 9
        _text_row(EOS),  # 10
    ]
    want_tokens = torch.tensor([row for row, _ in expected], dtype=torch.long)
    want_mask = torch.tensor([m for _, m in expected], dtype=torch.bool)
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    assert tokens.shape == mask.shape == (11, 33)
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(mask, want_mask)

    # The pieces on their own.
    t_tokens, t_mask = text_positions([BOS, 791, 1917, EOS])
    assert torch.equal(t_tokens, want_tokens[:4]) and torch.equal(t_mask, want_mask[:4])
    a_tokens, a_mask = audio_positions(codes)
    assert torch.equal(a_tokens, want_tokens[4:8]) and torch.equal(a_mask, want_mask[4:8])
    # No context: the text segment alone.
    g_tokens, g_mask = build_prompt([], [BOS, 9906, EOS])
    assert torch.equal(g_tokens, want_tokens[8:]) and torch.equal(g_mask, want_mask[8:])
