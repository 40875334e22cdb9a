"""Model shapes: the real csm-1b, tiny test shapes, and reading them from a `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling, in the reference's (torchtune's) parameterisation."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    old_context_len: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    head_dim: int | None = None

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.num_heads


@dataclass(frozen=True)
class CSMConfig:
    backbone: LlamaConfig
    decoder: LlamaConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051
    num_codebooks: int = 32

    @property
    def frame_ms(self) -> int:
        return 80  # Mimi runs at 12.5 frames per second

    def cache_bytes_per_row(self, element_size: int) -> int:
        """The keys and values one batch row holds (the backbone's whole window and the depth
        decoder's), at `element_size` bytes a number (2 in bf16)."""
        return sum(2 * c.num_layers * c.num_kv_heads * c.max_seq_len * c.head_size
                   for c in (self.backbone, self.decoder)) * element_size


CSM_1B = CSMConfig(
    backbone=LlamaConfig(num_layers=16, dim=2048, num_heads=32, num_kv_heads=8,
                         intermediate_size=8192, max_seq_len=2048),
    decoder=LlamaConfig(num_layers=4, dim=1024, num_heads=8, num_kv_heads=2,
                        intermediate_size=8192, max_seq_len=33),
)

# Odd sizes on purpose: they catch transposed or mis-split weights that square shapes would hide.
TINY = CSMConfig(
    backbone=LlamaConfig(num_layers=2, dim=96, num_heads=6, num_kv_heads=2,
                         intermediate_size=136, max_seq_len=2048),
    decoder=LlamaConfig(num_layers=2, dim=80, num_heads=4, num_kv_heads=2,
                        intermediate_size=104, max_seq_len=33),
)


def _rope_from_hf(rope: dict[str, Any] | None) -> RopeScaling | None:
    """transformers writes the same Llama-3 curve in other units; convert it back.

    Only the wavelength thresholds (old_context / factor) and the factor matter, so
    any (low, high, original_max) triple is mapped to the reference's old context 8192.
    """
    if not rope or rope.get("rope_type", rope.get("type")) in (None, "default"):
        return None
    if rope.get("rope_type", rope.get("type")) != "llama3":
        raise ValueError(f"config.json: unsupported rope_scaling type {rope!r}")
    old = float(rope["original_max_position_embeddings"])
    low_wavelen = old / float(rope["low_freq_factor"])
    high_wavelen = old / float(rope["high_freq_factor"])
    ref_old = 8192
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=ref_old / low_wavelen,
        high_freq_factor=ref_old / high_wavelen,
        old_context_len=ref_old,
    )


