"""The thinking blocks reasoning models write into their answers, split from the answer as it streams.

Separate from the translators (dify_events.py) because it is a small streaming parser of its
own: it sees only text, never an event, and holds back just what could still be a tag.
"""

import re

from pieces import CONTENT, REASONING

_DETAILS_LIMIT = 512
_LEADING_TAG = re.compile(r"[ \t]*<")
_LINE_TAG = re.compile(r"\n[ \t]*<")
_THINKING_DETAILS = re.compile(r"<details\b[^>]*>\s*<summary\b[^>]*>\s*Thinking[.…]*\s*</summary>", re.IGNORECASE)


def _partial_tail(text, tag):
    """How many characters at the end of `text` could be the start of `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def _opening(rest):
    """Whether `rest` (text from a '<' on) opens a thinking block: (length, closing tag) when it
    does, "maybe" while more text could still make it one, None when it cannot."""
    if rest.startswith("<think>"):
        return 7, "</think>"
    if rest.startswith("<details"):
        found = _THINKING_DETAILS.match(rest)
        if found:
            return found.end(), "</details>"
        return None if "</summary>" in rest or len(rest) > _DETAILS_LIMIT else "maybe"
    if "<think>".startswith(rest) or "<details".startswith(rest):
        return "maybe"
    return None


class ThinkSplitter:
    """Separates the thinking blocks reasoning models write into their answers (`<think>…</think>`,
    and Dify's older `<details><summary>Thinking...</summary>…</details>` rendering of them) from
    the answer text, as it streams: tags may be split across upstream chunks, so only text that
    could still be the start of a tag is held back. A block opens only at the start of a line,
    so an answer that merely mentions `<think>` in a sentence or in code stays intact."""

    def __init__(self):
        self._held = ""
        self._closer = None
        self._line_start = True
        self._trim = False
        self.blocks = 0

    def feed(self, text):
        """(CONTENT | REASONING, text) pieces for the next stretch of answer text."""
        out = []
        buffer, self._held = self._held + text, ""
        position = 0
        while position < len(buffer):
            if self._closer is not None:
                end = buffer.find(self._closer, position)
                if end < 0:
                    # Whitespace is held too: the thinking must not end in the newline before its tag.
                    keep = _partial_tail(buffer[position:], self._closer)
                    thinking = buffer[position:len(buffer) - keep].rstrip()
                    self._emit(out, REASONING, thinking)
                    self._held = buffer[position + len(thinking):]
                    return out
                self._emit(out, REASONING, buffer[position:end].rstrip())
                position = end + len(self._closer)
                self._closer = None
                self._line_start = self._trim = True
                continue
            start, opened = self._next_opening(buffer, position)
            if start is None:
                self._emit_content(out, buffer[position:])
                return out
            self._emit_content(out, buffer[position:start])
            if opened == "maybe":
                self._held = buffer[start:]
                return out
            length, self._closer = opened
            position = start + length
            self.blocks += 1
            self._trim = True
        return out

    def flush(self):
        """The held-back text, once the answer is complete (an unclosed block stays thinking)."""
        out = []
        held, self._held = self._held, ""
        if self._closer is not None:
            self._emit(out, REASONING, held)
        else:
            self._emit_content(out, held)
        return out

    def _next_opening(self, buffer, position):
        """The first '<' at a line start from `position` that opens (or may open) a block."""
        for start in self._line_starts(buffer, position):
            opened = _opening(buffer[start:start + _DETAILS_LIMIT + 1])
            if opened is not None:
                return start, opened
        return None, None

    def _line_starts(self, buffer, position):
        """Each '<' from `position` on that only blanks separate from the start of its line."""
        if self._line_start:
            first = _LEADING_TAG.match(buffer, position)
            if first:
                yield first.end() - 1
        for found in _LINE_TAG.finditer(buffer, position):
            yield found.end() - 1

    def _emit_content(self, out, text):
        if not text:
            return
        newline = text.rfind("\n")
        if newline < 0:
            self._line_start = self._line_start and not text.strip(" \t")
        else:
            self._line_start = not text[newline + 1:].strip(" \t")
        self._emit(out, CONTENT, text)

    def _emit(self, out, kind, text):
        if self._trim:
            text = text.lstrip()
            self._trim = not text
        if text:
            out.append((kind, text))
