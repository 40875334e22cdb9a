"""The frame step is safe to capture as a CUDA graph: it needs nothing from the host.

A graph replays the kernels it captured with the arguments they had. So a step that reads a
value back to the host (`.item()`, `bool(t)`, `nonzero`, `.tolist()`) can't be captured, and
one that takes a tensor from the host (a CPU tensor, even a 0-dim one, whose value becomes a
kernel argument) would replay capture time's value for ever. On a GPU either shows only at
start-up, as a `GraphCaptureError` or a failed replay check: in a user's first deployment.

No CUDA here, so the meta device stands in for it: a meta tensor has a device of its own and
no data, so any read to the host raises, and `HostInputs` sees every operation given a tensor
from another device. The model has the tiny shapes, built and prepared as the engine serves it, and every
batch bucket and key span the engine captures is stepped.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from csm.checkpoint import build_empty_model
from csm.config import TINY
from csm.frame_step import FrameStepper


class HostInputs(TorchDispatchMode):
    """Records every operation that is given a tensor not on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in tree_leaves((args, kwargs)):
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self.found.append(f"{func} given a {value.device} tensor {tuple(value.shape)}")
        return func(*args, **kwargs)


def meta_stepper(decoder_int8: bool = False) -> FrameStepper:
    # As csm.checkpoint.load_model builds it, in the GPU's dtype, with no weights to load.
    model = build_empty_model(TINY, torch.device("meta"), torch.bfloat16)
    model.prepare_for_serving(decoder_int8)
    model.setup_caches(4)
    return FrameStepper(model, max_batch=4, use_graphs=False)


def host_inputs_of_every_step(stepper: FrameStepper, every: bool = True) -> list[str]:
    """Steps every (bucket, span) the engine captures (or the first only); what those steps
    were given from the host."""
    shapes = [(n, keys) for n in stepper.buckets for keys in stepper.spans]
    assert len(stepper.buckets) == 3 and len(stepper.spans) == 4, shapes
    if not every:
        shapes = shapes[:1]
    with torch.inference_mode(), HostInputs() as mode:
        for n, keys in shapes:
            stepper._step(n, keys)
    return mode.found


@pytest.mark.parametrize("decoder_int8", [False, True], ids=["bf16", "int8-decoder"])
def test_every_captured_step_runs_on_the_device_alone(decoder_int8):
    stepper = meta_stepper(decoder_int8)
    assert host_inputs_of_every_step(stepper) == []
    if decoder_int8:
        assert stepper.model.decoder.layers[0].attn.wqkv.values.dtype == torch.int8


@pytest.mark.parametrize("fault, error", [
    (lambda pos: pos + pos.max().item(), "item"),
    (lambda pos: pos + int(bool((pos > 0).any())), "item"),
    (lambda pos: pos[pos.nonzero()[:, 0]], "nonzero"),
    (lambda pos: pos + len(pos.tolist()), "copy out of meta"),
    (lambda pos: pos + torch.arange(len(pos)), "device"),
], ids=["item", "bool", "nonzero", "tolist", "host-tensor"])
def test_a_step_that_reads_the_host_fails_here(monkeypatch, fault, error):
    stepper = meta_stepper()
    feed_frame = stepper.model.feed_frame
    monkeypatch.setattr(stepper.model, "feed_frame",
                        lambda codes, pos, rows, keys: feed_frame(codes, fault(pos), rows, keys))
    with pytest.raises((RuntimeError, NotImplementedError), match=error):
        host_inputs_of_every_step(stepper, every=False)


def test_a_host_scalar_tensor_in_a_step_is_found():
    """A 0-dim CPU tensor passes any device check (torch takes it as a number), so only the
    dispatch mode sees it: on CUDA its value would be captured once."""
    stepper = meta_stepper()
    feed_frame = stepper.model.feed_frame
    stepper.model.feed_frame = lambda codes, pos, rows, keys: feed_frame(
        codes, pos + torch.tensor(0), rows, keys)
    found = host_inputs_of_every_step(stepper, every=False)
    assert found and all("given a cpu tensor ()" in line for line in found)