def _rope_to_hf(rope: RopeScaling | None) -> dict[str, Any] | None:
    if rope is None:
        return None
    return {"rope_type": "llama3", "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.old_context_len}


def _llama_from_hf(d: dict[str, Any]) -> LlamaConfig:
    return LlamaConfig(
        num_layers=d["num_hidden_layers"], dim=d["hidden_size"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        intermediate_size=d["intermediate_size"], max_seq_len=d["max_position_embeddings"],
        norm_eps=d.get("rms_norm_eps", 1e-5), rope_base=d.get("rope_theta", 500_000.0),
        rope_scaling=_rope_from_hf(d.get("rope_scaling")), head_dim=d.get("head_dim"),
    )


def _llama_to_hf(c: LlamaConfig) -> dict[str, Any]:
    return {"num_hidden_layers": c.num_layers, "hidden_size": c.dim,
            "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
            "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_seq_len,
            "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_base,
            "rope_scaling": _rope_to_hf(c.rope_scaling), "head_dim": c.head_size}


def config_from_hf(d: dict[str, Any]) -> CSMConfig:
    """Read a transformers `CsmConfig` dict (the `config.json` on the hub)."""
    dd = d["depth_decoder_config"]
    backbone = _llama_from_hf(d)
    decoder = _llama_from_hf(dd)
    # The hub's config.json leaves rope_scaling to the code's docstring default; transformers
    # then silently uses plain RoPE. CSM was trained with Llama-3 scaling, so default to it.
    if d.get("rope_scaling") is None:
        backbone = replace(backbone, rope_scaling=RopeScaling())
    if dd.get("rope_scaling") is None:
        decoder = replace(decoder, rope_scaling=RopeScaling())
    return CSMConfig(backbone=backbone, decoder=decoder,
                     text_vocab_size=d.get("text_vocab_size", 128_256),
                     audio_vocab_size=d.get("vocab_size", 2051),
                     num_codebooks=d.get("num_codebooks", 32))


def config_to_hf(c: CSMConfig) -> dict[str, Any]:
    """The `config.json` a transformers `CsmConfig` would write for these shapes."""
    dd = _llama_to_hf(c.decoder) | {"num_codebooks": c.num_codebooks,
                                    "vocab_size": c.audio_vocab_size,
                                    "backbone_hidden_size": c.backbone.dim}
    return _llama_to_hf(c.backbone) | {
        "architectures": ["CsmForConditionalGeneration"], "model_type": "csm",
        "text_vocab_size": c.text_vocab_size, "vocab_size": c.audio_vocab_size,
        "num_codebooks": c.num_codebooks, "depth_decoder_config": dd,
    }


# The reference's model flavors (`backbone_flavor`, `decoder_flavor` in its config.json): the
# Llama-3.2 shapes they name. Both use RoPE base 500000 with Llama-3 scaling (factor 32).
FLAVORS: dict[str, dict[str, int]] = {
    "llama-1B": dict(num_layers=16, dim=2048, num_heads=32, num_kv_heads=8, intermediate_size=8192),
    "llama-100M": dict(num_layers=4, dim=1024, num_heads=8, num_kv_heads=2, intermediate_size=8192),
}
BACKBONE_POSITIONS = 2048


def _flavor(d: dict[str, Any], key: str, max_seq_len: int) -> LlamaConfig:
    name = d[key]
    if name not in FLAVORS:
        raise ValueError(f"unknown {key} {name!r}; known flavors: {', '.join(FLAVORS)}")
    return LlamaConfig(**FLAVORS[name], max_seq_len=max_seq_len)


def config_from_original(d: dict[str, Any]) -> CSMConfig:
    """Read the reference's config.json: `{"backbone_flavor": "llama-1B", "decoder_flavor":
    "llama-100M", "text_vocab_size": ..., "audio_vocab_size": ..., "audio_num_codebooks": ...}`."""
    codebooks = d.get("audio_num_codebooks", 32)
    return CSMConfig(
        backbone=_flavor(d, "backbone_flavor", BACKBONE_POSITIONS),
        # the depth decoder sees one position per codebook plus the backbone's state
        decoder=_flavor(d, "decoder_flavor", codebooks + 1),
        text_vocab_size=d.get("text_vocab_size", 128_256),
        audio_vocab_size=d.get("audio_vocab_size", 2051),
        num_codebooks=codebooks)


def _shapes(c: CSMConfig) -> dict[str, int]:
    """What both config forms spell out, by the key a reader would look for."""
    out = {"text_vocab_size": c.text_vocab_size, "audio_vocab_size": c.audio_vocab_size,
           "audio_num_codebooks": c.num_codebooks}
    for part, lc in (("backbone", c.backbone), ("decoder", c.decoder)):
        for name in ("num_layers", "dim", "num_heads", "num_kv_heads", "intermediate_size"):
            out[f"{part}.{name}"] = getattr(lc, name)
    return out


def config_from_dict(d: dict[str, Any]) -> CSMConfig:
    """Either form, or a file holding both (they must then describe the same shapes)."""
    original = "backbone_flavor" in d or "decoder_flavor" in d
    transformers = "depth_decoder_config" in d
    if not (original or transformers):
        raise ValueError("expected depth_decoder_config (transformers' form) or backbone_flavor "
                         "and decoder_flavor (the reference's form)")
    if not original:
        return config_from_hf(d)
    ref = config_from_original(d)
    if not transformers:
        return ref
    hf = config_from_hf(d)
    ours, theirs = _shapes(ref), _shapes(hf)
    differ = [f"{k} {ours[k]} (flavors) vs {theirs[k]} (transformers keys)"
              for k in ours if ours[k] != theirs[k]]
    if differ:
        raise ValueError("its two forms disagree: " + "; ".join(differ))
    return hf  # the same shapes; transformers' keys also carry RoPE and norm details


def load_config(model_dir: Path) -> CSMConfig:
    """Shapes from `config.json` when the folder has one, else the real csm-1b."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        return CSM_1B
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    try:
        return config_from_dict(data)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a CSM config.json ({type(e).__name__}: {e})") from e
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
