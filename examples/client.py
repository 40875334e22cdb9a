"""Call the worker and save the audio to a file you can play.

    # a deployed endpoint (RunPod API key from the environment)
    RUNPOD_API_KEY=... python examples/client.py --endpoint ENDPOINT_ID --text "Hello" --out hello.wav
    # the local server started by `make serve` (python handler.py --rp_serve_api)
    python examples/client.py --url http://127.0.0.1:8000 --text "Hello" --out hello.wav
    # streamed: chunks are appended to the file as they arrive
    python examples/client.py --endpoint ENDPOINT_ID --text "Hello" --stream --out hello.wav
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

import requests

API = "https://api.runpod.ai/v2"


def base_url(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    if args.url:
        return args.url.rstrip("/"), {}
    key = os.environ.get("RUNPOD_API_KEY")
    if not key:
        sys.exit("set RUNPOD_API_KEY (RunPod console > Settings > API Keys) or pass --url")
    return f"{API}/{args.endpoint}", {"Authorization": f"Bearer {key}"}


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


def run_sync(url: str, headers: dict, body: dict) -> list[dict]:
    reply = requests.post(f"{url}/runsync", json=body, headers=headers, timeout=600).json()
    while reply.get("status") in ("IN_QUEUE", "IN_PROGRESS"):  # runsync gave up waiting
        time.sleep(1)
        reply = requests.get(f"{url}/status/{reply['id']}", headers=headers, timeout=60).json()
    if reply.get("status") != "COMPLETED":
        sys.exit(f"job {reply.get('status')}: {reply.get('error') or json.dumps(reply)[:500]}")
    return outputs(reply["output"])


def run_stream(url: str, headers: dict, body: dict):
    job = requests.post(f"{url}/run", json=body, headers=headers, timeout=60).json()
    while True:
        reply = requests.get(f"{url}/stream/{job['id']}", headers=headers, timeout=600).json()
        for part in reply.get("stream", []):
            yield from outputs(part["output"])
        if reply.get("status") not in ("IN_QUEUE", "IN_PROGRESS"):
            if reply.get("status") == "FAILED":
                sys.exit(f"job failed: {reply.get('error')}")
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="RunPod serverless endpoint id")
    where.add_argument("--url", help="a local server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--text", required=True)
    parser.add_argument("--voice", choices=["conversational_a", "conversational_b", "none"])
    parser.add_argument("--reference", type=Path, help="an audio file of the voice to clone")
    parser.add_argument("--reference-text", default="", help="what the reference says")
    parser.add_argument("--format", default="wav",
                        choices=["wav", "flac", "ogg", "opus", "mp3", "aac", "pcm"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    url, headers = base_url(args)
    body = payload(args)
    items = run_stream(url, headers, body) if args.stream else run_sync(url, headers, body)
    with args.out.open("wb") as f:
        for item in items:
            f.write(base64.b64decode(item["audio_base64"]))
            if item.get("final", True):
                summary = {k: v for k, v in item.items() if k != "audio_base64"}
                print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
