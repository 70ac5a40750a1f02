"""Incremental, UTF-8 safe detokenization with stop strings.

Byte-level tokens can split one character across tokens; decoding a half character gives U+FFFD.
We decode a short window of tokens and only emit text once the window no longer ends in U+FFFD, so the
final text never carries replacement characters for characters that were completed later.
"""

from __future__ import annotations

from typing import Protocol

# Prompt tokens kept as left context: some tokenizers (SentencePiece) decode a token differently at the
# start of a string than after other text.
_PROMPT_CONTEXT_TOKENS = 6
_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        stop_strings: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop_strings = stop_strings or []
        self._include_stop = include_stop_str_in_output
        # Streaming must hold back text that could still turn out to be the start of a stop string.
        self._holdback = max((len(s) for s in self._stop_strings), default=1) - 1
        self.output_text = ""
        self._emitted = 0

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token. Returns the stop string if the text now contains one (text truncated)."""
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], self._skip_special)
        full = self._tokenizer.decode(self._ids[self._prefix_offset :], self._skip_special)
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT_CHAR):
            return None  # an incomplete character: wait for the next token
        delta = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        start = max(0, len(self.output_text) - self._holdback)
        self.output_text += delta
        return self._check_stop(start) if check_stop else None

    def _check_stop(self, search_from: int) -> str | None:
        for stop in self._stop_strings:
            at = self.output_text.find(stop, search_from)
            if at != -1:
                self.output_text = self.output_text[: at + len(stop) if self._include_stop else at]
                return stop
        return None

    def visible_text(self, finished: bool) -> str:
        """The output text so far, less (while running) a tail that could still become a stop string, so that
        no part of a stop string is ever shown (as vLLM does)."""
        if finished or not self._holdback:
            return self.output_text
        return self.output_text[: max(0, len(self.output_text) - self._holdback)]

    def new_text(self, finished: bool) -> str:
        """Text not yet returned by an earlier call (for streaming); keeps back a possible stop prefix."""
        end = len(self.output_text) if finished else max(self._emitted, len(self.output_text) - self._holdback)
        delta = self.output_text[self._emitted : end]
        self._emitted = end
        return delta
