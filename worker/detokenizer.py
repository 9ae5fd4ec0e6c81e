"""Incremental detokenization with stop strings, safe for streaming.

Text is re-decoded from the output ids (so multi-token characters and tokenizer-specific spacing come out
right) and released only when it is stable: an incomplete UTF-8 character, or a tail that could still become
a stop string, is held back until the next token settles it.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # everything decoded so far (after a stop string is found: cut before it)
        self.emitted = 0  # characters of self.text already released
        self.stopped = False

    def update(self, output_token_ids: list[int]) -> str:
        """Decode after a new token; returns newly releasable text. Sets .stopped on a stop string."""
        text = self.tokenizer.decode(output_token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # the last token ends inside a multi-byte character
            return ""
        self.text = text
        if self.stop:
            search_from = max(0, self.emitted - self.holdback)
            hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = text[: min(hits)]
                self.stopped = True
                return self.flush()
        return self._release(len(self.text) - self.holdback)

    def flush(self) -> str:
        """Release everything held back (the request has finished)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : upto], upto
        return delta
