"""Load CSM weights from a local model folder, in either published format.

- original (the reference's, torchtune key names): `model.safetensors` or `ckpt.pt`;
- transformers (`CsmForConditionalGeneration`): `transformers-0000N-of-0000M.safetensors` with
  `transformers.safetensors.index.json` as on the hub, or what `save_pretrained` writes
  (`model.safetensors`, or `model-*.safetensors` with `model.safetensors.index.json`).

The model is built on the meta device and materialised once on the target device and dtype;
tensors are then read one at a time straight onto that device, so at no point are two full
copies of the weights in memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from .config import CSMConfig, load_config
from .model import CSM

INDEX_FILES = ("transformers.safetensors.index.json", "model.safetensors.index.json")
SINGLE_FILES = ("model.safetensors", "ckpt.pt")

# transformers name -> original name, applied in order to each key.
_HF_RENAMES = [
    (r"^backbone_model\.layers\.", "backbone.layers."),
    (r"^depth_decoder\.model\.layers\.", "decoder.layers."),
    (r"^backbone_model\.norm\.weight$", "backbone.norm.scale"),
    (r"^depth_decoder\.model\.norm\.weight$", "decoder.norm.scale"),
    (r"\.self_attn\.", ".attn."),
    (r"\.o_proj\.", ".output_proj."),
    (r"\.mlp\.gate_proj\.", ".mlp.w1."),
    (r"\.mlp\.down_proj\.", ".mlp.w2."),
    (r"\.mlp\.up_proj\.", ".mlp.w3."),
    (r"\.input_layernorm\.weight$", ".sa_norm.scale"),
    (r"\.post_attention_layernorm\.weight$", ".mlp_norm.scale"),
    (r"^embed_text_tokens\.", "text_embeddings."),
    (r"^backbone_model\.embed_tokens\.embed_audio_tokens\.", "audio_embeddings."),
    # The depth decoder's copy of the same (tied) table: save_pretrained keeps only this one.
    (r"^depth_decoder\.model\.embed_tokens\.", "audio_embeddings."),
    (r"^lm_head\.", "codebook0_head."),
    (r"^depth_decoder\.codebooks_head\.weight$", "audio_head"),
    (r"^depth_decoder\.model\.inputs_embeds_projector\.", "projection."),
]
# transformers checkpoints also hold the Mimi codec; we read Mimi through moshi.
_HF_IGNORED = re.compile(r"^codec_model\.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the file and the key."""


def find_weight_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    for name in INDEX_FILES:
        index = model_dir / name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [model_dir / f for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.exists():
                    raise FileNotFoundError(f"{f} is listed in {index} but missing")
            return files
    for name in SINGLE_FILES:
        if (model_dir / name).exists():
            return [model_dir / name]
    raise FileNotFoundError(
        f"no CSM weights in {model_dir}: expected one of {', '.join(SINGLE_FILES + INDEX_FILES)}")


@contextmanager
def _open_weights(path: Path, device: torch.device) -> Iterator[tuple[list[str],
                                                                       Callable[[str], Tensor]]]:
    """(keys, read) for one file; `read(key)` brings one tensor onto `device` when called."""
    if path.suffix == ".safetensors":
        dev = "cuda:0" if device.type == "cuda" and device.index is None else str(device)
        with safe_open(str(path), framework="pt", device=dev) as f:
            yield list(f.keys()), f.get_tensor
    else:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        state = state.get("model", state)
        yield list(state.keys()), lambda key: state[key].to(device)


def _is_transformers_format(keys: list[str]) -> bool:
    return any(k.startswith(("backbone_model.", "depth_decoder.", "embed_text_tokens."))
               for k in keys)


def _unpermute_qk(w: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """transformers' rotate-half q/k rows -> the reference's interleaved pairs."""
    dim = w.shape[-1]
    return w.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def _same(t: Tensor) -> Tensor:
    return t


def _original_name(key: str, cfg: CSMConfig) -> tuple[str, Callable[[Tensor], Tensor]]:
    """Map a transformers key to (original name, tensor transform)."""
    name = key
    for pattern, repl in _HF_RENAMES:
        name = re.sub(pattern, repl, name)
    m = re.match(r"^(backbone|decoder)\.layers\.\d+\.attn\.(q|k)_proj\.weight$", name)
    if m is None:
        return name, _same
    lc = cfg.backbone if m.group(1) == "backbone" else cfg.decoder
    heads = lc.num_heads if m.group(2) == "q" else lc.num_kv_heads
    return name, lambda t: _unpermute_qk(t, heads, lc.head_size)


def build_empty_model(cfg: CSMConfig, device: torch.device, dtype: torch.dtype) -> CSM:
    """A model with uninitialised weights on `device`: no random init, no CPU detour."""
    with torch.device("meta"):
        model = CSM(cfg)
    for param in model.parameters():  # on the meta device: no memory yet
        param.data = param.data.to(dtype)
    model = model.to_empty(device=device)
    model.init_buffers(device)
    return model.eval().requires_grad_(False)


def load_model(model_dir: Path, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> CSM:
    device = torch.device(device)
    cfg = load_config(model_dir)
    files = find_weight_files(model_dir)
    model = build_empty_model(cfg, device, dtype)
    targets = model.state_dict()
    loaded: set[str] = set()
    # Decided over all files: a transformers shard may hold only un-prefixed keys (lm_head).
    hf_format = False
    for path in files:
        with _open_weights(path, torch.device("cpu")) as (keys, _):
            hf_format = hf_format or _is_transformers_format(keys)
    for path in files:
        with _open_weights(path, device) as (keys, read):
            for key in keys:
                if hf_format and _HF_IGNORED.match(key):
                    continue
                name, transform = _original_name(key, cfg) if hf_format else (key, _same)
                if name not in targets:
                    raise CheckpointError(f"{path}: unknown key {key!r}")
                tensor = read(key)
                if tuple(tensor.shape) != tuple(targets[name].shape):
                    raise CheckpointError(
                        f"{path}: key {key!r} has shape {tuple(tensor.shape)}, the model "
                        f"(config {model_dir}/config.json or csm-1b) expects "
                        f"{tuple(targets[name].shape)}")
                if name in loaded:  # a tied copy: CSM shares it, so it must be the same table
                    if not torch.equal(transform(tensor).to(dtype), targets[name]):
                        raise CheckpointError(
                            f"{path}: key {key!r} is a second copy of {name!r} that differs "
                            "from the first; CSM ties them and this engine cannot serve "
                            "untied copies")
                    continue
                targets[name].copy_(transform(tensor))
                loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        raise CheckpointError(
            f"{', '.join(map(str, files))}: missing {len(missing)} key(s), first {missing[:3]}")
    return model
