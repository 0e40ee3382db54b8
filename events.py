"""Dify's stream events, translated into the pieces an OpenAI answer is made of.

A piece is a (kind, value) tuple, in answer order:
  (CONTENT, text)    text to append to the answer;
  (REASONING, text)  thinking to show apart from the answer (`reasoning_content`);
  (REPLACE, text)    Dify's moderation replaced the whole answer with this text;
  (TOOL_CALL, call)  a client tool call {"index", "id", "name", "arguments"};
  (MARK, text)       invisible text that must reach the client whole, in one chunk.
Everything else a run reports (usage, the conversation id, how it ended) is kept on the
translator. Any event that carries an `answer` string is text, whatever its name, because
Dify 1.11.2+ sends text chunks as `message_file` events once a message has a file.

What is not the answer itself is made visible the way clients that show thinking expect
(Cherry Studio, LobeChat, Open WebUI read `reasoning_content`): an agent's rounds (thought,
tool and input, observation), `<think>` blocks of reasoning models, Dify's `reasoning_chunk`
events and, on request, a workflow's node progress. Files a tool made become markdown images
or links in the answer, so chat clients show them.
"""

import json
import re
from urllib.parse import urljoin, urlsplit

from errors import APIError, from_dify
from usage import estimate_tokens

CONTENT = "content"
REASONING = "reasoning"
REPLACE = "replace"
TOOL_CALL = "tool_call"
MARK = "mark"

_NOT_TEXT = frozenset(("message_replace", "message_end"))
_AGENT_MODES = ("agent-chat", "agent")
_THOUGHT_INPUT_LIMIT = 300
_OBSERVATION_LIMIT = 500
_DETAILS_LIMIT = 512
_LEADING_TAG = re.compile(r"[ \t]*<")
_ID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_LINE_TAG = re.compile(r"\n[ \t]*<")
_THINKING_DETAILS = re.compile(r"<details\b[^>]*>\s*<summary\b[^>]*>\s*Thinking[.…]*\s*</summary>", re.IGNORECASE)


# --- <think> blocks in streamed text --------------------------------------------------------

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


# --- agent rounds ---------------------------------------------------------------------------

def summarise(text, limit):
    """`text` at a readable size: whitespace runs collapsed, cut at a word near `limit` characters,
    saying how much was left out."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    if cut < limit * 2 // 3:
        cut = limit
    return f"{text[:cut].rstrip()} … ({len(text) - cut} more characters)"


def _parsed(value):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _plain(value):
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def describe_arguments(arguments):
    """A tool's input as `key: value, …` (or as itself when it is not an object)."""
    if isinstance(arguments, dict):
        return ", ".join(f"{key}: {_plain(value)}" for key, value in arguments.items())
    return "" if arguments in (None, "") else _plain(arguments)


def _label(name, labels):
    label = _object(labels).get(name)
    if isinstance(label, dict):
        label = label.get("en_US") or next((v for v in label.values() if isinstance(v, str) and v), None)
    return label if isinstance(label, str) and label else name


def _per_tool(value, names):
    """Dify keys a round's tool inputs and observations by tool name; one tool may also get it bare."""
    parsed = _parsed(value)
    if isinstance(parsed, dict) and any(name in parsed for name in names):
        return [parsed.get(name) for name in names]
    if len(names) == 1:
        return [parsed]
    return [None] * (len(names) - 1) + [parsed]


def tool_uses(thought):
    """[(label, input summary, observation summary or None)] for the tools of one agent_thought."""
    names = [name for name in str(thought.get("tool") or "").split(";") if name]
    if not names:
        return []
    inputs = _per_tool(thought.get("tool_input") or "", names)
    observed = thought.get("observation") or ""
    observations = _per_tool(observed, names) if observed else [None] * len(names)
    uses = []
    for name, arguments, observation in zip(names, inputs, observations):
        summary = None if observation in (None, "") else summarise(_plain(observation), _OBSERVATION_LIMIT)
        uses.append((_label(name, thought.get("tool_labels")),
                     summarise(describe_arguments(arguments), _THOUGHT_INPUT_LIMIT), summary))
    return uses


def _call_line(label, arguments):
    return f"Calling **{label}** with {arguments}" if arguments else f"Calling **{label}**"


