"""The engine's generation machinery against a plain frame-by-frame loop, on random weights.

The plain loop below is the reference's `generate` written out: batch 1, sync after every
frame, stop on the first all-zero frame. The engine instead runs the batched scheduler on
static buffers, checks for the end every few frames and decodes Mimi in streaming mode;
these tests show that the two draw exactly the same codes and audio.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from csm.checkpoint import load_model
from csm.engine import Engine, GenerationRequest, PromptTooLongError, Utterance
from csm.llama import attend, fold_mask
from csm.mimi_rows import MimiRows
from csm.prompt import Segment
from csm.model import SamplingState
from csm.scheduler import CHECK_EVERY, PREFILL_CHUNK, Scheduler
from csm.testing.chaos import sized_segment


def plain_generate(model, tokens, mask, max_frames, temperature, topk, seed):
    """Frame by frame like the reference, with a sync and an end check every frame."""
    model.setup_caches(1)
    rows = slice(0, 1)
    n = tokens.shape[0]
    h = model.prefill(tokens[None], mask[None], torch.arange(n)[None], rows)
    frames = []
    for i in range(max_frames):
        sampling = SamplingState(torch.tensor([temperature]), torch.tensor([topk]),
                                 torch.tensor([seed]), torch.tensor([i]))
        codes = model.decode_codes(h, sampling, rows)
        if bool((codes == 0).all()):
            break
        frames.append(codes[0])
        step = torch.cat([codes, torch.zeros(1, 1, dtype=torch.long)], dim=1)[:, None]
        step_mask = torch.ones_like(step, dtype=torch.bool)
        step_mask[..., -1] = False
        h = model.prefill(step, step_mask, torch.tensor([[n + i]]), rows)
    return torch.stack(frames, dim=1) if frames else torch.zeros(32, 0, dtype=torch.long)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(tiny_model_dir, device="cpu", max_batch=4)


@pytest.fixture(scope="module")
def plain_model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def voice(engine, tiny_model_dir):
    audio, rate = sf.read(tiny_model_dir / "prompts" / "conversational_a.wav", dtype="float32")
    return engine.segment(0, "a reference turn", torch.from_numpy(audio), rate)


def request(voice, seed=0, ms=1200, text="Hello there.", **kw):
    return GenerationRequest(text=text, speaker=0, context=(voice,), max_audio_length_ms=ms,
                             seed=seed, **kw)


@torch.inference_mode()
def test_engine_draws_the_plain_loops_codes(engine, plain_model, voice):
    for seed, topk, temperature in [(0, 50, 0.9), (7, 1, 1.0), (123, 5, 1.5)]:
        req = request(voice, seed=seed, topk=topk, temperature=temperature, ms=960)
        piece = engine.conversation(req.context).piece(req.utterances[0])
        expected = plain_generate(plain_model, piece.tokens, piece.mask, piece.max_frames,
                                  temperature, topk, seed)
        got = engine.generate(req).codes
        assert expected.shape[1] == 12
        assert torch.equal(got, expected), f"seed {seed}: codes differ"


def test_streamed_mimi_decode_equals_whole_clip_decode(engine, voice):
    result = engine.generate(request(voice, seed=3, ms=2000))
    whole = engine.codec.decode(result.codes).cpu()
    assert result.audio.shape == whole.shape == (25 * 1920,)
    assert (result.audio - whole).abs().max() < 1e-5


def test_mimi_decodes_only_the_frame_steps_bucket_of_rows(engine, voice, monkeypatch):
    """On a 4-row engine a job alone decodes one row a frame, not four; three at once, the
    bucket of 4, then fewer rows as the later slots' shorter jobs end."""
    rows, decode = [], MimiRows.decode
    monkeypatch.setattr(MimiRows, "decode", lambda self, codes, live:
                        rows.append(len(codes)) or decode(self, codes, live))
    engine.generate(request(voice, seed=1))
    assert set(rows) == {1}
    rows.clear()
    # Queued while the loop is held off (its lock is reentrant), so that all three take their
    # slots in the same step: otherwise a loaded machine can let slot 0's job run ahead alone.
    with engine.scheduler.cond:
        generations = [engine.start(request(voice, seed=s, ms=1120 - 320 * s))
                       for s in range(3)]
    for generation in generations:
        list(generation.blocks())
    assert 4 in rows and 2 in rows and rows[-1] == 1


