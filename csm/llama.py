"""A compact Llama-3.2 decoder with a static KV cache (the shape of gpt-fast's model.py).

Both CSM transformers are this module: no token embedding, no output layer. The cache is
preallocated for `max_batch` rows; callers pick rows with a slice, so a prefill of one job
writes into its own row while a decode step runs over the first `n` rows, both as views.
Positions are per row, which is what lets jobs of different lengths share a batch.
RoPE uses the reference's interleaved-pair convention (torchtune); checkpoint.py permutes
transformers-format q/k weights into it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LlamaConfig, RopeScaling


def rope_frequencies(cfg: LlamaConfig) -> Tensor:
    """Inverse frequencies with Llama-3 scaling, in fp32 tensor arithmetic as CSM computes them.

    Built on the CPU explicitly so that a model constructed on the meta device still gets it.
    """
    half = cfg.head_size // 2
    exponent = torch.arange(0, half, dtype=torch.float32, device="cpu") * 2 / cfg.head_size
    freqs = 1.0 / (cfg.rope_base ** exponent)
    s: RopeScaling | None = cfg.rope_scaling
    if s is None:
        return freqs
    wavelen = 2 * math.pi / freqs
    smooth = (s.old_context_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * freqs / s.factor + smooth * freqs
    low = wavelen > s.old_context_len / s.low_freq_factor
    high = wavelen < s.old_context_len / s.high_freq_factor
    return torch.where(high, freqs, torch.where(low, freqs / s.factor, smoothed))


def rope_table(cfg: LlamaConfig) -> Tensor:
    """[max_seq_len, head_dim/2, 2] of (cos, sin), fp32 whatever the model dtype: a complex
    table's layout, kept real so that compiled code can read it (see apply_rope)."""
    positions = torch.arange(cfg.max_seq_len, dtype=torch.float32, device="cpu")
    angles = torch.outer(positions, rope_frequencies(cfg))
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """x: [B, S, H, D], its pairs (2i, 2i+1) rotated; rope: [B, S, D/2, 2] at each row's
    positions.

    Eagerly, one complex product per pair is the reference's x0*cos - x1*sin, x1*cos + x0*sin
    in a third of the kernel launches of writing it out. Inductor generates no code for
    complex numbers (they would stay separate kernels between its fused ones), so compiled
    code writes it out and inductor fuses it with what surrounds it.
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    rope = rope.unsqueeze(2)
    if torch.compiler.is_compiling():
        (x0, x1), (cos, sin) = pairs.unbind(-1), rope.unbind(-1)
        rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rope))
    return rotated.flatten(3).type_as(x)


def fold_mask(mask: Tensor, group: int) -> Tensor:
    """Additive mask rows [B, S, keys] -> [B, 1, group * S, keys], a row per folded query row
    (g, s) of `attend` (a view when S is 1)."""
    b, s, keys = mask.shape
    return mask[:, None].expand(b, group, s, keys).reshape(b, 1, group * s, keys)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Grouped-query attention: q [B, H, S, D] over k, v [B, H_kv, keys, D] with a mask from
    fold_mask; returns [B, S, H * D].

    The query heads that share a key/value head (h // group, as `enable_gqa` pairs them) are
    passed as that head's query rows (g, s), so the call has as many query heads as key/value
    heads. Given grouped-query heads and a mask, flash refuses the call (no mask) and so does
    memory-efficient attention (no grouped heads, in PyTorch's sdp_utils.cpp); unless cuDNN
    takes it, PyTorch falls back to its unfused math path: ~20 kernels per call, the keys and
    values copied per group. The GPU suite's `attention` part shows which backend serves each.
    """
    b, heads, s, d = q.shape
    kv = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(b, kv, heads // kv * s, d), k, v,
                                         attn_mask=mask)
    return out.view(b, kv, heads // kv, s, d).permute(0, 3, 1, 2, 4).reshape(b, s, heads * d)


class Linear(nn.Linear):
    """nn.Linear without its random init: CSM's weights always come from a checkpoint (or a
    test fixture's own draw). The init is not just wasted work: on the meta device, where
    checkpoint.py builds the model, it runs through torch's Python reference kernels, whose
    first use imports torch._dynamo: about 1.4 s of every start-up on a 2-core CPU."""

    def reset_parameters(self) -> None:
        pass


class Int8Linear(nn.Module):
    """A bias-free linear layer whose [out, in] weight is kept as int8 with one scale per
    output row (symmetric, weight-only: inputs, outputs and the arithmetic stay in the
    model's dtype). It computes what torchao's int8 weight-only layer computes on CUDA,
    without a dependency whose compiled kernels are built per torch release.

    Eagerly the int8-to-float conversion is a kernel of its own that writes the full-precision
    weight back out, so the layer reads more bytes than the weight it replaces; only compiled
    (where inductor folds the conversion and the scale into the matrix product's reduction,
    at batch 1: see CSM.compile_frame_step) does it read half of them.
    """

    def __init__(self, weight: Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        values = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("values", values)
        self.register_buffer("scale", scale.to(weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.values.to(x.dtype)) * self.scale


def linear(x: Tensor, weight: Tensor | Int8Linear) -> Tensor:
    """A fused projection (see Attention.fuse), in full precision or int8."""
    return weight(x) if isinstance(weight, Int8Linear) else F.linear(x, weight)


class Embedding(nn.Embedding):
    """nn.Embedding without its random init (see Linear)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.scale.shape, self.scale, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        self.q_proj = Linear(cfg.dim, self.n_heads * self.hd, bias=False)
        self.k_proj = Linear(cfg.dim, self.n_kv * self.hd, bias=False)
        self.v_proj = Linear(cfg.dim, self.n_kv * self.hd, bias=False)
        self.output_proj = Linear(self.n_heads * self.hd, cfg.dim, bias=False)
        self.k_cache: Tensor | None = None
        self.v_cache: Tensor | None = None
        self.cache_index: tuple[Tensor, Tensor] | None = None  # see Transformer.setup_cache
        self.wqkv: Tensor | Int8Linear | None = None  # see fuse()

    def fuse(self) -> None:
        """One matmul for q, k and v: the three weights become views of one tensor."""
        self.wqkv = _fuse(self.q_proj, self.k_proj, self.v_proj)

    def quantize_int8(self) -> None:
        """The fused and output projections in int8 (see Transformer.quantize_int8)."""
        self.wqkv = Int8Linear(self.wqkv)
        self.output_proj = Int8Linear(self.output_proj.weight)
        self.q_proj = self.k_proj = self.v_proj = None

    def _qkv(self, x: Tensor) -> Tensor:
        """The q, k and v heads side by side: [B, S, heads + 2 * kv_heads, head_size]."""
        if self.wqkv is None:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        else:
            qkv = linear(x, self.wqkv)
        return qkv.view(*x.shape[:2], -1, self.hd)

    def forward(self, x: Tensor, rope: Tensor, pos: Tensor | slice, mask: Tensor, rows: slice,
                keys: int) -> Tensor:
        qkv = self._qkv(x)
        # q and k rotated in one go: half the RoPE kernels of rotating each (the depth decoder
        # runs 124 layers per frame).
        qk = apply_rope(qkv[:, :, :self.n_heads + self.n_kv], rope)
        q = qk[:, :, :self.n_heads].transpose(1, 2)
        k = qk[:, :, self.n_heads:].transpose(1, 2)
        v = qkv[:, :, self.n_heads + self.n_kv:].transpose(1, 2)
        k_cache, v_cache = self.k_cache[rows], self.v_cache[rows]
        # Written into the whole row (a parked row sits at the window's last position), read
        # over the first `keys` positions only.
        if isinstance(pos, slice):
            k_cache[:, :, pos].copy_(k)
            v_cache[:, :, pos].copy_(v)
        else:
            # Indexed into the whole cache, not scattered into the view of its rows: compiled
            # (CSM.compile_frame_step), a write into a view copies the rows' whole cache out
            # and back around it; this one inductor writes in place.
            row_index, head_index = self.cache_index
            at = (row_index[rows], head_index, pos[:, None, :])
            self.k_cache.index_put_(at, k)
            self.v_cache.index_put_(at, v)
        return self.output_proj(attend(q, k_cache[:, :, :keys], v_cache[:, :, :keys], mask))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.w2 = Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.w3 = Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.w13: Tensor | Int8Linear | None = None  # see fuse()

    def fuse(self) -> None:
        """One matmul for the gate and up projections (w1, w3)."""
        self.w13 = _fuse(self.w1, self.w3)

    def quantize_int8(self) -> None:
        self.w13 = Int8Linear(self.w13)
        self.w2 = Int8Linear(self.w2.weight)
        self.w1 = self.w3 = None

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is None:
            gate, up = self.w1(x), self.w3(x)
        else:
            gate, up = linear(x, self.w13).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def _fuse(*linears: nn.Linear) -> Tensor:
    """Concatenate the weights and make each layer's weight a view of the result, so the
    parameters (and state_dict) keep their names and no second copy stays in memory."""
    fused = torch.cat([lin.weight.data for lin in linears])
    for lin, part in zip(linears, fused.split([lin.out_features for lin in linears])):
        lin.weight.data = part
    return fused


class Layer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.sa_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: Tensor, rope: Tensor, pos: Tensor | slice, mask: Tensor, rows: slice,
                keys: int) -> Tensor:
        x = x + self.attn(self.sa_norm(x), rope, pos, mask, rows, keys)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.init_buffers(torch.device("cpu"))

    def init_buffers(self, device: torch.device) -> None:
        """Derived tables, rebuilt after weights are materialised (they are never saved)."""
        self.register_buffer("rope", rope_table(self.cfg).to(device), persistent=False)
        # Additive, in the weights' dtype: SDPA takes it as it is, where a boolean mask would
        # be converted in every layer's call.
        n = self.cfg.max_seq_len
        above = torch.ones(n, n, dtype=torch.bool, device="cpu").triu(1)
        causal = torch.zeros(n, n, device="cpu").masked_fill(above, float("-inf"))
        self.register_buffer("causal", causal.to(device, self.norm.scale.dtype),
                             persistent=False)

    def fuse(self) -> None:
        """Fewer, larger matmuls per layer (an engine-time optimisation; same numbers)."""
        for layer in self.layers:
            layer.attn.fuse()
            layer.mlp.fuse()

    def quantize_int8(self) -> None:
        """Every layer's projections in int8 with a scale per output row (Int8Linear), the
        full-precision weights let go: half the bytes each pass reads. Norms stay as they
        are. Fuses first: the fused weight is quantized row by row, as its parts would be."""
        if self.layers[0].attn.wqkv is None:
            self.fuse()
        for layer in self.layers:
            layer.attn.quantize_int8()
            layer.mlp.quantize_int8()

    def setup_cache(self, max_batch: int) -> None:
        """(Re)allocate the KV cache; contents are never read past a row's own positions."""
        p = self.norm.scale
        shape = (max_batch, self.cfg.num_kv_heads, self.cfg.max_seq_len, self.cfg.head_size)
        # Each position's (row, kv head) coordinates, broadcast against a [B, S] position
        # index when keys and values are written (Attention.forward).
        index = (torch.arange(max_batch, device=p.device)[:, None, None],
                 torch.arange(self.cfg.num_kv_heads, device=p.device)[None, :, None])
        for layer in self.layers:
            layer.attn.k_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)
            layer.attn.v_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)
            layer.attn.cache_index = index

    def read_cache(self, row: int, length: int) -> list[tuple[Tensor, Tensor]]:
        """A copy of one row's keys and values for positions [0, length)."""
        return [(layer.attn.k_cache[row, :, :length].clone(),
                 layer.attn.v_cache[row, :, :length].clone()) for layer in self.layers]

    def write_cache(self, row: int, kv: list[tuple[Tensor, Tensor]]) -> None:
        for layer, (k, v) in zip(self.layers, kv):
            layer.attn.k_cache[row, :, :k.shape[1]].copy_(k)
            layer.attn.v_cache[row, :, :v.shape[1]].copy_(v)

    def forward(self, x: Tensor, pos: Tensor | slice, rows: slice,
                keys: int | None = None) -> Tensor:
        """x: [B, S, dim] at positions pos: [B, S] (long), cache rows `rows` (B of them); or
        pos a slice of S positions that every row is at (the depth decoder's steps), which
        reads the RoPE and mask tables as views instead of gathering them per row.

        Attention reads cache positions [0, keys) only (all of them when None), so a decode
        step costs what the positions in use cost, not the whole window. The caller keeps
        every live position in `pos` below `keys`; a row beyond it (a parked one) draws
        nothing that is used.
        """
        keys = keys or self.cfg.max_seq_len
        if isinstance(pos, slice):
            rope, mask = self.rope[pos][None], self.causal[pos, :keys][None]
        else:
            rope, mask = self.rope[pos], self.causal[:, :keys][pos]
        mask = fold_mask(mask, self.cfg.num_heads // self.cfg.num_kv_heads)
        for layer in self.layers:
            x = layer(x, rope, pos, mask, rows, keys)
        return self.norm(x)
