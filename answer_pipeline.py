"""The answer pipeline: one run's Dify events turned into the answer's pieces.

Pieces are (kind, value) pairs of pieces.py's kinds (CONTENT, REASONING, REPLACE, TOOL_CALL,
MARK). Every batch of events passes the same stages, in this order, each pieces in and
pieces out; a stage the request does not need is left out:

    translator   Dify's events -> pieces (dify_events.py: agent work, thinking, files, usage)
    tool calls   calls to the client's tools written in the text -> TOOL_CALL pieces
    JSON hold    a reply asked for as JSON, held whole and repaired once complete
    reply mark   mode 2: the reply ends with its Dify conversation's mark

It is separate from Completion, which owns the run (starts, retries, stops it), and from the
encoders, which write pieces in a protocol's shape: the streaming relay, the non-streaming
collector and the Responses API all read the same pieces.
"""

import marks
from errors import APIError
from output_format import json_reply
from pieces import CONTENT, MARK, REPLACE, TOOL_CALL
from tool_calls import ToolCallParser


class AnswerPipeline:
    """One answer's stages, fed Dify's events a batch at a time. It also counts the answer's length
    (the usage estimate when Dify reports none) and tells whether the answer ended in tool calls."""

    def __init__(self, translator, tool_request=None, structured=False, reply_mark=None):
        """`tool_request`: the client's tools to parse calls of (tool_request.ToolRequest), None for none;
        `structured`: the reply must parse as JSON; `reply_mark`: a ReplyMark in mode 2, else None."""
        self.translator = translator
        self.tool_request = tool_request
        self.tool_parser = ToolCallParser(tool_request) if tool_request else None
        self.structured = structured
        self.reply_mark = reply_mark
        self.answer_length = 0
        self.called_tools = False
        self.pending_error = None  # an error met after text in the same batch, raised once that text is out
        self._json_text = []

    def feed(self, events):
        """The pieces of a batch of Dify events, then the answer's closing pieces once it is complete.
        An error event raises its APIError, unless text came before it in the batch: that text is
        returned and the error kept in `pending_error`."""
        pieces = self._translate(events)
        if self.tool_parser is not None:
            pieces = self._parse_tools(pieces)
        if self.structured:
            pieces = self._hold_json(pieces)
        if self.reply_mark is not None:
            pieces = self.reply_mark.hold(pieces)
        if self.translator.done:
            pieces.extend(self._closing_pieces())
        return pieces

    def _translate(self, events):
        translator = self.translator
        pieces = []
        for event in events:
            try:
                found = translator.feed(event)
            except APIError as error:
                if not pieces:
                    raise
                # Text that arrived with the error is still the client's: deliver it, then the error.
                self.pending_error = error
                break
            if found:
                pieces.extend(found)
                for kind, text in found:
                    if kind is CONTENT:
                        self.answer_length += len(text)
                    elif kind is REPLACE:
                        self.answer_length = len(text)
            if translator.done:
                break
        return pieces

    def _parse_tools(self, pieces):
        """Answer text through the tool-call parser: calls come out as TOOL_CALL pieces, never as text."""
        parsed = []
        parser = self.tool_parser
        for piece in pieces:
            parsed.extend(parser.feed(piece[1]) if piece[0] is CONTENT else (piece,))
        return self._legacy(parsed) if self.tool_request.legacy else parsed

    @staticmethod
    def _legacy(pieces):
        """Legacy `functions` requests are answered with `function_call`, one call at most."""
        return [(kind, {**value, "legacy": True}) if kind is TOOL_CALL else (kind, value) for kind, value in pieces]

    def _closing_pieces(self):
        """What ends the answer: text the tool parser held back, the JSON reply, and in mode 2 the mark."""
        closing = []
        if self.tool_parser is not None:
            closing = list(self.tool_parser.finish())
            if self.tool_request.legacy:
                closing = self._legacy(closing)
            self.called_tools = self.tool_parser.called
        if self.structured:
            closing = self._hold_json(closing)
            text = "".join(self._json_text)
            if text:
                closing.append((CONTENT, json_reply(text)))
        if self.reply_mark is not None:
            closing = self.reply_mark.hold(closing)
            closing.append(self.reply_mark.mark())
        return closing

    def _hold_json(self, pieces):
        """A reply asked for as JSON is held whole and sent once complete, repaired to parse
        (output_format.json_reply); reasoning and tool calls pass as they come."""
        out = []
        for kind, value in pieces:
            if kind is CONTENT:
                self._json_text.append(value)
            elif kind is REPLACE:
                self._json_text = [value]
            else:
                out.append((kind, value))
        return out


class ReplyMark:
    """Mode 2's last stage: the reply ends with the mark of its Dify conversation, bound to the reply as
    the client will resend it. Whitespace at the end of the text so far waits, so the mark can be
    attached to the end of the last line and the visible reply still ends exactly as Dify's did."""

    def __init__(self, mark_for, streamed):
        """`mark_for(reply_text, calls)`: the mark for a reply of that text and those TOOL_CALL values,
        None when the run named no conversation. `streamed`: the client sees the text as it comes,
        so a REPLACE is shown after that text rather than instead of it."""
        self.mark_for = mark_for
        self.streamed = streamed
        self._held = ""
        self._visible = []
        self._calls = []

    def hold(self, pieces):
        """The pieces with the trailing whitespace of the text so far held back, remembering the reply."""
        out = []
        for kind, value in pieces:
            if kind is CONTENT:
                self._visible.append(value)
                text = self._held + value
                body = text.rstrip()
                self._held = text[len(body):]
                if body:
                    out.append((kind, body))
                continue
            if kind is REPLACE:
                self._held = ""
                self._visible = [value] if not self.streamed or not self._visible else [
                    "".join(self._visible), "\n\n", value]
            elif kind is TOOL_CALL:
                self._calls.append(value)
            out.append((kind, value))
        return out

    def mark(self):
        """The piece that ends the reply: the held whitespace with the mark attached to the last line, or
        on a line of its own where appending would change how the last line renders
        (marks.mark_placement)."""
        held, self._held = self._held, ""
        visible = "".join(self._visible)
        mark = self.mark_for(visible, self._calls)
        if mark is None:
            return CONTENT, held
        if marks.mark_placement(visible) == "inline":
            return MARK, mark + held
        return MARK, held + ("" if "\n" in held else "\n") + mark
