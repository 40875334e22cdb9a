"""bench.ops, the operation counter standing in for a GPU's kernel count (tiny RANDOM weights)."""

from __future__ import annotations

from bench.ops import count_frame_step
from csm.checkpoint import load_model


def test_the_counter_sees_what_fusing_saves_and_leaves_views_out(tiny_model_dir):
    unfused, fused = (load_model(tiny_model_dir) for _ in range(2))
    fused.backbone.fuse()
    fused.decoder.fuse()
    (step, decoder), (fused_step, fused_decoder) = (count_frame_step(m, 2)
                                                    for m in (unfused, fused))
    cfg = fused.cfg
    # One backbone pass, and one depth-decoder pass per codebook after the first.
    layer_passes = cfg.backbone.num_layers + (cfg.num_codebooks - 1) * cfg.decoder.num_layers
    # q, k, v become one matmul (their outputs no longer concatenated), w1 and w3 another.
    assert step.ops["aten.linear"] - fused_step.ops["aten.linear"] == 3 * layer_passes
    assert step.ops["aten.cat"] - fused_step.ops["aten.cat"] == layer_passes
    assert step.total - fused_step.total == 4 * layer_passes
    # Views write nothing: a step is full of them, none is counted.
    assert not {"aten.view", "aten.transpose", "aten.slice", "aten.expand"} & set(step.ops)
    assert fused_decoder.total < fused_step.total
    assert fused_decoder.ops["aten.topk"] == fused_step.ops["aten.topk"] == cfg.num_codebooks


def test_an_int8_decoder_adds_a_conversion_and_a_scale_per_projection_eagerly(tiny_model_dir):
    """What `bench.ops --int8` shows: why CSM_DECODER_INT8 is meant to run compiled."""
    full, int8 = (load_model(tiny_model_dir) for _ in range(2))
    for model in (full, int8):
        model.decoder.fuse()
    int8.decoder.quantize_int8()
    (_, full_decoder), (_, int8_decoder) = (count_frame_step(m, 2) for m in (full, int8))
    cfg = int8.cfg
    projections = 4 * (cfg.num_codebooks - 1) * cfg.decoder.num_layers  # qkv, out, w13, w2
    assert int8_decoder.total - full_decoder.total == 2 * projections
    assert int8_decoder.ops["aten.linear"] == full_decoder.ops["aten.linear"]
