"""What the tests of the HTTP mode share: a real uvicorn server on 127.0.0.1 in a thread, and
readers for what it answers."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import uvicorn

from worker.http_app import Runtime

SEND_BUFFER = 32 * 1024


class Server:
    """uvicorn serving `app` on 127.0.0.1 from a thread, as `python handler.py` would."""

    def __init__(self, app, max_size: int):
        self.socket = socket.socket()
        # A small send buffer (inherited by each accepted connection), as on a path that
        # buffers little: a client that stops reading is felt after a few sends, not after
        # the kernel of this machine's loopback has taken megabytes.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    ws_max_size=max_size))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "no server"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.socket.close()


def wait_idle(runtime: Runtime, seconds: float = 3.0) -> None:
    """No job in the engine and no slot held: what a freed slot looks like."""
    deadline = time.monotonic() + seconds
    while (runtime.worker.engine.scheduler.active_jobs or runtime.admission.running) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert runtime.worker.engine.scheduler.active_jobs == 0
    assert runtime.admission.running == 0


def pcm(data: bytes) -> np.ndarray:
    assert len(data) % 2 == 0
    return np.frombuffer(data, dtype="<i2")


def ws_messages(ws, until: str) -> tuple[list[dict], bytes]:
    """JSON messages and audio bytes received up to and including the message `until`."""
    messages, audio = [], b""
    while True:
        message = ws.recv(30)
        if isinstance(message, bytes):
            audio += message
            continue
        messages.append(json.loads(message))
        if messages[-1]["type"] in (until, "error"):
            return messages, audio
