"""Tool calls found in the answer text as it streams: the filter between Dify's answer and the client.

The model answers in text (it was taught the protocol by tool_prompt.py); ToolCallParser finds the
call envelopes in that text, streaming or not, and turns each into an OpenAI tool call as soon as
it closes, while the rest of the answer goes on to the client as content. An envelope is a
`<tool_call>` (or `<tool_calls>`) block, possibly with attributes in its opening tag and a missing
closing tag (the next `<tool_call>` or the end of the answer closes it), or a fenced
```` ```json ```` / ```` ``` ```` block (also `jsonc`, `json5`, `xml`, `tool_call(s)`); what its
body may hold is tool_call_forms.py. A fenced block that is not a call stays content, decided at
its closing fence. After a call, a `<tool_result` the model writes itself is a hallucinated
result: it and the rest of the answer are dropped.

Holdback (streaming): ordinary text goes out at once. Held back are only
* a `<` plus what could still become `<tool_call`, `<tool_calls` or, after a call,
  `<tool_result` / `</tool_call(s)` (at most 12 characters), or such a tag with attributes
  until its `>` (the whole tag is capped at TAG_MAX = 64 characters, so at most 63 held);
* at a line start, up to 3 spaces plus what could still become an opening fence line
  (```` ``` ```` + one of the info strings above + spaces), at most FENCE_LINE_MAX = 24 chars;
* whitespace at the very start of the answer or right after a call (at most WS_MAX = 16
  characters), because whitespace next to calls is dropped rather than shown.
Measured maximum (tests/test_tool_calls.py::test_holdback_measured and the adversarial
test_holdback_is_bounded): MAX_HOLDBACK = 79 characters (16 whitespace + a 63-character
unterminated tag with attributes); with the tags as we ask for them it is at most 12 (+16
whitespace). Once an envelope has opened, its text is held until it closes (it is the
envelope, never shown) -- but only while it can still be a call: a `<tool_call>` followed by
prose, or a fence whose first visible character is not `{`, `[` or `<tool_call` (code,
shell, prose), is released as soon as that character arrives, and such a fence is then
tracked as a code block so its closing ``` is not taken for an opening one. A JSON-looking
fenced block is held while it is open and decided at its closing fence. If the answer ends
with a broken envelope, everything held is released as content; an envelope with no closing
tag at the end of the answer is a call only if it is complete but for closing brackets (an
unclosed string there means the answer was cut off). feed() scans only the new text plus the
small held tail (and an open envelope's last few characters for its end), with compiled
patterns anchored at candidate positions, so it stays linear in the answer length.

Ids are always fresh (`call_` + 24 alphanumerics): ids a model copies from the rendered history
would collide. With `parallel_tool_calls: false` only the first call is emitted (the model will
repeat the others after seeing the first result).
"""

import json
import re
import secrets
import string

from tool_call_forms import calls_in

TAG_MAX = 64
FENCE_LINE_MAX = 24
WS_MAX = 16
MAX_HOLDBACK = WS_MAX + TAG_MAX - 1

_ALNUM = string.ascii_letters + string.digits


def new_call_id():
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


_TEXT, _TAG, _FENCE, _DISCARD = "text", "tag", "fence", "discard"
_NO, _PREFIX, _MATCH = 0, 1, 2

_CANDIDATE = re.compile(r"<|^(?= {0,3}(?:`|\Z))", re.M)
_IDENT = re.compile(r"/?[A-Za-z_]*")
_ATTRS = re.compile(r"""(?:\s+[\w:.-]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+))?)*\s*/?""")
_FENCE_INFOS = ("", "json", "jsonc", "json5", "xml", "tool_call", "tool_calls")
_FENCE_OPEN = re.compile(r" {0,3}```[ \t]*([\w+.-]*)[ \t]*\r?\n")
_FENCE_PARTIAL = re.compile(r" {0,3}(?:`{0,2}|```[ \t]*([\w+.-]*)([ \t]*\r?)?)")
_TICKS = re.compile(r" {0,3}```")
_TICKS_PARTIAL = re.compile(r" {0,3}`{0,2}")
_FENCE_CLOSE = re.compile(r"\n {0,3}```[ \t]{0,8}\r?\n")
_FENCE_CLOSE_AT_END = re.compile(r"\n {0,3}```[ \t]{0,8}\r?\Z")
_TAG_END = re.compile(r"</tool_calls?\s{0,3}>|<tool_calls?[\s>]", re.I)
_TAG_NAMES = ("tool_call", "tool_calls")
_TAG_NAMES_AFTER_CALL = _TAG_NAMES + ("tool_result", "/tool_call", "/tool_calls")
_DROP = "drop"