def _same_text(shown, thought):
    """Whether a round's thought is text the answer already streamed (Dify sends it both ways)."""
    thought = " ".join(thought.split())
    return bool(thought) and thought in " ".join(shown.split())


# --- files and workflow outputs -------------------------------------------------------------

def file_markdown(file, base=""):
    """A Dify file (message_file event or file output) as a markdown image, or a link for other types."""
    url = file.get("url") or file.get("remote_url") or ""
    if not isinstance(url, str) or not url:  # a malformed event's url (a number, a list) is no link
        return ""
    if base and not urlsplit(url).scheme:
        url = urljoin(base, url)
    name = file.get("filename") or ""
    if file.get("type") == "image" or str(file.get("mime_type") or "").startswith("image/"):
        return f"![{name or 'image'}]({url})"
    return f"[{name or file.get('type') or 'file'}]({url})"


def _is_file(value):
    return isinstance(value, dict) and ("dify_model_identity" in value or {"url", "type"} <= value.keys())


def render_outputs(outputs, base=""):
    """A workflow's outputs as the answer: one text output as itself, files as markdown, anything
    else (several outputs, objects) as indented JSON a person and a program can both read."""
    if not isinstance(outputs, dict) or not outputs:
        return ""
    if len(outputs) > 1:
        return json.dumps(outputs, ensure_ascii=False, indent=2, default=str)
    value = next(iter(outputs.values()))
    if isinstance(value, str):
        return value
    if _is_file(value):
        return file_markdown(value, base)
    if isinstance(value, list) and value and all(_is_file(item) for item in value):
        return "\n\n".join(file_markdown(item, base) for item in value)
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, indent=2, default=str)


def _object(value):
    """A JSON object field of an event, or an empty one when Dify sent anything else there."""
    return value if value.__class__ is dict else {}


def _error_status(value):
    """The HTTP status an error event reports; Dify 0.11 sends none, and anything that is not a
    status is taken as a server error."""
    if value.__class__ is str:
        try:
            value = int(value)
        except ValueError:
            return 500
    if value.__class__ is int and 400 <= value <= 599:
        return value
    return 500


def run_failed(model, detail):
    """A failed chatflow or workflow run: the app's own error text; retrying re-runs the same failure."""
    return APIError(502, f"The Dify app for model '{model}' failed: {detail or 'no detail'}", type="server_error",
                    code="workflow_failed", retry=False)


def _files_base(dify_api_base):
    """Dify serves files at its root, not under /v1; signed file URLs are relative unless Dify's
    FILES_URL is set, so they are made absolute against the API's origin."""
    parts = urlsplit(dify_api_base or "")
    return f"{parts.scheme}://{parts.netloc}/" if parts.scheme and parts.netloc else ""


def translator_for(mode, model, settings=None):
    """The translator for an app's mode, presenting agent work, thinking and progress as configured."""
    options = {}
    if settings is not None:
        options = {"agent_work": settings.agent_work, "think_tags": settings.think_tags,
                   "workflow_progress": settings.workflow_progress,
                   "files_base": _files_base(settings.dify_api_base)}
    kind = WorkflowTranslator if mode == "workflow" else AnswerTranslator
    return kind(mode, model, **options)


# --- the translators ------------------------------------------------------------------------

