"""CSM_COMPILE: the frame step (depth decoder, sampling, the backbone's pass over the frame)
compiled by torch.compile at start-up.

The engine test compiles with a backend that runs dynamo's graphs as they are (what its
"eager" backend does) and counts them: dynamo traces the real frame step exactly as for
inductor (fullgraph=True fails on any graph break) and the product wiring runs unchanged,
without the minutes inductor spends generating CPU kernels. Inductor itself runs in the GPU
suite's `compiled` part.
"""

from __future__ import annotations

import pytest
import torch

from csm.checkpoint import load_model
from csm.config import TINY
from csm.engine import Engine, GenerationRequest
from csm.frame_step import CompileError, FrameStepper
from csm.llama import apply_rope, rope_table
from worker.model_source import compile_backend
from worker.settings import SettingsError, load_settings


def requests() -> list[GenerationRequest]:
    return [GenerationRequest(text=f"Sentence number {s}.", max_audio_length_ms=640, seed=s)
            for s in range(3)]


def test_a_compiled_engine_compiles_eight_small_versions_at_start_up_and_draws_the_same_codes(
        tiny_model_dir, fresh_compiler):
    with Engine.load(tiny_model_dir, device="cpu", max_batch=4) as plain:
        expected = [plain.generate(r).codes for r in requests()]
    graphs = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    with Engine.load(tiny_model_dir, device="cpu", max_batch=4, compile_backend=backend) as engine:
        # Buckets 1, 2 and 4, codebooks 2..31, key spans 512..2048: decode_first twice (batch
        # 1, then any batch), decode_next three times (batch 1 and codebook 2, then any
        # codebook, then any batch), feed_frame three times (batch 1 and span 512, then any
        # span, then any batch).
        assert len(graphs) == 8
        assert engine.startup_ms["compile"] > 0
        # Any compile after start-up (a bucket not compiled there) now raises in the job.
        torch.compiler.set_stance("fail_on_recompile")
        try:
            alone = engine.generate(requests()[0]).codes  # bucket 1
            running = [engine.start(r) for r in requests()]  # bucket 4
            together = [engine.finish(g, list(g.blocks())).codes for g in running]
        finally:
            torch.compiler.set_stance("default")
    assert torch.equal(alone, expected[0])
    for got, want in zip(together, expected):
        assert torch.equal(got, want)


def test_every_bucket_is_compiled_over_every_key_span_at_start_up(tiny_model_dir,
                                                                  fresh_compiler):
    """A job whose rows pass 512 positions steps over a longer span: compiled at start-up too,
    or its first step there would compile (minutes on a GPU, inside a job)."""
    model = load_model(tiny_model_dir)
    model.setup_caches(4)
    stepper = FrameStepper(model, 4, use_graphs=False, compile_backend="eager")
    assert len(stepper.spans) == 4
    torch.compiler.set_stance("fail_on_recompile")
    try:
        with torch.inference_mode():
            for n in stepper.buckets:
                for keys in stepper.spans:
                    stepper.step(n, keys)
    finally:
        torch.compiler.set_stance("default")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_rope_written_out_is_the_complex_product(dtype):
    """Compiled code rotates with real arithmetic (inductor has no complex kernels)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, TINY.decoder.head_size, dtype=dtype)
    rope = rope_table(TINY.decoder)[torch.randint(0, TINY.decoder.max_seq_len, (2, 5))]
    compiled = torch.compile(apply_rope, backend="eager", fullgraph=True)(x, rope)
    eager = apply_rope(x, rope)
    assert compiled.dtype == eager.dtype == dtype
    rtol = 1e-6 if dtype == torch.float32 else 2 ** -7  # bf16: at most a rounding apart
    assert torch.allclose(compiled.float(), eager.float(), atol=1e-6, rtol=rtol)
    assert not torch.allclose(eager.float(), x.float(), atol=1e-2)  # it did rotate


def test_a_failed_compile_says_how_to_serve_without_it(tiny_model_dir):
    model = load_model(tiny_model_dir)
    model.setup_caches(1)
    with pytest.raises(CompileError, match=r"compiling the frame step failed \(.*\); "
                                           r"CSM_COMPILE=0 serves without it$"):
        FrameStepper(model, 1, use_graphs=False, compile_backend="no-such-backend")


def test_csm_compile_is_off_by_default_and_checked():
    assert load_settings({}).compile is False
    assert load_settings({"CSM_COMPILE": "1"}).compile is True
    with pytest.raises(SettingsError, match="CSM_COMPILE must be 1 or 0"):
        load_settings({"CSM_COMPILE": "fast"})


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