def _tag_may_hold_call(visible):
    """Whether a `<tool_call>` body starting with `visible` can still be a call (None: nothing visible yet)."""
    if not visible:
        return None
    return visible[0] in "{[<`"


def _fence_may_hold_call(visible):
    """Whether a fenced block starting with `visible` can still be a call: JSON or `<tool_call` blocks
    (None: not decided yet)."""
    if not visible:
        return None
    if visible[0] != "<":
        return visible[0] in "{["
    head = visible[:10].lower()
    if not "<tool_call".startswith(head):
        return False
    return True if len(head) == 10 else None


class _GrowingText:
    """The open envelope's text. It grows by every piece of a call's text, which may be long (a file
    written by a tool): it is kept in parts and joined only when read whole, and its tail is read
    from the last parts, so each piece is searched for the envelope's end in a window of its own
    size and a long call costs what its length costs."""

    def __init__(self, text):
        self._parts = [text]
        self.length = len(text)

    def append(self, text):
        self._parts.append(text)
        self.length += len(text)

    def whole(self):
        if len(self._parts) != 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0]

    def tail(self, start):
        """The text from `start` on."""
        need = self.length - start
        tail, size = [], 0
        for part in reversed(self._parts):
            tail.append(part)
            size += len(part)
            if size >= need:
                break
        text = "".join(reversed(tail))
        return text[len(text) - need:]


