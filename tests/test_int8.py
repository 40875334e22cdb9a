"""CSM_DECODER_INT8: the depth decoder's projections in int8, one scale per output row.

The decoder's weights are read 31 times a frame (~7 of a frame's ~9 GB at csm-1b in bf16):
int8 halves them. What it costs in what the decoder draws from is measured here on the tiny
model's random weights, teacher-forced, and at csm-1b shapes by the GPU suite's `int8` part.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csm.checkpoint import load_model
from csm.engine import Engine, GenerationRequest
from csm.llama import Int8Linear
from csm.model import SamplingState
from csm.testing.teacher_forced import decoder_logits
from worker.model_source import ModelSource, load_engine
from worker.settings import SettingsError, load_settings


def test_int8_weights_are_within_half_a_step_of_each_row():
    torch.manual_seed(0)
    # Rows of very different sizes: one scale for the whole tensor would flatten the small
    # ones to zero; an all-zero row must not divide by zero.
    weight = torch.randn(6, 64) * torch.tensor([1e-3, 1e-1, 1, 10, 100, 0])[:, None]
    layer = Int8Linear(weight)
    assert layer.values.dtype == torch.int8 and layer.values.shape == weight.shape
    assert int(layer.values.abs().max()) == 127  # each row uses the whole range
    restored = layer.values.float() * layer.scale[:, None]
    step = layer.scale[:, None]
    assert bool(((restored - weight).abs() <= step / 2 + 1e-12).all())
    assert torch.isfinite(restored).all() and not restored[5].any()
    x = torch.randn(3, 2, 64)
    assert torch.allclose(layer(x), F.linear(x, restored), rtol=1e-5, atol=1e-5)


def test_quantizing_lets_the_full_precision_weights_go(tiny_model_dir):
    model = load_model(tiny_model_dir)
    decoder = model.decoder
    projections = sum(p.numel() for name, p in decoder.named_parameters()
                      if not name.endswith("norm.scale"))
    decoder.quantize_int8()
    # Only the norms stay in full precision; every projection's weight is one byte.
    assert all(name.endswith("norm.scale") for name, _ in decoder.named_parameters())
    values = [b for name, b in decoder.named_buffers() if name.endswith(".values")]
    assert {b.dtype for b in values} == {torch.int8}
    assert sum(b.numel() for b in values) == projections


def decoder_inputs(model, frames: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(frames, model.cfg.backbone.dim, generator=generator)
    codes = torch.randint(0, model.cfg.audio_vocab_size, (frames, model.cfg.num_codebooks),
                          generator=generator)
    return h, codes


def test_teacher_forced_logits_are_what_a_frame_step_draws_from(tiny_model_dir):
    """Greedy draws (top-1) from the frame step's own decode equal the argmax of the
    teacher-forced logits given those codes: the helper the int8 figures rest on computes
    what a frame step computes."""
    model = load_model(tiny_model_dir)
    model.setup_caches(4)
    h, _ = decoder_inputs(model, 4, seed=0)
    sampling = SamplingState(temperature=torch.ones(4), topk=torch.ones(4, dtype=torch.long),
                             seed=torch.arange(4), frame_index=torch.zeros(4, dtype=torch.long))
    with torch.inference_mode():
        codes = model.decode_codes(h, sampling, slice(0, 4))
    logits = decoder_logits(model, h, codes)
    assert logits.shape == (4, 31, model.cfg.audio_vocab_size)
    assert torch.equal(logits.argmax(-1), codes[:, 1:])


def test_int8_moves_the_decoders_logits_by_about_one_percent(tiny_model_dir):
    model = load_model(tiny_model_dir)
    model.setup_caches(16)
    h, codes = decoder_inputs(model, 16, seed=1)
    full = decoder_logits(model, h, codes)
    model.decoder.quantize_int8()
    int8 = decoder_logits(model, h, codes)
    relative = (int8 - full).norm(dim=-1) / full.norm(dim=-1)
    # Measured 0.9% median, 1.5% at most (tiny, fp32, these draws); a scale on the wrong
    # axis or a lost row is tens of percent.
    assert 0.001 < float(relative.median()) < 0.03
    assert float(relative.max()) < 0.05
    assert float((int8.argmax(-1) == full.argmax(-1)).float().mean()) > 0.9


def test_an_int8_engine_serves_and_draws_the_same_codes_batched_as_alone(tiny_model_dir):
    requests = [GenerationRequest(text=f"Sentence number {s}.", max_audio_length_ms=640, seed=s)
                for s in range(3)]
    with Engine.load(tiny_model_dir, device="cpu", max_batch=4) as plain:
        full = plain.generate(requests[0]).codes
    with Engine.load(tiny_model_dir, device="cpu", max_batch=4, decoder_int8=True) as engine:
        assert isinstance(engine.model.decoder.layers[0].mlp.w2, Int8Linear)
        assert not isinstance(engine.model.backbone.layers[0].mlp.w2, Int8Linear)
        alone = [engine.generate(r).codes for r in requests]
        running = [engine.start(r) for r in requests]
        together = [engine.finish(g, list(g.blocks())).codes for g in running]
    for got, want in zip(together, alone):
        assert torch.equal(got, want)
    # Codebook 0 comes from the backbone, which stays full precision: the first frame's
    # first code is the same; the rest of what int8 draws is its own.
    assert torch.equal(alone[0][0, 0], full[0, 0])
    assert not torch.equal(alone[0], full)


def test_an_int8_decoder_compiles_in_the_same_eight_versions(tiny_model_dir, fresh_compiler):
    """Dynamo traces the int8 layers in full graphs (no break at Int8Linear) and the
    compiled engine draws what the int8 engine draws eagerly (as test_compile.py checks for
    the full-precision decoder)."""
    request = GenerationRequest(text="Sentence number 0.", max_audio_length_ms=640, seed=0)
    with Engine.load(tiny_model_dir, device="cpu", max_batch=4, decoder_int8=True) as eager:
        expected = eager.generate(request).codes
    graphs = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    with Engine.load(tiny_model_dir, device="cpu", max_batch=4, decoder_int8=True,
                     compile_backend=backend) as engine:
        assert len(graphs) == 8
        assert torch.equal(engine.generate(request).codes, expected)


@pytest.mark.parametrize("env, on", [({}, False), ({"CSM_DECODER_INT8": "1"}, True)])
def test_csm_decoder_int8_is_off_by_default_and_reaches_the_engine(tiny_model_dir, env, on):
    settings = load_settings({"CSM_DEVICE": "cpu", "CSM_CUDA_GRAPHS": "0", **env})
    source = ModelSource("CSM_MODEL_DIR", tiny_model_dir, tiny_model_dir)
    with load_engine(source, settings) as engine:
        assert isinstance(engine.model.decoder.layers[0].attn.wqkv, Int8Linear) is on


def test_csm_decoder_int8_names_the_values_it_takes():
    assert load_settings({"CSM_DECODER_INT8": "true"}).decoder_int8 is True
    assert load_settings({"CSM_DECODER_INT8": "0"}).decoder_int8 is False
    with pytest.raises(SettingsError, match=r"CSM_DECODER_INT8 must be 1 or 0"):
        load_settings({"CSM_DECODER_INT8": "half"})
