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
    """Feed token ids one at a time; `push` returns the new text that is safe to show.

    Incremental, as vLLM's and transformers' streamers decode: only the ids from the last
    stable offset on are decoded each time (a few tokens: those of the previous piece and the
    new one), and the new text is what that window decodes to beyond what its older part
    decodes to (so a decoder that treats a window's first token specially, e.g. a leading
    space, gives the same piece). The window moves on once its text ends in a whole character.
    Rank 0's work per token is then flat in the completion's length."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text = ""  # decoded so far (whole characters only)
        self.sent = 0  # characters already returned
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] decode to the end of `text`
        self._read = 0
        self._longest_stop = max((len(t) for t in stops), default=0)

    def _window(self) -> tuple[str, str]:
        """(text of ids[prefix:read], text of ids[prefix:])."""
        return self.tokenizer.decode(self.ids[self._prefix: self._read]), self.tokenizer.decode(self.ids[self._prefix:])

    def push(self, token: int) -> str:
        """The next safe piece of text after `token` (possibly ""); sets `stopped` at a stop string."""
        self.ids.append(int(token))
        if self.tokenizer is None:
            return ""
        old, new = self._window()
        if new.endswith("\ufffd") or len(new) <= len(old):
            return ""  # an incomplete character (or nothing yet): wait for the next bytes
        start = len(self.text)
        self.text += new[len(old):]
        self._prefix, self._read = self._read, len(self.ids)
        # a stop string that ends in the new piece starts at most its length before it
        lo = max(0, min(start, self.sent) - self._longest_stop)
        hits = [i for i in (self.text.find(s, lo) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._take(len(self.text))
        return self._take(len(self.text) - held_back(self.text, self.stops))

    def flush(self) -> str:
        """At the end (no stop string met): everything not sent yet, an incomplete last
        character as the tokenizer decodes it (U+FFFD)."""
        if self.tokenizer is not None and not self.stopped:
            old, new = self._window()
            self.text += new[len(old):]
            self._prefix = self._read = len(self.ids)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = self.text[self.sent: upto]
        self.sent = upto
        return piece