class ToolCallParser:
    """Streaming filter over the answer text: feed text deltas, get back the content that is
    safe to show and each call as soon as it is complete.

    Pieces are ("content", str) and ("tool_call", {"index", "id", "name", "arguments"}).
    Chunking never changes the result: the concatenated content and the calls are the same
    however the answer is split, so a non-streamed answer fed in one piece agrees with its stream.
    """

    def __init__(self, request, id_factory=None):
        self._request = request
        self._id_factory = id_factory or new_call_id
        self._mode = _TEXT
        self._hold = ""          # text mode: a possible opening tag/fence not yet decided
        self._line_start = True  # is the start of `_hold + next text` at a line start?
        self._in_code = False    # inside a Markdown code block that cannot hold a call
        self._quiet = True       # nothing shown since the start or the last call
        self._ws = ""            # whitespace held while quiet
        self._env = None         # the open envelope's _GrowingText (opening tag/fence included)
        self._env_open = 0       # where its body starts
        self._env_ws = ""        # whitespace held before it (released with it if broken)
        self._checked = False    # has its body shown a character a call can start with?
        self._count = 0
        self._ids = set()
        self._events = []
        self._done = False

    @property
    def called(self):
        """Whether any call was emitted (finish_reason "tool_calls")."""
        return self._count > 0

    def feed(self, text):
        self._events = []
        if text and not self._done:
            self._process(text)
        return self._drain()

    def finish(self):
        self._events = []
        if self._done:
            return []
        for _ in range(10_000):
            if self._mode == _TAG:
                rest = self._close_at_end(self._env.whole()[self._env_open:])
            elif self._mode == _FENCE:
                env = self._env.whole()
                m = _FENCE_CLOSE_AT_END.search(env, max(self._env_open - 1, 0))
                if m:
                    self._resolve(env[self._env_open:m.start()], env, True)
                    rest = ""
                else:
                    rest = self._close_at_end(env[self._env_open:])
            else:
                break
            self._mode, self._env = _TEXT, None
            if rest:
                self._line_start = False
                self._process(rest)
        if self._mode == _TEXT and self._hold:
            hold, self._hold = self._hold, ""
            self._content(hold)
        if self._ws and not self.called:
            self._emit_content(self._ws)
        self._ws = ""
        self._done = True
        return self._drain()

    def _drain(self):
        merged = []
        for kind, value in self._events:
            if kind == "content" and merged and merged[-1][0] == "content":
                merged[-1] = ("content", merged[-1][1] + value)
            elif kind != "content" or value:
                merged.append((kind, value))
        self._events = []
        return merged

    def _process(self, text):
        while text is not None:
            if self._mode == _TEXT:
                buf, self._hold = self._hold + text, ""
                text = self._scan_text(buf)
            elif self._mode in (_TAG, _FENCE):
                text = self._scan_envelope(text)
            else:
                return

    def _emit_content(self, text):
        if text:
            self._events.append(("content", text))

    def _content(self, text):
        """Show text; while quiet, whitespace waits to see whether a call follows."""
        if not text:
            return
        if self._quiet:
            if text.isspace():
                self._ws += text
                if len(self._ws) > WS_MAX:
                    self._emit_content(self._ws)
                    self._ws = ""
                    self._quiet = False
                return
            text, self._ws = self._ws + text, ""
            self._quiet = False
        self._emit_content(text)

    def _scan_text(self, buf):
        """Show what cannot start an envelope; hold a possible start; enter an envelope.
        Returns the text after an opening tag/fence (to scan in the new mode) or None."""
        line_start = self._line_start
        start = pos = 0
        n = len(buf)
        while pos <= n:
            m = _CANDIDATE.search(buf, pos)
            if m is None:
                break
            p = m.start()
            if m.group() == "<":
                status, end, kind = self._match_tag(buf, p)
            elif p == 0 and not line_start:
                pos = 1
                continue
            else:
                status, end = self._match_fence(buf, p)
                kind = _FENCE
            if status == _NO:
                pos = p + 1
                continue
            self._content(buf[start:p])
            if status == _PREFIX:
                self._hold = buf[p:]
                self._line_start = line_start if p == 0 else buf[p - 1] == "\n"
                return None
            if kind == _DROP:  # a stray </tool_call> after a call: part of no envelope, never shown
                start = pos = end
                continue
            self._begin(kind, buf[p:end])
            return buf[end:]
        self._content(buf[start:])
        if n > start:
            self._line_start = buf[-1] == "\n"
        elif start:
            self._line_start = False
        return None

    def _match_tag(self, buf, p):
        n = len(buf)
        m = _IDENT.match(buf, p + 1)
        word, j = m.group().lower(), m.end()
        names = _TAG_NAMES_AFTER_CALL if self.called else _TAG_NAMES
        if j >= n:
            if any(name.startswith(word) for name in names):
                return _PREFIX, 0, None
            return _NO, 0, None
        if word not in names:
            return _NO, 0, None
        kind = _DISCARD if word == "tool_result" else _DROP if word[0] == "/" else _TAG
        ch = buf[j]
        if ch == ">":
            return _MATCH, j + 1, kind
        if not ch.isspace() or kind == _DROP:
            return _NO, 0, None
        limit = p + TAG_MAX
        k = buf.find(">", j, limit)
        if k == -1:
            if n < limit and "<" not in buf[j:n]:
                return _PREFIX, 0, None
            return _NO, 0, None
        if "<" in buf[j:k] or not _ATTRS.fullmatch(buf, j, k):
            return _NO, 0, None
        return _MATCH, k + 1, kind

    def _match_fence(self, buf, p):
        """A line start that may open a fence. Fences that cannot hold a call (```python)
        open a code block: its closing ``` must not be taken for an opening one."""
        ticks = _TICKS.match(buf, p)
        if self._in_code:
            if ticks:
                self._in_code = False
                return _NO, 0
            return (_PREFIX, 0) if _TICKS_PARTIAL.fullmatch(buf, p) else (_NO, 0)
        m = _FENCE_OPEN.match(buf, p, p + FENCE_LINE_MAX + 1)
        if m and m.group(1).lower() in _FENCE_INFOS:
            return _MATCH, m.end()
        ok = False
        if not m and len(buf) - p <= FENCE_LINE_MAX:
            m = _FENCE_PARTIAL.fullmatch(buf, p)
            if m:
                info, tail = (m.group(1) or "").lower(), m.group(2)
                if tail:
                    ok = info in _FENCE_INFOS
                else:
                    ok = any(name.startswith(info) for name in _FENCE_INFOS)
        if ok:
            return _PREFIX, 0
        if ticks:
            self._in_code = True
        return _NO, 0

    def _begin(self, kind, opening):
        self._mode = kind
        self._env = _GrowingText(opening)
        self._env_open = len(opening)
        self._env_ws, self._ws = self._ws, ""
        self._checked = False

    def _not_a_call(self, k, line_start):
        """The envelope's first visible characters cannot start a call: show what was held
        and scan on from there, instead of holding the rest of the answer."""
        env = self._env.whole()
        self._mode, self._env = _TEXT, None
        self._release(env[:k])
        self._line_start = line_start if k == 0 else env[k - 1] == "\n"
        return env[k:]

    def _scan_envelope(self, text):
        """Grow the open envelope; release it as soon as its body cannot be a call, resolve it when
        its end arrives. Returns the text after it (to scan in text mode) or None."""
        fence = self._mode == _FENCE
        start = max(self._env_open - fence, self._env.length - 24)
        self._env.append(text)
        if not self._checked:
            visible = self._env.whole()[self._env_open:].lstrip()
            verdict = _fence_may_hold_call(visible) if fence else _tag_may_hold_call(visible)
            if verdict is None:
                return None
            if not verdict:
                if fence:  # a code block after all: its closing fence is not an opening one
                    self._in_code = True
                return self._not_a_call(self._env.length - len(visible), fence)
            self._checked = True
        end = _FENCE_CLOSE if fence else _TAG_END
        if end.search(self._env.tail(start)) is None:
            return None
        env = self._env.whole()
        m = end.search(env, start)
        self._mode, self._env = _TEXT, None
        return self._close_fence(env, m) if fence else self._close_tag(env, m)

    def _close_tag(self, env, m):
        closing = m.group().startswith("</")
        consumed = m.end() if closing else m.start()
        body = env[self._env_open:m.start()]
        if not closing and not body.strip():
            # <tool_calls> wrapping <tool_call> blocks: the wrapper is dropped
            self._ws, self._env_ws = self._env_ws, ""
        else:
            self._resolve(body, env[:consumed], True)
        self._line_start = False
        return env[consumed:]

    def _close_fence(self, env, m):
        self._resolve(env[self._env_open:m.start()], env[:m.end()], True)
        self._line_start = True
        return env[m.end():]

    def _close_at_end(self, body):
        """The answer ended inside an envelope: a complete call (or one missing only closing
        brackets) still counts; text after it is scanned again; else release everything."""
        raw = self._env.whole()
        calls, rest = calls_in(body, self._request, closed=False)
        if calls is None:
            self._release(raw)
            return ""
        self._accept(calls)
        return rest

    def _resolve(self, body, raw, closed):
        calls, _ = calls_in(body, self._request, closed)
        if calls is None:
            self._release(raw)
        else:
            self._accept(calls)

    def _release(self, raw):
        ws, self._env_ws = self._env_ws, ""
        self._content(ws + raw)

    def _accept(self, calls):
        self._env_ws = ""
        for name, arguments in calls:
            if not self._request.parallel and self._count:
                continue
            call_id = self._id_factory()
            while call_id in self._ids:
                call_id = f"{call_id}_{len(self._ids)}"
            self._ids.add(call_id)
            self._events.append(("tool_call", {
                "index": self._count,
                "id": call_id,
                "name": name,
                "arguments": json.dumps(arguments, ensure_ascii=False, separators=(",", ":")),
            }))
            self._count += 1
        self._quiet = True
        self._ws = ""


def openai_tool_call(call):
    """A parsed call ({"id", "name", "arguments"}) in the OpenAI `tool_calls` shape."""
    return {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
