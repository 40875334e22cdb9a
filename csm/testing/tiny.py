"""A tiny model folder with RANDOM weights, laid out exactly like the one the image bakes.

Everything downstream (worker tests, benchmarks, CI) runs the real loading and generation
code against it. What it "says" is noise from random weights, never speech.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file

from ..codec import CONFIG_FILE, WEIGHTS_FILE, default_config
from ..config import TINY, CSMConfig, config_to_hf
from ..model import CSM
from ..presets import PRESETS
from .silentcipher_weights import write_random_silentcipher
from .text_tokenizer import write_tiny_tokenizer

FORMATS = ("original", "transformers")
NOTICE = ("This folder holds RANDOM weights made by `python -m csm.testing make-tiny`.\n"
          "It exercises the real code paths; its audio is noise, not speech.\n")


def random_model(cfg: CSMConfig = TINY, seed: int = 0) -> CSM:
    """Random weights scaled so activations stay O(1) through the layers."""
    gen = torch.Generator().manual_seed(seed)
    model = CSM(cfg)
    for name, p in model.named_parameters():
        if name.endswith(".scale"):
            p.data = 1 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            fan_in = p.shape[-1] if name != "audio_head" else p.shape[1]
            std = 1.0 if "embeddings" in name else 1 / math.sqrt(fan_in)
            p.data = std * torch.randn(p.shape, generator=gen)
    return model


def _permute_qk(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The reference's interleaved-pair q/k rows -> transformers' rotate-half order."""
    dim = w.shape[-1]
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def to_transformers_format(state: dict[str, torch.Tensor],
                           cfg: CSMConfig) -> dict[str, torch.Tensor]:
    """Original (torchtune) names -> what `CsmForConditionalGeneration.save_pretrained` writes.

    Written independently of checkpoint.py's reverse mapping so that a round trip tests both.
    """
    layer_names = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
                   "attn.v_proj": "self_attn.v_proj", "attn.output_proj": "self_attn.o_proj",
                   "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.down_proj", "mlp.w3": "mlp.up_proj",
                   "sa_norm.scale": "input_layernorm.weight",
                   "mlp_norm.scale": "post_attention_layernorm.weight"}
    out: dict[str, torch.Tensor] = {}
    for part, prefix, lc in (("backbone", "backbone_model", cfg.backbone),
                             ("decoder", "depth_decoder.model", cfg.decoder)):
        for i in range(lc.num_layers):
            for ours, theirs in layer_names.items():
                key = f"{part}.layers.{i}.{ours}"
                w = state[key if ours.endswith(".scale") else f"{key}.weight"]
                if ours == "attn.q_proj":
                    w = _permute_qk(w, lc.num_heads, lc.head_size)
                elif ours == "attn.k_proj":
                    w = _permute_qk(w, lc.num_kv_heads, lc.head_size)
                suffix = "" if theirs.endswith(".weight") else ".weight"
                out[f"{prefix}.layers.{i}.{theirs}{suffix}"] = w
        out[f"{prefix}.norm.weight"] = state[f"{part}.norm.scale"]
    out["embed_text_tokens.weight"] = state["text_embeddings.weight"]
    out["backbone_model.embed_tokens.embed_audio_tokens.weight"] = state["audio_embeddings.weight"]
    out["depth_decoder.model.embed_tokens.weight"] = state["audio_embeddings.weight"]
    out["lm_head.weight"] = state["codebook0_head.weight"]
    out["depth_decoder.codebooks_head.weight"] = state["audio_head"]
    out["depth_decoder.model.inputs_embeds_projector.weight"] = state["projection.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def write_weights(model: CSM, folder: Path, fmt: str, dtype: torch.dtype = torch.float32) -> None:
    """`model.safetensors` (original) or two hub-style transformers shards with their index."""
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if fmt == "original":
        save_file(state, str(folder / "model.safetensors"))
        return
    hf = to_transformers_format(state, model.cfg)
    keys = sorted(hf)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"transformers-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: hf[k] for k in shard}, str(folder / name))
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in hf.values())},
             "weight_map": weight_map}
    (folder / "transformers.safetensors.index.json").write_text(json.dumps(index, indent=1))


def tiny_mimi_config() -> dict:
    """Mimi's own architecture at toy widths; ratios kept, so frames are still 1920 samples."""
    cfg = default_config()
    cfg["seanet"].update(dimension=32, n_filters=4)
    cfg["quantizer"].update(dimension=16, input_dimension=32, output_dimension=32)
    cfg["transformer"].update(d_model=32, num_heads=2, num_layers=1, dim_feedforward=64,
                              input_dimension=32, output_dimensions=[32])
    return cfg


def write_random_mimi(folder: Path, seed: int, config: dict | None) -> None:
    """Random Mimi weights; a non-default config is written beside them (None: Mimi's own)."""
    from moshi.models import loaders

    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, config, device="cpu", num_codebooks=32)
        state = {k: v.detach().contiguous() for k, v in mimi.state_dict().items()}
        # An untrained Mimi has all-zero codebooks (filled by k-means in training): its audio
        # would not depend on the codes at all. Random, "initialised" codebooks make it do so.
        for key in state:
            if key.endswith("_codebook.embedding_sum"):
                state[key] = torch.randn(state[key].shape)
            elif key.endswith("_codebook._initialized"):
                state[key] = torch.ones_like(state[key])
    save_file(state, str(folder / WEIGHTS_FILE))
    if config is not None:
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))


def write_prompt_wavs(folder: Path, seconds: float = 2.0, sample_rate: int = 44_100) -> None:
    """Synthetic stand-ins (gliding tones over a little noise) at 44.1 kHz, 16-bit, like the real ones."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    for i, preset in enumerate(PRESETS.values()):
        f0 = 140 + 60 * i
        audio = 0.3 * np.sin(2 * np.pi * (f0 + 40 * t) * t) + 0.02 * rng.standard_normal(t.size)
        path = folder / preset.wav
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, audio.astype(np.float32), sample_rate, subtype="PCM_16")


def make_tiny(folder: Path, fmt: str = "original", seed: int = 0,
              cfg: CSMConfig = TINY, full_size_codecs: bool = False,
              dtype: torch.dtype = torch.float32) -> Path:
    """The folder; `cfg` and `full_size_codecs` give other shapes (benchmarks use the real
    ones). Without `full_size_codecs`, Mimi is tiny and SilentCipher light (see
    write_random_silentcipher); with it, both have the real models' sizes. `dtype`: of the
    CSM weights on disk (the image bakes bfloat16)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "RANDOM_WEIGHTS.txt").write_text(NOTICE)
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=1))
    write_weights(random_model(cfg, seed), folder, fmt, dtype)
    write_tiny_tokenizer(folder / "tokenizer.json")
    write_random_mimi(folder / "mimi", seed, None if full_size_codecs else tiny_mimi_config())
    write_random_silentcipher(folder / "silentcipher", seed, light=not full_size_codecs)
    write_prompt_wavs(folder)
    return folder
