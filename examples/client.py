"""Call the worker and save the audio to a file you can play.

    # a deployed endpoint (RunPod API key from the environment)
    RUNPOD_API_KEY=... python examples/client.py --endpoint ENDPOINT_ID --text "Hello" --out hello.wav
    # the local server started by `make serve` (python handler.py --rp_serve_api)
    python examples/client.py --url http://127.0.0.1:8000 --text "Hello" --out hello.wav
    # streamed: chunks are appended to the file as they arrive
    python examples/client.py --endpoint ENDPOINT_ID --text "Hello" --stream --out hello.wav
    # a voice cloned from a clip of it, with what the clip says
    python examples/client.py --url ... --text "Hello" --reference me.wav \
        --reference-text "What I say in the clip." --out hello.wav
    # the voices the worker offers by name (presets and the deployment's own)
    python examples/client.py --url http://127.0.0.1:8000 --list-voices
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

# RunPod's SDK reads the same variable (a proxy, or a stand-in in tests).
API = os.environ.get("RUNPOD_ENDPOINT_BASE_URL", "https://api.runpod.ai/v2")


@dataclass(frozen=True)
class Endpoint:
    url: str
    headers: dict[str, str]
    # RunPod's API reads a job's /status and /stream with GET; the SDK's local server
    # (`--rp_serve_api`) takes them only as POST.
    poll_method: str

    def submit(self, path: str, body: dict, timeout: float) -> dict:
        return self._call("POST", path, timeout, body)

    def poll(self, what: str, job_id: str, timeout: float) -> dict:
        return self._call(self.poll_method, f"{what}/{job_id}", timeout)

    def _call(self, method: str, path: str, timeout: float, body: dict | None = None) -> dict:
        """A job's state; anything else (a wrong key, a wrong URL) ends the client, saying so."""
        reply = requests.request(method, f"{self.url}/{path}", json=body, headers=self.headers,
                                 timeout=timeout)
        try:
            state = reply.json()
        except ValueError:
            state = {}
        if not isinstance(state, dict) or "status" not in state:
            sys.exit(f"unexpected reply from /{path} (HTTP {reply.status_code}): "
                     f"{reply.text[:500]}")
        return state


def endpoint(args: argparse.Namespace) -> Endpoint:
    if args.url:
        return Endpoint(args.url.rstrip("/"), {}, "POST")
    key = os.environ.get("RUNPOD_API_KEY")
    if not key:
        sys.exit("set RUNPOD_API_KEY (RunPod console > Settings > API Keys) or pass --url")
    return Endpoint(f"{API}/{args.endpoint}", {"Authorization": f"Bearer {key}"}, "GET")


def payload(args: argparse.Namespace) -> dict:
    job = {"text": args.text, "response_format": args.format, "stream": args.stream}
    if args.voice:
        job["voice"] = args.voice
    if args.seed is not None:
        job["seed"] = args.seed
    if args.reference:
        job["context"] = [{"text": args.reference_text, "speaker": 0,
                           "audio_base64": base64.b64encode(args.reference.read_bytes()).decode()}]
    return {"input": job}


def outputs(output: object) -> list[dict]:
    """The worker's handler streams, so /runsync and /status return a list of its items."""
    items = output if isinstance(output, list) else [output]
    for item in items:
        if isinstance(item, dict) and item.get("error"):
            sys.exit(f"worker error: {item['error']}")
    return items


def run_sync(where: Endpoint, body: dict) -> list[dict]:
    reply = where.submit("runsync", body, timeout=600)
    while reply["status"] in ("IN_QUEUE", "IN_PROGRESS"):  # runsync gave up waiting
        time.sleep(1)
        reply = where.poll("status", reply["id"], timeout=60)
    if reply["status"] != "COMPLETED":
        sys.exit(f"job {reply['status']}: {reply.get('error') or json.dumps(reply)[:500]}")
    return outputs(reply["output"])


def run_stream(where: Endpoint, body: dict) -> Iterator[dict]:
    job = where.submit("run", body, timeout=60)
    while True:
        reply = where.poll("stream", job["id"], timeout=600)
        for part in reply.get("stream", []):
            yield from outputs(part["output"])
        if reply["status"] not in ("IN_QUEUE", "IN_PROGRESS"):
            if reply["status"] != "COMPLETED":
                sys.exit(f"job {reply['status']}: {reply.get('error')}")
            return


def audio_of(item: dict) -> bytes:
    """An item's audio: in it as base64, or (a whole result too large to return, from a worker
    with a bucket) behind its `audio_url`, a presigned link that needs no key."""
    if "audio_url" not in item:
        return base64.b64decode(item["audio_base64"])
    reply = requests.get(item["audio_url"], timeout=600)
    if reply.status_code != 200:
        sys.exit(f"could not fetch the audio (HTTP {reply.status_code}) from its URL")
    return reply.content


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint", help="RunPod serverless endpoint id")
    target.add_argument("--url", help="a local server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--text")
    # Not a fixed list: a deployment may add its own voices (--list-voices shows them), and
    # the worker refuses an unknown name with the list.
    parser.add_argument("--voice", help="a voice by name, or none (default: the worker's)")
    parser.add_argument("--list-voices", action="store_true",
                        help="print the worker's voices and exit")
    parser.add_argument("--reference", type=Path, help="an audio file of the voice to clone")
    parser.add_argument("--reference-text", help="what the reference says (with --reference)")
    parser.add_argument("--format", default="wav",
                        choices=["wav", "flac", "ogg", "opus", "mp3", "aac", "pcm"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.list_voices and not (args.text and args.out):
        parser.error("--text and --out are required (or --list-voices)")
    if args.reference and not args.reference_text:
        parser.error("--reference needs --reference-text: CSM is conditioned on what it says")
    where = endpoint(args)
    if args.list_voices:
        (voices,) = run_sync(where, {"input": {"task": "list_voices"}})
        print(json.dumps(voices, indent=1))
        return
    body = payload(args)
    items = run_stream(where, body) if args.stream else run_sync(where, body)
    try:
        with args.out.open("wb") as f:
            for item in items:
                f.write(audio_of(item))
                if item.get("final", True):
                    summary = {k: v for k, v in item.items() if k != "audio_base64"}
                    print(json.dumps(summary, indent=1))
    except SystemExit:  # a stream that failed midway: no half a file left to play
        args.out.unlink(missing_ok=True)
        raise
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