def test_newcomers_share_one_prefill_chunk_an_iteration_beside_a_running_job(engine, voice,
                                                                             monkeypatch):
    """Three 900-position prompts arriving at once beside a running job are prefilled
    PREFILL_CHUNK positions an iteration in all, not each: the running job's next block waits
    for at most one chunk of prompt work."""
    per_iteration, spent = [], [0]
    prefill, prefill_chunk = Scheduler._prefill, Scheduler._prefill_chunk

    def counted_chunk(self, occupant, budget):
        spent[0] += (n := prefill_chunk(self, occupant, budget))
        return n

    def counted_prefill(self):
        spent[0] = 0
        prefill(self)
        per_iteration.append(spent[0])

    monkeypatch.setattr(Scheduler, "_prefill_chunk", counted_chunk)
    monkeypatch.setattr(Scheduler, "_prefill", counted_prefill)
    running = engine.start(request(voice, seed=1, ms=4000)).blocks()
    next(running)  # it is drawing frames
    rng = random.Random(0)
    newcomers = [GenerationRequest(text="Hello there.", seed=s, max_audio_length_ms=160,
                                   context=(sized_segment(engine, "Hello there.", 0, 900, rng),))
                 for s in range(3)]
    per_iteration.clear()
    with engine.scheduler.cond:
        generations = [engine.start(r) for r in newcomers]
    for generation in generations:
        list(generation.blocks())
    list(running)
    assert sum(per_iteration) == 3 * 900
    assert max(per_iteration) == PREFILL_CHUNK


def test_generate_is_reproducible_and_seed_dependent(engine, voice):
    a = engine.generate(request(voice, seed=11))
    b = engine.generate(request(voice, seed=11))
    c = engine.generate(request(voice, seed=12))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.audio, b.audio)
    assert not torch.equal(a.codes, c.codes)


def test_batched_jobs_match_jobs_run_alone_whenever_they_join(engine, voice):
    reqs = [request(voice, seed=s, ms=1200 + 160 * s, text=f"Sentence number {s}.")
            for s in range(6)]  # 6 jobs, 4 slots: two wait, then reuse freed slots
    alone = [engine.generate(r) for r in reqs]
    generations = []
    for r in reqs:
        generations.append(engine.start(r))
        time.sleep(0.05)  # staggered: jobs join a batch already running
    blocks = [list(g.blocks()) for g in generations]
    together = [engine.finish(g, b) for g, b in zip(generations, blocks)]
    # A job's audio and codes are its own, not views of the whole batch's block they would
    # keep alive.
    assert all(b.audio.untyped_storage().nbytes() == 4 * b.audio.numel()
               and b.codes.untyped_storage().nbytes() == 8 * b.codes.numel()
               for job in blocks for b in job)
    for s, (a, t) in enumerate(zip(alone, together)):
        assert torch.equal(a.codes, t.codes), f"job {s} changed when batched"
        # Their lengths (15 to 25 frames) end mid-block beside longer rows: each row's own
        # frames of the block's decode are what it hears.
        assert a.audio.shape == t.audio.shape == (a.codes.shape[1] * 1920,)
        assert (a.audio - t.audio).abs().max() < 1e-5, f"job {s}'s audio changed when batched"


@torch.inference_mode()
def test_attention_over_a_key_span_equals_the_whole_window(plain_model):
    """The masked tail of the cache adds exactly nothing, so reading only a span that holds
    every position changes no number; a span that leaves the newest position out does."""
    model = plain_model
    model.setup_caches(1)
    rows, n = slice(0, 1), 600
    x = torch.randn(1, n + 1, model.cfg.backbone.dim)
    model.backbone(x[:, :n], torch.arange(n)[None], rows)
    last = x[:, n:], torch.tensor([[n]])
    whole = model.backbone(*last, rows)
    assert torch.equal(model.backbone(*last, rows, keys=1024), whole)
    assert not torch.allclose(model.backbone(*last, rows, keys=512), whole)