class AnswerTranslator:
    """Follows one Dify run of a message-based app (chat, agent-chat, agent, advanced-chat,
    completion) from its events."""

    def __init__(self, mode, model, *, agent_work="reasoning", think_tags="reasoning", workflow_progress="off",
                 files_base=""):
        self.mode = mode
        self.model = model
        self.usage = None
        self.conversation_id = None
        self.message_id = None
        self.done = False
        self.replaced = False
        self.failure = None
        self.agent_work = agent_work
        self.think_tags = think_tags
        self.workflow_progress = workflow_progress
        self.files_base = files_base
        self.text_length = 0
        self._agent_text = False
        self._splitter = ThinkSplitter() if think_tags != "keep" else None
        self._content_tail = ""
        self._block_before = False
        self._reasoning_key = None
        self._reasoned = False
        self._thoughts = {}
        self._round_text = []  # this agent round's answer text, in pieces: joined only when a thought is compared
        self._files = set()

    def feed(self, event):
        """The pieces one event adds; raises APIError for an error event or a failed run."""
        name = event.get("event")
        if self.conversation_id is None:
            self._learn_conversation(event)
        if self.message_id is None:
            self._learn_message(event)
        answer = event.get("answer")
        if answer.__class__ is str and name not in _NOT_TEXT:
            if name == "agent_message":
                self._agent_text = True
            elif self._agent_text and self.mode == "agent":
                return ()
            return tuple(self._text(answer))
        handler = self._HANDLERS.get(name)
        return tuple(handler(self, event)) if handler is not None else ()

    def finish_reason(self):
        return "content_filter" if self.replaced else "stop"

    def _learn_conversation(self, event):
        """Every event of a chat run names its conversation: the first one that does tells it. Only a
        UUID is taken: the id goes into a response header and a mode-2 mark."""
        found = event.get("conversation_id")
        if found and found.__class__ is str and _ID.fullmatch(found):
            self.conversation_id = found

    def _learn_message(self, event):
        """The run's Dify message id, from the first event that names it (a Responses API id is made of it)."""
        found = event.get("message_id")
        if found and found.__class__ is str:
            self.message_id = found

    # Events.

    def _message_end(self, event):
        usage = _object(_object(event.get("metadata")).get("usage"))
        self.usage = usage or None
        self.done = True
        return self._flush()

    def _message_replace(self, event):
        self.replaced = True
        if self._splitter is not None:
            self._splitter = ThinkSplitter()
        answer = event.get("answer")
        return ((REPLACE, answer if answer.__class__ is str else ""),)

    def _agent_thought(self, event):
        """One agent round, re-sent as it progresses: only what is new is shown, and a thought
        the answer already streamed (Dify sends a round's text both ways) is not repeated."""
        if self.agent_work == "hidden":
            return ()
        key = str(event.get("id") or event.get("position"))  # as text: Dify's ids are, malformed ones need not be
        state = self._thoughts.setdefault(key, {"thought": "", "calls": False, "observed": False})
        steps = []
        thought = str(event.get("thought") or "")
        if thought and thought != state["thought"]:
            grows = thought.startswith(state["thought"])
            new = thought[len(state["thought"]):] if grows else thought
            if new.strip() and not _same_text("".join(self._round_text), thought):
                steps.append((("thought", key) if grows else None, new))
            state["thought"] = thought
        uses = tool_uses(event)
        if uses and not state["calls"]:
            state["calls"] = True
            steps.append((None, "\n\n".join(_call_line(label, arguments) for label, arguments, _ in uses)))
        if uses and not state["observed"] and any(observation is not None for _, _, observation in uses):
            state["observed"] = True
            steps.append((None, "\n\n".join(f"**{label}** returned: {observation}"
                                             for label, _, observation in uses if observation is not None)))
        if thought or uses:
            self._round_text = []
        if self.agent_work == "inline":
            quoted = "\n>\n".join("> " + text.strip().replace("\n", "\n> ") for _, text in steps)
            return self._block(quoted) if steps else ()
        pieces = []
        for step_key, text in steps:
            pieces.extend(self._reasoning(text, step_key))
        return pieces

    def _message_file(self, event):
        seen = str(event.get("id") or event.get("url"))  # as text: Dify's ids are, malformed ones need not be
        if event.get("belongs_to") == "user" or seen in self._files:
            return ()
        self._files.add(seen)
        markdown = file_markdown(event, self.files_base)
        return self._block(markdown) if markdown else ()

    def _reasoning_chunk(self, event):
        if self.think_tags == "hidden":
            return ()
        data = event.get("data") if isinstance(event.get("data"), dict) else event
        text = next((data[key] for key in ("reasoning", "text", "delta") if isinstance(data.get(key), str)), "")
        return self._reasoning(text, "reasoning_chunk") if text else ()

    def _node_started(self, event):
        data = _object(event.get("data"))
        if (self.workflow_progress != "reasoning" or data.get("node_type") == "start"
                or data.get("iteration_id") or data.get("loop_id")):
            return ()
        title = data.get("title") or data.get("node_type") or "node"
        return self._reasoning(f" ▸ {title}" if self._reasoning_key == "progress" else f"running: {title}",
                               "progress")

    def _node_finished(self, event):
        data = _object(event.get("data"))
        if (self.workflow_progress != "reasoning" or data.get("status") not in ("failed", "exception")
                or data.get("iteration_id") or data.get("loop_id")):
            return ()
        return self._reasoning(f"{data.get('title') or 'A node'} failed: "
                               f"{summarise(data.get('error') or 'no detail', _OBSERVATION_LIMIT)}")

    def _workflow_finished(self, event):
        data = _object(event.get("data"))
        if data.get("status") == "failed":
            self.failure = run_failed(self.model, data.get("error"))
            raise self.failure
        return ()

    def _workflow_paused(self, event):
        self.failure = run_failed(self.model, "the workflow paused to wait for human input, which cannot be "
                                              "given through the OpenAI API")
        raise self.failure

    def _error(self, event):
        code = event.get("code")
        raise from_dify(_error_status(event.get("status")), code if isinstance(code, str) else "",
                        str(event.get("message") or "no detail"), self.model)

    _HANDLERS = {
        "message_end": _message_end,
        "message_replace": _message_replace,
        "agent_thought": _agent_thought,
        "message_file": _message_file,
        "reasoning_chunk": _reasoning_chunk,
        "node_started": _node_started,
        "iteration_started": _node_started,
        "loop_started": _node_started,
        "node_finished": _node_finished,
        "workflow_finished": _workflow_finished,
        "workflow_paused": _workflow_paused,
        "error": _error,
    }

    # Pieces.

    def _text(self, text):
        """Answer text, its thinking blocks split off unless THINK_TAGS=keep."""
        if not text:
            return ()
        if self.mode in _AGENT_MODES:
            self._round_text.append(text)
        if self._splitter is None:
            return self._content(text)
        return self._split(self._splitter.feed(text))

    def _flush(self):
        return self._split(self._splitter.flush()) if self._splitter is not None else ()

    def _split(self, parts):
        pieces = []
        for kind, part in parts:
            if kind is CONTENT:
                pieces.extend(self._content(part))
            elif self.think_tags != "hidden":
                pieces.extend(self._reasoning(part, ("think", self._splitter.blocks)))
        return pieces

    def _content(self, text):
        if self._block_before and not text.startswith("\n"):
            text = "\n\n" + text
        self._block_before = False
        self.text_length += len(text)
        self._content_tail = (self._content_tail + text[-2:])[-2:]
        return [(CONTENT, text)]

    def _block(self, text):
        """Markdown that must stand apart from the text around it (an image, a quoted agent step)."""
        if self._content_tail and not self._content_tail.endswith("\n\n"):
            text = ("\n" if self._content_tail.endswith("\n") else "\n\n") + text
        pieces = self._content(text)
        self._block_before = True
        return pieces

    def _reasoning(self, text, key=None):
        """Reasoning text from one source (a think block, a growing thought, the progress line): text
        from another source than the last, or from none (key None), starts a new paragraph."""
        if self._reasoned and (key is None or key != self._reasoning_key):
            text = "\n\n" + text.lstrip()
        self._reasoning_key = key
        self._reasoned = True
        return [(REASONING, text)]


