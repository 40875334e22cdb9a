"""Reference audio given as a link: a context turn's `audio_url` (worker/audio_fetch.py).

The links point at a local HTTP server of this test (the caller's file host is the outside
world): files, a missing one, redirects, a file larger than the budget, one that trickles.
The worker is the tiny RANDOM-weight model: its audio is noise, not speech.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from worker.audio_fetch import check_url, fetch_audio
from worker.audio_io import AudioInputError
from worker.service import Worker
from worker.settings import SettingsError, load_settings
from worker_helpers import audio_b64, audio_file, collect, run

CLIP = audio_file(0.5, rate=16_000)  # 16 kB
BIG = b"\0" * 200_000


class Files(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        if path == "/clip.wav":
            self._send(200, CLIP)
        elif path == "/big.wav":
            self._send(200, BIG)
        elif path == "/big-unannounced.wav":  # no Content-Length: the body ends at close
            self.send_response(200)
            self.end_headers()
            self.wfile.write(BIG)
            self.close_connection = True
        elif path == "/trickle.wav":
            self.send_response(200)
            self.send_header("Content-Length", str(len(CLIP)))
            self.end_headers()
            try:
                for byte in CLIP[:40]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except ConnectionError:
                pass  # the worker gave up on it, as it should
        elif path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", path[len("/to"):] if path != "/to/file" else
                             "file:///etc/passwd")
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        else:
            self._send(404, b"no such file")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def files():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fetch(url: str, max_bytes: int = 100_000, timeout_s: float = 5.0) -> bytes:
    return fetch_audio("context[0].audio_url", url, max_bytes, timeout_s, public_only=False)


def refused(url: str, *needles: str, **kwargs) -> str:
    with pytest.raises(AudioInputError) as error:
        fetch(url, **kwargs)
    message = str(error.value)
    assert message.startswith("context[0].audio_url: "), message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# ---- fetching ---------------------------------------------------------------------------------
def test_a_file_is_fetched_whole_and_through_redirects(files):
    assert fetch(f"{files}/clip.wav") == CLIP
    assert fetch(f"{files}/to/clip.wav") == CLIP


def test_what_cant_be_fetched_is_refused_by_field_with_the_reason(files):
    message = refused(f"{files}/missing.wav?X-Amz-Signature=s3cret", "HTTP 404",
                      f"{files}/missing.wav")
    assert "s3cret" not in message  # a presigned link's signature stays out of errors
    refused(f"{files}/loop", "more than 3 redirects")
    refused(f"{files}/to/file", "must be an http or https URL, got 'file:///etc/passwd'")
    refused(f"{files}/big.wav", "at least 200000 bytes, over the 100000 bytes left",
            "CSM_MAX_REFERENCE_BYTES")
    refused(f"{files}/big-unannounced.wav", "over the 100000 bytes left")
    refused("http://127.0.0.1:9/clip.wav", "could not fetch http://127.0.0.1:9/clip.wav")


def test_a_server_that_trickles_is_cut_off_at_the_deadline(files):
    started = time.monotonic()
    refused(f"{files}/trickle.wav", "not fetched within 1 s (CSM_AUDIO_URL_TIMEOUT_S)",
            timeout_s=1.0)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("url, needle", [
    ("http://127.0.0.1:8000/clip.wav", "'127.0.0.1' is a loopback address (127.0.0.1)"),
    ("http://localhost/clip.wav", "'localhost' is a loopback address"),
    ("http://10.1.2.3/clip.wav", "'10.1.2.3' is a private address (10.1.2.3)"),
    ("http://169.254.169.254/latest/meta-data/", "is a link-local address (169.254.169.254)"),
    ("http://[::1]/clip.wav", "'::1' is a loopback address"),
    ("ftp://example.com/clip.wav", "must be an http or https URL"),
])
def test_only_public_addresses_are_fetched_by_default(url, needle):
    with pytest.raises(AudioInputError) as error:
        fetch_audio("context[0].audio_url", url, 100_000, 5.0)
    assert needle in str(error.value), error.value
    assert "CSM_AUDIO_URLS=any" in str(error.value) or "http or https" in str(error.value)


@pytest.mark.parametrize("public_only", [True, False])
@pytest.mark.parametrize("url, needle", [
    ("http://x:abc/a.wav", "not a valid URL (Port could not be cast to integer value"),
    ("http://1.2.3.4:99999/a.wav", "not a valid URL (Port out of range"),
    ("http://[::1/a.wav", "not a valid URL (Invalid IPv6 URL)"),
    ("http://" + "a" * 64 + ".com/a.wav", "encoding with 'idna' codec failed"),
])
def test_a_malformed_link_is_refused_by_field_not_an_internal_error(url, needle, public_only):
    with pytest.raises(AudioInputError) as error:
        fetch_audio("context[0].audio_url", url, 100_000, 5.0, public_only=public_only)
    assert str(error.value).startswith("context[0].audio_url: ") and needle in str(error.value)


def test_a_public_address_passes_the_check():
    check_url("context[0].audio_url", "https://8.8.8.8/clip.wav", public_only=True)


# ---- the worker -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker(tiny_model_dir) -> Worker:
    return Worker.start(load_settings({
        "CSM_MODEL_DIR": str(tiny_model_dir), "CSM_DEVICE": "cpu",
        "CSM_MAX_REFERENCE_BYTES": "40000", "CSM_AUDIO_URLS": "any"}))


def speak(worker, loop, *context: dict) -> dict:
    (answer,) = run(loop, collect(worker, {"text": "After a linked clip.", "seed": 5,
                                           "max_audio_length_ms": 160, "context": list(context)}))
    return answer


def turn(**audio: str) -> dict:
    return {"text": "A tone.", "speaker": 0, **audio}


def test_a_linked_clip_is_the_same_context_as_the_clip_itself(worker, loop, files):
    linked = speak(worker, loop, turn(audio_url=f"{files}/clip.wav"))
    inline = speak(worker, loop, turn(audio_base64=audio_b64(0.5, rate=16_000)))
    assert "error" not in linked, linked
    assert linked["audio_base64"] == inline["audio_base64"]
    silent = speak(worker, loop)  # and the clip did count: without it the audio differs
    assert silent["audio_base64"] != linked["audio_base64"]


def test_linked_and_inline_clips_share_the_byte_budget(worker, loop, files):
    inline = audio_b64(0.9, rate=16_000)  # 28.8 kB of the 40 kB
    error = speak(worker, loop, turn(audio_base64=inline),
                  turn(audio_url=f"{files}/clip.wav"))["error"]
    assert error.startswith("context[1].audio_url: at least 16044 bytes, over the"), error


def test_a_turn_gives_its_audio_one_way(worker, loop):
    for audio, needle in [({}, "context[0]: give exactly one of audio_base64 or audio_url"),
                          ({"audio_base64": "AAAA", "audio_url": "https://x.org/a.wav"},
                           "context[0]: give exactly one of audio_base64 or audio_url"),
                          ({"audio_url": "file:///etc/passwd"},
                           "context[0].audio_url: must be an http or https URL")]:
        error = speak(worker, loop, turn(**audio))["error"]
        assert error == needle, error


def test_the_operator_decides_which_links_are_fetched(worker, loop, files, monkeypatch):
    url = f"{files}/clip.wav"
    monkeypatch.setattr(worker, "settings", replace(worker.settings, audio_urls="public"))
    error = speak(worker, loop, turn(audio_url=url))["error"]
    assert "'127.0.0.1' is a loopback address" in error, error
    monkeypatch.setattr(worker, "settings", replace(worker.settings, audio_urls="off"))
    error = speak(worker, loop, turn(audio_url=url))["error"]
    assert error == ("context[0].audio_url: this worker fetches no URLs (CSM_AUDIO_URLS=off); "
                     "send the clip as audio_base64")
    assert load_settings({}).audio_urls == "public"
    with pytest.raises(SettingsError, match="CSM_AUDIO_URLS must be public, any or off"):
        load_settings({"CSM_AUDIO_URLS": "all"})


def test_verify_watermark_takes_a_link_too(worker, loop, files):
    def verify(**audio: str) -> dict:
        (answer,) = run(loop, collect(worker, {"task": "verify_watermark", **audio}))
        return answer

    linked = verify(audio_url=f"{files}/clip.wav")
    assert set(linked) == {"task", "watermarked"}, linked
    assert linked == verify(audio_base64=audio_b64(0.5, rate=16_000))
    assert verify(audio_url=f"{files}/missing.wav") == {
        "error": f"audio_url: the server answered HTTP 404 (Not Found) for {files}/missing.wav"}
    assert verify() == {"error": "give exactly one of audio_base64 or audio_url"}