@pytest.mark.parametrize("queries", [1, 7])
def test_folded_attention_is_grouped_query_attention(queries):
    """`attend` passes each key/value head's query heads as its query rows: the numbers of
    grouped-query attention with a boolean causal mask, for one new position and a prefill."""
    gen = torch.Generator().manual_seed(queries)
    b, heads, kv, keys, d = 2, 8, 2, 64, 16
    q = torch.randn(b, heads, queries, d, generator=gen)
    k, v = (torch.randn(b, kv, keys, d, generator=gen) for _ in range(2))
    pos = torch.tensor([[40 + i for i in range(queries)], [9 + i for i in range(queries)]])
    allowed = torch.arange(keys)[None, None] <= pos[..., None]  # [B, S, keys]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    got = attend(q, k, v, fold_mask(additive, heads // kv))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                              enable_gqa=True)
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(b, queries, heads * d),
                               rtol=1e-6, atol=1e-6)


class _AttentionCalls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int, torch.dtype, torch.dtype, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__:
            q, k, _, mask = args[:4]
            self.calls.append((q.shape[1], k.shape[1], q.dtype, mask.dtype,
                               bool((kwargs or {}).get("enable_gqa", False))))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_every_attention_call_is_one_a_fused_cuda_kernel_takes(tiny_model_dir, dtype):
    """Given a mask, PyTorch's memory-efficient CUDA kernel takes only equal query and
    key/value heads (flash takes no mask), and an additive mask is used as it is: a frame
    step's calls (backbone and depth decoder) must be such calls, or on a GPU they may run on
    the unfused math path."""
    model = load_model(tiny_model_dir, torch.device("cpu"), dtype)
    model.setup_caches(2)
    rows = slice(0, 2)
    sampling = SamplingState(torch.ones(2), torch.full((2,), 5), torch.arange(2),
                             torch.zeros(2, dtype=torch.long))
    seen = _AttentionCalls()
    with seen:
        model.frame_step(torch.randn(2, model.cfg.backbone.dim, dtype=dtype),
                         torch.tensor([30, 31]), sampling, rows, 512)
    layers = model.cfg.backbone.num_layers + 31 * model.cfg.decoder.num_layers
    assert len(seen.calls) == layers
    assert all(q == k and mask == q_dtype == dtype and not gqa
               for q, k, q_dtype, mask, gqa in seen.calls), set(seen.calls)


