"""Reference audio fetched from a caller's URL (a context turn's `audio_url`).

A clip too large to send as base64 (RunPod's `/run` takes 10 MB in all) can be given as a link
instead, for instance a presigned URL into the caller's own bucket. The worker fetches it with
a plain GET: at most the request's byte budget (CSM_MAX_REFERENCE_BYTES, shared with the other
turns), within CSM_AUDIO_URL_TIMEOUT_S in all, following at most MAX_REDIRECTS redirects.

Unless CSM_AUDIO_URLS=any, only public addresses are fetched: a URL (or a redirect) whose host
resolves to a loopback, private, link-local or reserved address is refused, so that a caller
can't make the worker read its own network (a cloud's metadata service, say). The check runs
on each hop before it connects; a DNS answer that changes between the check and the connection
is not caught (the platform's network policy is the stronger guard).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin, urlsplit

from .audio_io import AudioInputError

MAX_REDIRECTS = 3
READ_BYTES = 64 * 1024
USER_AGENT = "csm-runpod-worker"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects come back as responses: each hop is checked before it is followed."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def fetch_audio(field: str, url: str, max_bytes: int, timeout_s: float,
                public_only: bool = True) -> bytes:
    """The bytes at `url`, or AudioInputError naming `field` and what went wrong."""
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        check_url(field, url, public_only)
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        try:
            with _OPENER.open(request, timeout=_left(field, deadline, timeout_s)) as response:
                return _read(field, response, max_bytes, deadline, timeout_s)
        except urllib.error.HTTPError as e:
            location = e.headers.get("Location") if 300 <= e.code < 400 else None
            e.close()
            if location is None:
                raise AudioInputError(f"{field}: the server answered HTTP {e.code} "
                                      f"({e.reason}) for {_where(url)}") from None
            url = urljoin(url, location)
        except AudioInputError:
            raise
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise _timed_out(field, timeout_s) from None
            raise AudioInputError(f"{field}: could not fetch {_where(url)} ({reason})") from None
        except (ValueError, http.client.HTTPException) as e:  # a host or port urllib refuses
            raise AudioInputError(f"{field}: {_where(url)} is not a URL that can be fetched "
                                  f"({e})") from None
    raise AudioInputError(f"{field}: more than {MAX_REDIRECTS} redirects")


def _read(field: str, response: http.client.HTTPResponse, max_bytes: int, deadline: float,
          timeout_s: float) -> bytes:
    announced = response.headers.get("Content-Length")
    if announced and announced.isdigit() and int(announced) > max_bytes:
        raise _too_large(field, int(announced), max_bytes)
    parts, size = [], 0
    # read1 returns what one read of the socket gives: a server that trickles bytes can't
    # outlast the deadline, which is checked between reads.
    while chunk := response.read1(READ_BYTES):
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(field, size, max_bytes)
        parts.append(chunk)
        _left(field, deadline, timeout_s)
    return b"".join(parts)


def check_url(field: str, url: str, public_only: bool) -> None:
    """Every hop: http or https (a redirect to file:// is refused), and a public host."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as e:  # a bracket left open, a port that is no number or out of range
        raise AudioInputError(f"{field}: not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise AudioInputError(f"{field}: must be an http or https URL, got {_where(url)!r}")
    if not public_only:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise AudioInputError(f"{field}: can't resolve {host!r} ({e.strerror})") from None
    except UnicodeError as e:  # a label over 63 characters, say
        raise AudioInputError(f"{field}: {host!r} is not a valid host name ({e})") from None
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if not address.is_global:
            raise AudioInputError(
                f"{field}: {host!r} is a {_kind(address)} address ({address}); this "
                "worker fetches only public addresses (CSM_AUDIO_URLS=any allows others)")


def _kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    for kind in ("loopback", "link_local", "private", "multicast", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "non-public"


def _left(field: str, deadline: float, timeout_s: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timed_out(field, timeout_s)
    return left


def _timed_out(field: str, timeout_s: float) -> AudioInputError:
    return AudioInputError(f"{field}: not fetched within {timeout_s:g} s "
                           "(CSM_AUDIO_URL_TIMEOUT_S)")


def _too_large(field: str, size: int, max_bytes: int) -> AudioInputError:
    return AudioInputError(f"{field}: at least {size} bytes, over the {max_bytes} bytes left for "
                           "context audio (CSM_MAX_REFERENCE_BYTES, all turns together)")


def _where(url: str) -> str:
    """The URL without its query: a presigned link's signature stays out of messages and logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
