"""The Mimi codes of callers' reference clips, kept for the next request that sends the same file.

A voice-cloning client sends the same clip with every request; reading, resampling and
Mimi-encoding it each time is paid before the first audio (a 10 s clip: ~45 ms at the tiny
test shapes on one CPU core, 1 ms to hash; BENCHMARKS.md). Codes depend on the audio alone, so
the cache is keyed by the file's bytes (BLAKE2b) whatever the turn's text and speaker. It holds
the last CSM_CLIP_CACHE_ENTRIES clips (a 10 s clip's codes are 32 kB), and only clips that were
read and encoded without error: a refused clip is refused again, for the same reason.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor


class ClipCodes:
    def __init__(self, entries: int):
        self.entries = entries  # 0: no cache
        self._codes: OrderedDict[bytes, Tensor] = OrderedDict()
        self._lock = threading.Lock()  # jobs are planned in threads of their own

    def get(self, raw: bytes, encode: Callable[[], Tensor]) -> Tensor:
        """The codes of the file `raw`: kept ones, or `encode()`'s (kept for next time)."""
        if not self.entries:
            return encode()
        key = hashlib.blake2b(raw, digest_size=32).digest()
        with self._lock:
            codes = self._codes.get(key)
            if codes is not None:
                self._codes.move_to_end(key)
                return codes
        # Encoded outside the lock: two jobs that bring the same new clip at once each encode
        # it, rather than one waiting on the other.
        codes = encode()
        with self._lock:
            self._codes[key] = codes
            self._codes.move_to_end(key)
            while len(self._codes) > self.entries:
                self._codes.popitem(last=False)
        return codes

    def __len__(self) -> int:
        return len(self._codes)