class WorkflowTranslator(AnswerTranslator):
    """Follows one workflow-app run: `text_chunk` events are the answer; when nothing streamed,
    the run's outputs become the answer. A workflow has no conversation and no message_end."""

    def __init__(self, mode, model, **options):
        super().__init__(mode, model, **options)
        self._streamed = False

    def feed(self, event):
        if event.get("event") == "text_chunk":
            data = _object(event.get("data"))
            text = data.get("text")
            if isinstance(text, str) and text:
                self._streamed = True
                return tuple(self._text(text))
            return ()
        return super().feed(event)

    def _workflow_finished(self, event):
        super()._workflow_finished(event)
        data = _object(event.get("data"))
        pieces = list(self._flush())
        if not self._streamed:
            answer = render_outputs(data.get("outputs"), self.files_base)
            if answer:
                pieces.extend(self._content(answer))
        self.usage = self._usage(data.get("total_tokens"))
        self.done = True
        return pieces

    def _usage(self, total):
        """Dify reports only a workflow's total tokens: keep that total, and count the answer's share
        (estimated from its length) as completion tokens, the rest as prompt."""
        try:
            total = int(total or 0)
        except (TypeError, ValueError):
            total = 0
        if total <= 0:
            return None
        completion = min(total, estimate_tokens(self.text_length))
        return {"prompt_tokens": total - completion, "completion_tokens": completion, "total_tokens": total}

    _HANDLERS = {**AnswerTranslator._HANDLERS, "workflow_finished": _workflow_finished}
