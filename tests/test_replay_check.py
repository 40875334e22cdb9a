"""The start-up checks that CUDA graph replays compute what the same steps compute eagerly:
the frame step's graphs (they must draw the same codes) and Mimi's (the same audio).

No CUDA graph can be captured on this CPU, so the frame step's graphs here are stand-ins with a
graph's one method, `replay()`, that run the real frame step as a correct graph would, or as
the broken graphs the check exists for would: one that kept capture time's inputs, one that
does nothing. For Mimi, whose graphs moshi makes, a stand-in for moshi's switch tells a broken
"graphed" decode (one that ignores `exec_mask`) from the eager one. The checks themselves, the
frame step, the model and Mimi are the real ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import csm.mimi_rows
from csm.checkpoint import load_model
from csm.codec import NUM_CODEBOOKS, MimiCodec
from csm.frame_step import FrameStepper, GraphCaptureError
from csm.mimi_rows import MimiRows
from worker_helpers import start_up_error


class Replay:
    """A graph of `n` rows over `keys` positions: replays the real step (see `kind`)."""

    def __init__(self, stepper: FrameStepper, n: int, keys: int, kind: str):
        self.stepper, self.n, self.keys, self.kind = stepper, n, keys, kind
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        stepper, n = self.stepper, self.n
        if self.kind == "nothing":
            return
        if self.kind == "capture_time_inputs":  # as captured: parked rows, zero hidden states
            stepper.h[:n].zero_()
        before = stepper.h[:n].clone()
        stepper._step(n, self.keys)
        if self.kind == "last_hidden_unwritten" and self.replays % 2 == 0:
            stepper.h[:n].copy_(before)  # the codes are right, the state left behind is not
        if self.kind == "one_flip" and self.replays == 1:  # one draw turned, first trial only
            stepper.codes[0, 5] += 1


def capture_as(kind: str):
    """A stand-in for FrameStepper.capture: every (bucket, span) gets a `kind` Replay."""
    def capture(stepper: FrameStepper) -> None:
        stepper.graphs = {(n, keys): Replay(stepper, n, keys, kind)
                          for n in stepper.buckets for keys in stepper.spans}
    return capture


def stepper_with(model, kind: str, max_batch: int = 4) -> FrameStepper:
    stepper = FrameStepper(model, max_batch, use_graphs=False)
    capture_as(kind)(stepper)
    return stepper


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    model = load_model(tiny_model_dir)
    model.setup_caches(4)
    return model


def test_graphs_that_replay_the_step_pass_and_leave_every_row_parked(model):
    stepper = stepper_with(model, "correct")
    stepper.check_replay()
    checked = {shape: g.replays for shape, g in stepper.graphs.items() if g.replays}
    # every bucket, the spans taken in turn, one trial of two steps each
    assert checked == {(1, 512): 2, (2, 1024): 2, (4, 1536): 2}
    assert (stepper.remaining == 0).all() and (stepper.position == stepper.park_position).all()
    assert not stepper.h.any()


@pytest.mark.parametrize("kind", ["capture_time_inputs", "nothing", "last_hidden_unwritten"])
def test_a_graph_that_does_not_draw_what_eager_steps_draw_stops_start_up(model, kind):
    stepper = stepper_with(model, kind)
    with pytest.raises(GraphCaptureError) as info:
        stepper.check_replay()
    assert str(info.value).startswith(
        "the CUDA graph of 1 rows over 512 positions disagrees with the same steps run "
        "eagerly (rows agreeing: 0 and 0 of 1); CSM_CUDA_GRAPHS=0 serves without graphs")
    assert (stepper.remaining == 0).all() and not stepper.h.any()


def test_the_checks_time_is_its_own_start_up_entry(tiny_model_dir, monkeypatch):
    from csm.engine import Engine

    monkeypatch.setattr(FrameStepper, "capture", capture_as("correct"))
    with Engine.load(tiny_model_dir, device="cpu", max_batch=2, use_graphs=True) as engine:
        checked = engine.startup_ms["graph_check"]
        assert checked > engine.scheduler.stepper.check_ms > 0  # frame step, then Mimi
    with Engine.load(tiny_model_dir, device="cpu", max_batch=2) as engine:
        assert "graph_check" not in engine.startup_ms


def test_a_draw_turned_by_rounding_in_one_trial_is_forgiven(model):
    stepper = stepper_with(model, "one_flip")
    stepper.check_replay()
    assert stepper.graphs[1, 512].replays == 4  # the one row disagreed: a second trial


def mimi_rows(tiny_model_dir: Path) -> MimiRows:
    return MimiRows(MimiCodec.load(tiny_model_dir / "mimi").streamer, [1, 2, 4])


def mimi_graphs_ignoring_exec_mask(codec: MimiCodec, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside moshi's `no_cuda_graph()` (a stand-in for it here), Mimi's decode advances
    every row's state, paused or not, as a graph replay that ignored exec_mask would."""
    graphed = [True]

    @contextmanager
    def no_cuda_graph():
        graphed[0] = False
        try:
            yield
        finally:
            graphed[0] = True

    set_exec_mask = codec.streamer.set_exec_mask
    monkeypatch.setattr(csm.mimi_rows, "no_cuda_graph", no_cuda_graph)
    monkeypatch.setattr(codec.streamer, "set_exec_mask",
                        lambda mask: set_exec_mask(mask | graphed[0]))


