"""config.json in both published forms: transformers' (`depth_decoder_config`, ...) and the
reference's (`backbone_flavor`, `decoder_flavor`, ...), or both at once; unknown flavors refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from csm.config import CSM_1B, TINY, config_to_hf, load_config
from csm.model import CSM

# What the reference's model class saves with a fine-tune (Model.save_pretrained / its ModelArgs).
REFERENCE_CONFIG = {"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M",
                    "text_vocab_size": 128256, "audio_vocab_size": 2051,
                    "audio_num_codebooks": 32}


def write(folder: Path, data: object) -> Path:
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def test_reference_form_names_the_real_shapes(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, REFERENCE_CONFIG)) == CSM_1B


def test_reference_form_builds_the_published_parameter_shapes(tmp_path: Path) -> None:
    """The shapes csm-1b's model.safetensors holds (see csm-facts.md), on the meta device."""
    with torch.device("meta"):
        model = CSM(load_config(write(tmp_path, REFERENCE_CONFIG)))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["text_embeddings.weight"] == (128256, 2048)
    assert shapes["audio_embeddings.weight"] == (32 * 2051, 2048)
    assert shapes["projection.weight"] == (1024, 2048)
    assert shapes["codebook0_head.weight"] == (2051, 2048)
    assert shapes["audio_head"] == (31, 1024, 2051)
    assert shapes["backbone.layers.15.attn.k_proj.weight"] == (8 * 64, 2048)
    assert shapes["decoder.layers.3.attn.q_proj.weight"] == (8 * 128, 1024)
    assert "backbone.layers.16.attn.q_proj.weight" not in shapes


def test_both_forms_in_one_file_are_accepted_when_they_agree(tmp_path: Path) -> None:
    both = config_to_hf(CSM_1B) | REFERENCE_CONFIG
    assert load_config(write(tmp_path, both)) == load_config(write(tmp_path, config_to_hf(CSM_1B)))


def test_both_forms_that_disagree_are_refused_naming_the_keys(tmp_path: Path) -> None:
    both = config_to_hf(TINY) | REFERENCE_CONFIG
    with pytest.raises(ValueError, match="two forms disagree") as info:
        load_config(write(tmp_path, both))
    assert "backbone.dim 2048 (flavors) vs 96 (transformers keys)" in str(info.value)


@pytest.mark.parametrize("key", ["backbone_flavor", "decoder_flavor"])
def test_unknown_flavor_is_refused_by_name(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError) as info:
        load_config(write(tmp_path, dict(REFERENCE_CONFIG, **{key: "llama-3B"})))
    message = str(info.value)
    assert f"unknown {key} 'llama-3B'" in message and "llama-1B, llama-100M" in message
    assert str(tmp_path / "config.json") in message


@pytest.mark.parametrize("data,needle", [
    ({"model_type": "llama"}, "expected depth_decoder_config"),
    ({"backbone_flavor": "llama-1B"}, "KeyError: 'decoder_flavor'"),
    ([1, 2], "expected depth_decoder_config"),
])
def test_other_files_are_not_csm_configs(tmp_path: Path, data: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        load_config(write(tmp_path, data))


def test_invalid_json_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{backbone_flavor: llama-1B}")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_config(tmp_path)


def test_a_rows_cache_bytes_are_what_the_model_allocates() -> None:
    """The figure the start-up's out-of-memory message quotes is the caches' real size."""
    model = CSM(TINY)
    model.setup_caches(3)
    allocated = sum(t.nbytes for layer in [*model.backbone.layers, *model.decoder.layers]
                    for t in (layer.attn.k_cache, layer.attn.v_cache))
    assert allocated == 3 * TINY.cache_bytes_per_row(element_size=4)
    # csm-1b in bf16: 64 MiB for the backbone's 2048 positions, 132 KiB for the decoder's 33
    assert CSM_1B.cache_bytes_per_row(element_size=2) == 64 * 2**20 + 132 * 2**10
