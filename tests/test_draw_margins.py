"""Draw margins (csm/testing/draw_margins.py): how the GPU chaos run tells a rounding tie from a
state bug, on the tiny RANDOM-weight model."""

from __future__ import annotations

import pytest
import torch

from csm.conversation import FRAME_MS
from csm.engine import Engine, GenerationRequest, Utterance
from csm.sampling import kth_index, sample_topk
from csm.testing import chaos, draw_margins
from csm.testing.draw_margins import draw_margin, joined, parting, record_margins

REQUEST = GenerationRequest(text="one two three.", seed=7, topk=5, temperature=0.9,
                            max_audio_length_ms=6 * FRAME_MS, stop_at_end_frame=False,
                            then=(Utterance(1, "And more.", 3 * FRAME_MS),))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with Engine.load(tiny_model_dir, device="cpu", max_batch=3) as engine:
        yield engine


@pytest.fixture(scope="module")
def alone(engine):
    return record_margins(engine, REQUEST)


def draw(scaled: torch.Tensor, gumbel: torch.Tensor, topk: int) -> int:
    kth = kth_index(torch.tensor([topk]), len(scaled))
    return int(sample_topk(scaled[None], torch.ones(1), kth, gumbel[None])[0])


def test_no_nudge_under_half_the_margin_changes_a_draw():
    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        v = int(torch.randint(2, 40, (1,), generator=gen))
        scaled = torch.randn(v, generator=gen)
        gumbel = -torch.log(-torch.log(torch.rand(v, generator=gen)))
        topk = int(torch.randint(1, v + 2, (1,), generator=gen))
        margin, winner = draw_margin(scaled, gumbel, topk)
        assert winner == draw(scaled, gumbel, topk), trial
        nudge = (torch.rand(v, generator=gen) * 2 - 1) * 0.49 * margin
        worst = torch.where(torch.arange(v) == winner, -1.0, 1.0) * 0.49 * margin
        for delta in (nudge, worst):
            assert draw(scaled + delta, gumbel, topk) == winner, trial


def test_the_margin_is_the_nearest_way_to_change_the_draw():
    # Top-2 over all: the best score (3.0) leads the second (2.5) by 0.5.
    scaled, gumbel = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([2.0, 0.5, 0.0])
    assert draw_margin(scaled, gumbel, 3) == (pytest.approx(0.5), 0)
    # Top-1: only the largest logit is a candidate; token 0 must pass it (by 1.0) to win.
    assert draw_margin(scaled, gumbel, 1) == (pytest.approx(1.0), 1)
    # Top-2 with token 2 below (1.0 from the k-th logit, 3.0 from the best score): the
    # top two scores are nearer.
    assert draw_margin(scaled, gumbel, 2) == (pytest.approx(0.5), 0)
    # The winner is the k-th: it leaves if the logit below it comes within 0.25.
    scaled, gumbel = torch.tensor([2.0, 1.0, 0.75]), torch.tensor([0.0, 5.0, -9.0])
    assert draw_margin(scaled, gumbel, 2) == (pytest.approx(0.25), 1)
    # The winner ranks second of the top 3: it leaves if the logit below the 3rd comes within
    # 0.2 of it.
    scaled, gumbel = torch.tensor([2.0, 1.0, 0.9, 0.8]), torch.tensor([0.0, 5.0, 0.0, -9.0])
    assert draw_margin(scaled, gumbel, 3) == (pytest.approx(0.2), 1)
    assert draw(scaled + torch.tensor([0.0, -0.101, 0.101, 0.101]), gumbel, 3) == 0
    # A token below with a high score: 0.1 from entering, 0.3 from winning -> 0.3. Half of
    # that and a little more lets it enter and win; a little less does not.
    scaled, gumbel = torch.tensor([2.0, 1.0, 0.9]), torch.tensor([0.0, 0.0, 0.8])
    assert draw_margin(scaled, gumbel, 2) == (pytest.approx(0.3), 0)
    assert draw(scaled + torch.tensor([-0.151, 0.0, 0.151]), gumbel, 2) == 2
    assert draw(scaled + torch.tensor([-0.149, 0.0, 0.149]), gumbel, 2) == 0


def test_the_probe_draws_what_the_engine_draws_and_records_every_draw(engine, alone):
    assert torch.equal(joined(alone.pieces, 32), engine.generate(REQUEST).codes)
    assert [p.shape[1] for p in alone.pieces] == [6, 3]
    assert sorted(alone.margins) == [(0, f) for f in range(6)] + [(1, f) for f in range(3)]
    margins = torch.stack(list(alone.margins.values()))
    assert margins.shape == (9, 32) and bool((margins > 0).all())


def changed(pieces: list[torch.Tensor], piece: int, frame: int, codebook: int):
    pieces = [p.clone() for p in pieces]
    pieces[piece][codebook, frame] = (pieces[piece][codebook, frame] + 1) % 2048
    return pieces


def test_a_parting_is_found_at_its_first_draw_with_that_draws_margin(alone):
    assert parting(alone.pieces, alone, prefix=False) is None
    got = changed(changed(changed(alone.pieces, 1, 2, 0), 0, 5, 2), 0, 4, 7)
    found = parting(got, alone, prefix=False)
    assert (found.piece, found.frame, found.codebook) == (0, 4, 7)
    assert found.margin == pytest.approx(float(alone.margins[0, 4][7]))
    assert not found.is_rounding  # margins here are >= 3e-4: clear choices


def test_a_shorter_run_is_a_parting_unless_it_was_cancelled(alone):
    short = [alone.pieces[0][:, :4]]
    assert parting(short, alone, prefix=True) is None
    found = parting(short, alone, prefix=False)
    assert (found.piece, found.frame, found.margin) == (0, 4, float("inf"))
    longer = alone.pieces + [alone.pieces[0]]
    assert parting(longer, alone, prefix=False).margin == float("inf")


def test_chaos_accepts_only_partings_at_ties_when_not_exact(engine, alone, monkeypatch):
    spec = chaos.Spec(0, REQUEST, cancel=None, raise_on_block=None, streamed=False)
    margins = torch.stack([alone.margins[0, f] for f in range(6)])
    frame, codebook = divmod(int(margins.argmin()), 32)  # the nearest tie of piece 0
    got = changed(alone.pieces, 0, frame, codebook)
    outcome = chaos.Outcome(spec, end="completed", codes=list(enumerate(got)))
    problems = chaos._check_outcome(engine, outcome, None)  # exact
    assert problems and "differ from the same job run alone" in problems[0]
    ties = chaos.TieAllowance(jobs=20)  # one parting allowed, two probes
    problems = chaos._check_outcome(engine, outcome, ties)
    assert problems and "not a tie within rounding" in problems[0] and not ties.partings
    # Had rounding been that coarse, the same parting would be a tie.
    monkeypatch.setattr(draw_margins, "ROUNDING_MARGIN", float(margins.min()) * 1.01)
    assert chaos._check_outcome(engine, outcome, ties) == []
    assert len(ties.partings) == 1 and f"frame {frame}, codebook {codebook}" in ties.partings[0]
    # The probes are spent: a job that differs now is a problem without one.
    problems = chaos._check_outcome(engine, outcome, ties)
    assert problems and "not probed" in problems[0]
