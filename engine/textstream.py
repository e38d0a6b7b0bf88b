"""Token bytes -> text deltas, with stop strings.

A token may end in the middle of a UTF-8 character, and a stop string may span tokens, so
text is released only once it is final: complete characters that cannot be the start of a
stop string. The output is a pure function of the byte sequence pushed, which is what lets
a node resuming a failed generation (it replays the delivered tokens through a fresh
TextStream and discards the text) emit exactly the text the user has not yet seen.
"""

from __future__ import annotations

import codecs


class TextStream:
    def __init__(self, stop: list[str] | tuple[str, ...] = ()) -> None:
        self._stops = [s for s in stop if s]
        # errors="replace": random-weight or misbehaving models emit invalid UTF-8; a
        # U+FFFD is better than an exception halfway through a stream.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text not yet released: a possible stop-string prefix
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Feed one token's bytes; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        return self._release(self._decoder.decode(data))

    def flush(self) -> str:
        """End of generation: release everything still held (a dangling partial character
        becomes U+FFFD). Returns "" after a stop string was hit."""
        if self.stopped:
            return ""
        out = self._release(self._decoder.decode(b"", final=True))
        if self.stopped:
            return out
        out, self._held = out + self._held, ""
        return out

    def _release(self, text: str) -> str:
        if not text:
            return ""
        held = self._held + text
        if not self._stops:
            self._held = ""
            return held
        cut = -1
        for s in self._stops:
            i = held.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            self.stopped = True
            self._held = ""
            return held[:cut]
        keep = self._partial_stop_len(held)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