# 508: a block's last position is a span's last; 509: its last step is the span's first
# position past it (the block needs the next span from that step on)
@pytest.mark.parametrize("positions", [508, 509, 510, 512, 1022])
@torch.inference_mode()
def test_a_job_crossing_key_spans_draws_the_whole_window_codes(engine, plain_model, positions):
    """Attention reads only the key span that holds the rows' positions (512, 1024, ...):
    prompts that end just before, at and just after a span's end, stepped across it mid-block,
    draw what attending over the whole window draws (the plain loop)."""
    context = (sized_segment(engine, "Across.", 0, positions, random.Random(positions)),)
    req = GenerationRequest(text="Across.", context=context, max_audio_length_ms=8 * 80,
                            seed=positions, stop_at_end_frame=False)
    piece = engine.conversation(context).piece(req.utterances[0])
    assert piece.tokens.shape[0] == positions
    spans = []
    step = engine.scheduler.stepper.step

    def spy(n, keys):
        spans.append(keys)
        return step(n, keys)

    engine.scheduler.stepper.step = spy
    try:
        got = engine.generate(req).codes
    finally:
        del engine.scheduler.stepper.step
    expected = plain_generate(plain_model, piece.tokens, piece.mask, 8, req.temperature,
                              req.topk, req.seed)
    assert torch.equal(got, expected)
    # The smallest span that holds each block's positions, not the whole window.
    ends = [positions + 4, positions + 8]
    assert spans == [512 * -(-end // 512) for end in ends for _ in range(4)]


def test_a_whole_window_key_block_is_the_engine_before_key_spans(tiny_model_dir, engine):
    """key_block = the window (the speed benchmarks' baseline) attends over all 2048 positions
    at every step, and draws the same codes."""
    req = GenerationRequest(text="Hello there.", max_audio_length_ms=8 * 80, seed=5,
                            stop_at_end_frame=False)
    with Engine.load(tiny_model_dir, device="cpu", key_block=2048) as whole:
        spans = []
        step = whole.scheduler.stepper.step
        whole.scheduler.stepper.step = lambda n, keys: spans.append(keys) or step(n, keys)
        got = whole.generate(req).codes
    assert spans == [2048] * 8
    assert torch.equal(got, engine.generate(req).codes)


def test_end_frame_stops_a_job_mid_block_and_is_dropped(engine, voice, monkeypatch):
    """Make the model emit its end frame at frame 6 (mid-block) for one seed only."""
    model = engine.model
    original = model.decode_codes
    end_at, ending_seed = 6, 99

    def decode_codes(h, sampling, rows):
        codes = original(h, sampling, rows)
        stop = (sampling.frame_index == end_at) & (sampling.seed == ending_seed)
        return torch.where(stop[:, None], torch.zeros_like(codes), codes)

    monkeypatch.setattr(model, "decode_codes", decode_codes)
    ending = engine.start(request(voice, seed=ending_seed, ms=2000))
    other = engine.start(request(voice, seed=5, ms=2000))
    ended = engine.finish(ending, list(ending.blocks()))
    full = engine.finish(other, list(other.blocks()))
    assert end_at % CHECK_EVERY != 0
    assert ended.frames == end_at and ended.stop_reason == "end_of_speech"
    assert ended.audio.shape[0] == end_at * 1920
    assert full.frames == 25 and full.stop_reason == "max_length"


def test_prompt_too_long_is_refused_before_any_work(engine, voice):
    long_voice = type(voice)(speaker=0, text="x", codes=torch.zeros(32, 1950, dtype=torch.long))
    with pytest.raises(PromptTooLongError, match=r"positions.*max_audio_length_ms=10000"):
        engine.start(GenerationRequest(text="hi", context=(long_voice,)))
    assert engine.scheduler.active_jobs == 0


def edge_request(context, frames: int = 5) -> GenerationRequest:
    return GenerationRequest(text="Edge.", context=context, max_audio_length_ms=80 * frames,
                             stop_at_end_frame=False)


def test_the_longest_prompt_the_window_takes_runs_and_one_position_more_is_refused(engine):
    """As the reference: the prompt must be under window - frames. At that length exactly
    the last frame would land on the stepper's park position: refused before any work."""
    frames, rng = 5, random.Random(0)
    limit = engine.max_positions - frames
    fits, over = (sized_segment(engine, "Edge.", 0, n, rng) for n in (limit - 1, limit))
    utterance = edge_request((), frames).utterances[0]
    assert len(engine.conversation((fits,)).piece(utterance).tokens) == limit - 1
    assert over.codes.shape[1] == fits.codes.shape[1] + 1
    with pytest.raises(PromptTooLongError):
        engine.start(edge_request((over,), frames))
    assert engine.scheduler.active_jobs == 0 and not engine.scheduler.pending
    assert engine.generate(edge_request((fits,), frames)).frames == frames


def test_history_is_dropped_until_the_prompt_is_under_the_limit(engine):
    """Context plus one history turn exactly at the limit: the turn goes, the prompt fits."""
    frames = 5
    old = Segment(speaker=0, text="old", codes=torch.zeros(32, 10, dtype=torch.long))
    old_positions = len(engine.tokenizer.encode_turn(0, "old")) + 10 + 1  # + end of audio
    fixed = sized_segment(engine, "Edge.", 0, engine.max_positions - frames - old_positions,
                          random.Random(0))
    piece = engine.conversation((fixed,), history=(old,)).piece(
        edge_request((), frames).utterances[0])
    assert len(piece.tokens) == engine.max_positions - frames - old_positions


def test_history_is_dropped_oldest_first_to_fit_the_window(engine):
    """Utterance 3 with a context leaving room for about one earlier utterance."""
    codes = torch.zeros(32, 300, dtype=torch.long)
    conversation = engine.conversation(())
    for i in range(3):
        conversation.add(Utterance(0, f"turn {i}", 800), codes.clone())
    piece = conversation.piece(Utterance(0, "now", 80_000))
    # 80 s leaves 2048 - 1000 = 1048 positions: 3 turns of ~305 positions each fit, a 4th not.
    assert 900 < len(piece.tokens) < 1048
    piece_small = conversation.piece(Utterance(0, "now", 110_000))
    assert len(piece_small.tokens) < len(piece.tokens)  # older turns were dropped
    # The newest turns are the ones kept: the prompt ends with turn 2's audio, then "now".
    assert torch.equal(piece_small.tokens[-4], piece.tokens[-4])


def test_given_history_is_dropped_oldest_first_and_the_job_runs(engine):
    """A conversation's earlier turns (a WebSocket's sentences) that overflow the window."""
    history = tuple(Segment(0, f"turn {i}", torch.full((32, 300), i + 1)) for i in range(8))
    generation = engine.start(GenerationRequest(text="now", history=history,
                                                max_audio_length_ms=160, seed=3))
    result = engine.finish(generation, list(generation.blocks()))
    assert result.frames == 2
    tokens = generation.job.piece.tokens
    assert 1800 < len(tokens) < 2048 - 2
    kept = set(tokens[:, 0].tolist()) - {0}  # codebook 0 of the kept turns' frames
    assert kept == {3, 4, 5, 6, 7, 8}  # the newest six turns fit; the oldest went first


@torch.inference_mode()
def test_a_piece_that_ends_mid_block_beside_a_longer_row_keeps_mimi_in_step(engine, voice):
    """Beside a longer row a block runs on after a piece's last frame: that row's Mimi state
    must not advance on the block's later (invalid) frames, or the next piece's audio would
    no longer be one decode of the job's codes."""
    longer = engine.start(request(voice, seed=1, ms=2400, text="A longer job beside it.",
                                  stop_at_end_frame=False))
    pieces = engine.start(request(voice, seed=2, ms=6 * 80, text="First piece.",
                                  then=(Utterance(0, "Second piece.", 6 * 80),),
                                  stop_at_end_frame=False))
    result = engine.finish(pieces, list(pieces.blocks()))
    engine.finish(longer, list(longer.blocks()))
    assert result.frames == 12  # 6 and 6: the first piece ends two frames into a block of 4
    whole = engine.codec.decode(result.codes).cpu()
    assert (result.audio - whole).abs().max() < 1e-5


def test_a_block_steps_no_further_than_its_longest_row_needs(engine, voice, monkeypatch):
    """A job of 6 frames takes 6 steps (a block of 4, then one of 2), not 8: a step past every
    row's last frame is a whole frame's GPU time for nothing."""
    steps = []
    step = engine.scheduler.stepper.step
    monkeypatch.setattr(engine.scheduler.stepper, "step",
                        lambda n, keys: steps.append(n) or step(n, keys))
    result = engine.generate(request(voice, seed=3, ms=6 * 80, stop_at_end_frame=False))
    assert result.frames == 6 and len(steps) == 6


def test_multi_utterance_job_is_continuous_across_pieces(engine, voice):
    req = request(voice, seed=4, ms=640, text="First piece.",
                  then=(Utterance(1, "Second piece.", 640), Utterance(0, "Third.", 640)))
    result = engine.generate(req)
    assert result.frames == 24
    whole = engine.codec.decode(result.codes).cpu()
    # One Mimi state runs through the pieces: the joined audio is one decode of all codes.
    assert (result.audio - whole).abs().max() < 1e-5


def test_cancel_frees_the_slot(engine, voice):
    generation = engine.start(request(voice, seed=1, ms=8000))  # 100 frames if left alone
    blocks = generation.blocks()
    next(blocks)
    generation.cancel()
    frames = sum(block.codes.shape[1] for block in blocks)
    # Blocks the loop made before it saw the flag may still arrive, but far from all 100.
    assert frames < 50, frames
    deadline = time.time() + 10
    while engine.scheduler.active_jobs and time.time() < deadline:
        time.sleep(0.05)
    assert engine.scheduler.active_jobs == 0
    assert generation.stop_reason() == "cancelled"
    assert engine.generate(request(voice, seed=2, ms=320)).frames == 4


def test_a_failing_job_does_not_disturb_others(engine, voice, monkeypatch):
    bad = engine.start(request(voice, seed=1, ms=1600, text="bad one"))
    good = engine.start(request(voice, seed=2, ms=1600, text="good one"))
    original = bad.job.next_piece

    def explode(codes, reason):
        raise RuntimeError("boom")

    bad.job.next_piece = explode
    with pytest.raises(RuntimeError, match="boom"):
        list(bad.blocks())
    assert engine.finish(good, list(good.blocks())).frames == 20
    bad.job.next_piece = original


def test_frame_step_compiles_as_one_graph(plain_model):
    """No host sync and no data-dependent Python control flow: what CUDA graphs need."""
    model = plain_model
    model.setup_caches(2)
    rows = slice(0, 2)
    h = torch.randn(2, model.cfg.backbone.dim)
    pos = torch.tensor([5, 9])
    sampling = SamplingState(torch.tensor([0.9, 1.2]), torch.tensor([50, 3]),
                             torch.tensor([1, 2]), torch.tensor([0, 4]))
    # The eager backend traces with dynamo exactly as inductor would (fullgraph=True fails on
    # any graph break) without spending minutes generating CPU kernels.
    compiled = torch.compile(model.frame_step, fullgraph=True, dynamic=False, backend="eager")
    with torch.inference_mode():
        eager_codes, eager_h = model.frame_step(h, pos, sampling, rows)
        codes, h_next = compiled(h, pos, sampling, rows)
    assert torch.equal(codes, eager_codes)
    assert torch.equal(h_next, eager_h)


def test_counter_based_noise_is_uniform_and_row_independent():
    from csm.sampling import uniform_noise

    seeds = torch.tensor([1, 1, 2])
    counters = torch.tensor([5, 6, 5])
    u = uniform_noise(seeds, counters, 200_000)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    alone = uniform_noise(seeds[2:], counters[2:], 200_000)
    assert torch.equal(alone[0], u[2])
    hist = np.histogram(u[0].numpy(), bins=10, range=(0, 1))[0]
    assert hist.min() > 0.9 * hist.mean()


def test_topk_sampling_keeps_only_the_top_k_with_softmax_odds():
    from csm.sampling import gumbel_noise, kth_index, sample_topk

    rows = 4000
    logits = torch.arange(100, dtype=torch.float32).repeat(rows, 1)  # best token is 99
    noise = gumbel_noise(torch.arange(rows), torch.zeros(rows, dtype=torch.long), 100)
    draws = sample_topk(logits, torch.full((rows,), 1.0), kth_index(torch.full((rows,), 3), 100),
                        noise)
    assert set(draws.tolist()) == {97, 98, 99}
    # softmax over logits 97, 98, 99 at temperature 1: 0.090, 0.245, 0.665
    share = torch.bincount(draws - 97, minlength=3).float() / rows
    assert torch.allclose(share, torch.tensor([0.090, 0.245, 0.665]), atol=0.03)
    greedy = sample_topk(logits, torch.full((rows,), 0.9),
                         kth_index(torch.ones(rows, dtype=torch.long), 100), noise)
    assert set(greedy.tolist()) == {99}


def test_a_frames_draws_equal_one_draw_at_a_time():
    from csm.sampling import uniform_noise

    seed, counters = torch.tensor([7, 9]), torch.tensor([[64, 65, 66], [0, 1, 2]])
    together = uniform_noise(seed, counters, 50)
    for i in range(3):
        assert torch.equal(together[:, i], uniform_noise(seed, counters[:, i], 50))


def test_preset_prefix_is_copied_not_prefilled_and_changes_nothing(tiny_model_dir, voice):
    """A registered voice's keys and values are reused: same codes as a full prefill."""
    fresh = Engine.load(tiny_model_dir, device="cpu", max_batch=2)
    plain = fresh.generate(request(voice, seed=8, ms=800)).codes
    cached = Engine.load(tiny_model_dir, device="cpu", max_batch=2)
    cached.register_prefix(voice)
    piece = cached.conversation((voice,)).piece(Utterance(0, "Hello there.", 800))
    assert piece.prefix is not None and piece.prefix.positions == voice.codes.shape[1] + 1 + len(
        cached.tokenizer.encode_turn(0, voice.text))
    calls = []
    original = cached.model.prefill
    cached.model.prefill = lambda tokens, *a: calls.append(tokens.shape[1]) or original(tokens, *a)
    got = cached.generate(request(voice, seed=8, ms=800)).codes
    assert calls[0] == len(piece.tokens) - piece.prefix.positions  # only the new text
    assert torch.equal(got, plain)
    with pytest.raises(RuntimeError, match="before the first job"):
        cached.register_prefix(voice)
