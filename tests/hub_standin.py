"""A stand-in for the Hugging Face hub: a local HTTP server that answers `huggingface_hub`'s
file requests (HEAD and GET on /{repo}/resolve/{revision}/{path}, byte ranges included) from a
folder laid out as <root>/<owner>/<name>/<path in repo>.

The real `huggingface_hub` client talks to it (point it there with HF_ENDPOINT), so downloads,
resumes and errors go through the real code. Only the hub itself is replaced. It can cut a
file's transfer at a byte offset (a dropped connection) and records every request it serves.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")


@dataclass
class Request:
    method: str
    repo: str
    path: str
    range: str | None
    authorization: str | None
    bytes_sent: int = 0


@dataclass
class StandinHub:
    root: Path
    requests: list[Request] = field(default_factory=list)
    # repo path -> absolute byte offset where every transfer of that file is cut off
    cut_at: dict[str, int] = field(default_factory=dict)
    _etags: dict[Path, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest's output clean
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "StandinHub":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def served(self, path: str, method: str = "GET") -> list[Request]:
        return [r for r in self.requests if r.path == path and r.method == method]

    def etag(self, file: Path) -> str:
        """The sha256 of the content, as the hub gives LFS files."""
        if file not in self._etags:
            self._etags[file] = hashlib.sha256(file.read_bytes()).hexdigest()
        return self._etags[file]

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        match = RESOLVE.match(handler.path)
        record = Request(handler.command, match["repo"] if match else "", match["path"] if match else "",
                         handler.headers.get("Range"), handler.headers.get("Authorization"))
        self.requests.append(record)
        if match is None:
            return self.refuse(handler, 404, "EntryNotFound")
        file = self.root / match["repo"] / match["path"]
        if not file.is_file():
            return self.refuse(handler, 404, "EntryNotFound")
        size = file.stat().st_size
        start = 0
        if record.range:
            start = int(re.match(r"bytes=(\d+)-", record.range)[1])
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{self.etag(file)}"')
        handler.send_header("Content-Length", str(size - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        handler.end_headers()
        if not body:
            return
        end = min(size, self.cut_at.get(match["path"], size))
        with open(file, "rb") as f:
            f.seek(start)
            while start < end:
                chunk = f.read(min(1 << 20, end - start))
                handler.wfile.write(chunk)
                start += len(chunk)
                record.bytes_sent += len(chunk)
        if end < size:  # the connection drops mid-file
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)

    @staticmethod
    def refuse(handler: BaseHTTPRequestHandler, status: int, code: str) -> None:
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("Content-Length", "0")
        handler.end_headers()


def hub_tree(root: Path, model_dir: Path, remotes: list) -> Path:
    """<root>/<owner>/<name>/<path> for each builder.fetch_weights.Remote, hard-linked from a
    model folder laid out as the fetcher writes it (no copies of the big files)."""
    for remote in remotes:
        target = root / remote.repo / remote.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                target.hardlink_to(model_dir / remote.dest)
            except OSError:  # another filesystem
                shutil.copyfile(model_dir / remote.dest, target)
    return root
