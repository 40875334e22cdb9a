"""Shared fixtures: tiny model folders with RANDOM weights (noise, not speech), built once; an
event loop per module; a stand-in S3 store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from csm.testing import make_tiny


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """`make test` runs one test process per core, and in each the loop thread and the test
    thread share that core: one intra-op thread each avoids oversubscription, which slows
    small kernels by 10x on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loop():
    """An event loop of the module's own, for tests that drive a Worker's async API."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def fresh_compiler():
    """Dynamo remembers, per function, which dimensions changed in earlier compiles and
    compiles those symbolic at once: a test that counts a new engine's compiled versions
    starts from a process that has compiled nothing."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The original-format tiny folder, shared read-only by every test that needs one."""
    return make_tiny(tmp_path_factory.mktemp("tiny-original"), "original")


@pytest.fixture(scope="session")
def tiny_transformers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny-transformers"), "transformers")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A stand-in for an S3-compatible store (moto's server on 127.0.0.1): the worker's real
    boto3 client speaks S3's HTTP protocol to it, so uploads, presigned URLs and errors go
    through the real code; only the store is replaced. Each test makes its own bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
