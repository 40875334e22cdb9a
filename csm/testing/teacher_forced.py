"""A model's states and logits for given frames, teacher-forced: how far a change (another
dtype, int8 weights) moves what the model draws from, frame by frame, without the drift of
sampling its own codes."""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import CSM
from ..prompt import build_prompt


@torch.inference_mode()
def backbone_states(model: CSM, text_ids: list[int], codes: Tensor) -> Tensor:
    """The backbone's hidden state [F, dim] from which each frame of `codes` [32, F] is drawn,
    speaking `text_ids` with no context: the prompt, then the given frames as audio
    positions, in one pass. Writes the backbone's cache row 0."""
    device = model.codebook0_head.weight.device
    tokens, mask = build_prompt([(text_ids, codes)], None)
    n = tokens.shape[0]
    hidden = model.backbone(model.embed(tokens[None].to(device), mask[None].to(device)),
                            torch.arange(n, device=device)[None], slice(0, 1))
    return hidden[0, len(text_ids) - 1:len(text_ids) - 1 + codes.shape[1]]


@torch.inference_mode()
def decoder_logits(model: CSM, h: Tensor, codes: Tensor) -> Tensor:
    """h [F, dim] backbone states and codes [F, 32] of those frames -> [F, 31, vocabulary]
    float32: the logits of codebooks 1..31, each given the codes before it, in one decoder
    pass over the 32 positions a frame step walks one at a time. Writes the decoder's cache
    rows [0, F): call it on a model with caches of at least F rows and no frame step running.
    """
    n = model.cfg.num_codebooks
    embeds = model.audio_embeddings(codes[:, :n - 1] + model.codebook_offsets[:n - 1])
    x = torch.cat([h[:, None].to(embeds.dtype), embeds], dim=1)
    out = model.decoder(model.projection(x), slice(0, n), slice(0, h.shape[0]))
    return torch.einsum("fcd,cdv->fcv", out[:, 1:], model.audio_head).float()
