"""CSM_COMPILE: the depth decoder compiled by torch.compile, at start-up, one version per bucket.

The engine tests compile with dynamo's "eager" backend: dynamo traces the real
`decode_codes` exactly as for inductor (fullgraph=True fails on any graph break) and the
product wiring runs unchanged, without the minutes inductor spends generating CPU kernels.
Inductor itself runs in the GPU suite's `compiled` part.
"""

from __future__ import annotations

import pytest
import torch

from csm.checkpoint import load_model
from csm.engine import Engine, GenerationRequest
from csm.frame_step import MAX_COMPILED_ROWS, CompileError, FrameStepper
from worker.model_source import compile_backend
from worker.settings import SettingsError, load_settings


def requests() -> list[GenerationRequest]:
    return [GenerationRequest(text=f"Sentence number {s}.", max_audio_length_ms=640, seed=s)
            for s in range(2)]


def test_a_compiled_engine_compiles_every_bucket_at_start_up_and_draws_the_same_codes(
        tiny_model_dir):
    with Engine.load(tiny_model_dir, device="cpu", max_batch=2) as plain:
        expected = [plain.generate(r).codes for r in requests()]
    with Engine.load(tiny_model_dir, device="cpu", max_batch=2,
                     compile_backend="eager") as engine:
        assert engine.startup_ms["compile"] > 0
        # Any compile after start-up (a bucket not compiled there) now raises in the job.
        torch.compiler.set_stance("fail_on_recompile")
        try:
            alone = engine.generate(requests()[0]).codes  # bucket 1
            running = [engine.start(r) for r in requests()]  # bucket 2
            together = [engine.finish(g, list(g.blocks())).codes for g in running]
        finally:
            torch.compiler.set_stance("default")
    assert torch.equal(alone, expected[0])
    for got, want in zip(together, expected):
        assert torch.equal(got, want)


def test_a_failed_compile_says_how_to_serve_without_it(tiny_model_dir):
    model = load_model(tiny_model_dir)
    model.setup_caches(1)
    with pytest.raises(CompileError, match=r"compiling the depth decoder failed \(.*\); "
                                           r"CSM_COMPILE=0 serves without it$"):
        FrameStepper(model, 1, use_graphs=False, compile_backend="no-such-backend")


def test_compiling_refuses_more_rows_than_torch_keeps_versions_for(tiny_model_dir):
    model = load_model(tiny_model_dir)
    with pytest.raises(ValueError, match=f"up to {MAX_COMPILED_ROWS} rows, not 129"):
        FrameStepper(model, MAX_COMPILED_ROWS + 1, use_graphs=False, compile_backend="eager")


def test_csm_compile_is_off_by_default_and_checked():
    assert load_settings({}).compile is False
    assert load_settings({"CSM_COMPILE": "1"}).compile is True
    assert load_settings({"CSM_COMPILE": "1", "CSM_MAX_CONCURRENCY": "128"}).compile
    with pytest.raises(SettingsError, match="CSM_COMPILE must be 1 or 0"):
        load_settings({"CSM_COMPILE": "fast"})
    with pytest.raises(SettingsError, match="CSM_COMPILE=1 takes CSM_MAX_CONCURRENCY up to "
                                            "128, got 129"):
        load_settings({"CSM_COMPILE": "1", "CSM_MAX_CONCURRENCY": "129"})


def test_the_compile_cache_goes_on_the_network_volume(tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    on = load_settings({"CSM_COMPILE": "1", "CSM_VOLUME_DIR": str(volume)})
    environ: dict[str, str] = {}
    assert compile_backend(on, environ) == "inductor"
    assert environ == {"TORCHINDUCTOR_CACHE_DIR": str(volume / "torchinductor")}
    # A cache the user chose stays; without a volume torch's default stays.
    chosen = {"TORCHINDUCTOR_CACHE_DIR": "/cache"}
    assert compile_backend(on, chosen) == "inductor"
    assert chosen == {"TORCHINDUCTOR_CACHE_DIR": "/cache"}
    no_volume = load_settings({"CSM_COMPILE": "1", "CSM_VOLUME_DIR": str(tmp_path / "none")})
    environ = {}
    assert compile_backend(no_volume, environ) == "inductor" and environ == {}
    # Off: nothing compiled, nothing set.
    assert compile_backend(load_settings({"CSM_VOLUME_DIR": str(volume)}), environ) is None
    assert environ == {}
