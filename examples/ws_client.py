"""Speak text as it arrives (here: word by word, as an LLM would write it) over the HTTP mode's
WebSocket, and save the audio as it comes back.

    # the local server started by `make serve-http`
    python examples/ws_client.py --url ws://127.0.0.1:8000 \\
        --text "Hello there. This is spoken as it is written." --out hello.wav
    # a deployed load-balancing endpoint
    RUNPOD_API_KEY=... python examples/ws_client.py --url wss://ENDPOINT_ID.api.runpod.ai \\
        --text "Hello there." --out hello.wav

Each sentence starts speaking as soon as the next words show it ended; every binary message
is appended to the file, which is complete (one WAV) when the server says "done".
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from websockets.sync.client import connect

PATH = "/v1/audio/speech/stream"


def send_words(ws, text: str, delay: float) -> None:
    """The text in pieces with pauses between them, then `end`."""
    for i, word in enumerate(text.split(" ")):
        ws.send(json.dumps({"type": "text", "text": word if i == 0 else " " + word}))
        time.sleep(delay)
    ws.send(json.dumps({"type": "end"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="ws://host:port or wss://ENDPOINT_ID...")
    parser.add_argument("--text", required=True)
    parser.add_argument("--voice", default="conversational_a")
    parser.add_argument("--format", default="wav", choices=["wav", "pcm", "mp3", "aac", "flac",
                                                            "ogg", "opus"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-audio-length-ms", type=int, help="cap on each sentence's audio")
    parser.add_argument("--word-delay", type=float, default=0.05,
                        help="seconds between words, as an LLM streams them")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    key = os.environ.get("RUNPOD_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else None
    start = {"type": "start", "voice": args.voice, "response_format": args.format}
    if args.seed is not None:
        start["seed"] = args.seed
    if args.max_audio_length_ms is not None:
        start["max_audio_length_ms"] = args.max_audio_length_ms
    started = time.monotonic()
    with connect(args.url.rstrip("/") + PATH, additional_headers=headers,
                 max_size=None) as ws, args.out.open("wb") as out:
        ws.send(json.dumps(start))
        sender = threading.Thread(target=send_words, args=(ws, args.text, args.word_delay))
        sender.start()
        first_audio = None
        for message in ws:
            if isinstance(message, bytes):
                first_audio = first_audio or time.monotonic() - started
                out.write(message)
                continue
            event = json.loads(message)
            if event["type"] == "sentence":
                print(f"speaking {event['index']}: {event['text']!r}")
            elif event["type"] == "error":
                print(f"error: {event['message']}")
            elif event["type"] == "done":
                print(f"done: {event['sentences']} sentences, {event['duration_ms']:.0f} ms "
                      f"of audio, first audio after {1000 * (first_audio or 0):.0f} ms")
        sender.join()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
