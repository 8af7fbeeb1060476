"""Text out of a growing list of token ids: incremental decoding and stop strings.

Stop strings have OpenAI's meaning: the completion ends just before the first occurrence of
any of them, with finish_reason "stop". While streaming, the tail of the text that is still
the beginning of some stop string is held back until the next tokens decide it; so is an
incomplete UTF-8 character (a byte-level BPE token can end mid-character: the decoded text
then ends in U+FFFD).
"""

from __future__ import annotations

from typing import Any


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class TextStream:
    """Feed token ids one at a time; `push` returns the new text that is safe to show."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text = ""  # decoded so far (whole characters only)
        self.sent = 0  # characters already returned
        self.stopped = False

    def push(self, token: int) -> str:
        """The next safe piece of text after `token` (possibly ""); sets `stopped` at a stop string."""
        self.ids.append(int(token))
        if self.tokenizer is None:
            return ""
        decoded = self.tokenizer.decode(self.ids)
        if decoded.endswith("\ufffd"):
            return ""  # an incomplete character: wait for its other bytes
        self.text = decoded
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._take(len(self.text))
        return self._take(len(self.text) - held_back(self.text, self.stops))

    def flush(self) -> str:
        """At the end (no stop string met): everything not sent yet."""
        if self.tokenizer is not None and not self.stopped:
            self.text = self.tokenizer.decode(self.ids)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = self.text[self.sent: upto]
        self.sent = upto
        return piece