def first_frames(rows: MimiRows) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2048, (2, 4, NUM_CODEBOOKS), generator=generator)
    return torch.stack([rows.decode(codes[s], torch.ones(4, dtype=torch.bool))
                        for s in range(2)])


def test_the_mimi_check_is_exact_without_cuda_and_leaves_every_row_reset(tiny_model_dir):
    rows = mimi_rows(tiny_model_dir)
    assert [rows.graph_error(b, 2048) for b in (1, 2, 4)] == [0.0, 0.0, 0.0]
    assert torch.equal(first_frames(rows), first_frames(mimi_rows(tiny_model_dir)))


def test_a_mimi_decode_that_ignores_exec_mask_is_caught(tiny_model_dir, monkeypatch):
    codec = MimiCodec.load(tiny_model_dir / "mimi")
    mimi_graphs_ignoring_exec_mask(codec, monkeypatch)
    rows = MimiRows(codec.streamer, [1, 2, 4])
    assert rows.graph_error(1, 2048) > 0.1
    assert rows.graph_error(4, 2048) > 0.1


def start_up_fails(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                   caplog: pytest.LogCaptureFixture, frame_graphs: str) -> str:
    """The worker's start-up with graphs on, capture (a stand-in here) installing
    `frame_graphs` graphs: the one line it exits with."""
    monkeypatch.setattr(FrameStepper, "capture", capture_as(frame_graphs))
    message = start_up_error(tiny_model_dir, monkeypatch, caplog, CSM_CUDA_GRAPHS="1")
    assert message.endswith("CSM_CUDA_GRAPHS=0 serves without graphs, slower")
    return message


def test_a_disagreeing_frame_graph_ends_start_up_in_one_line_that_names_the_switch(
        tiny_model_dir, monkeypatch, caplog) -> None:
    message = start_up_fails(tiny_model_dir, monkeypatch, caplog, "nothing")
    assert message.startswith("the worker cannot start: the CUDA graph of 1 rows over 512 "
                              "positions disagrees with the same steps run eagerly")


def test_a_disagreeing_mimi_graph_ends_start_up_in_one_line_that_names_the_switch(
        tiny_model_dir, monkeypatch, caplog) -> None:
    """Frame graphs that replay the step (they pass), then Mimi's check on the worker's own
    streamer, whose "graphed" decode ignores exec_mask."""
    load = MimiCodec.load

    def load_broken(folder: Path, device: str = "cpu") -> MimiCodec:
        codec = load(folder, device)
        mimi_graphs_ignoring_exec_mask(codec, monkeypatch)
        return codec

    monkeypatch.setattr(MimiCodec, "load", staticmethod(load_broken))
    message = start_up_fails(tiny_model_dir, monkeypatch, caplog, "correct")
    assert message.startswith("the worker cannot start: Mimi's streaming decode of 1 rows "
                              "under CUDA graphs differs from the same decode without them by ")
