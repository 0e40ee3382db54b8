"""Dify's stream events, translated into the pieces an OpenAI answer is made of (pieces.py).

Everything else a run reports (usage, the conversation id, how it ended) is kept on the
translator. Any event that carries an `answer` string is text, whatever its name, because
Dify 1.11.2+ sends text chunks as `message_file` events once a message has a file.

What is not the answer itself is made visible the way clients that show thinking expect
(Cherry Studio, LobeChat, Open WebUI read `reasoning_content`): an agent's rounds (thought,
tool and input, observation; agent_work.py), `<think>` blocks of reasoning models
(thinking.py), Dify's `reasoning_chunk` events and, on request, a workflow's node progress.
Files a tool made become markdown images or links in the answer (answer_markdown.py), so chat
clients show them.
"""

import re

from agent_work import OBSERVATION_LIMIT, call_line, same_text, summarise, tool_uses
from answer_markdown import file_markdown, files_base, render_outputs
from errors import from_dify, run_failed
from pieces import CONTENT, REASONING, REPLACE
from thinking import ThinkSplitter
from usage import estimate_tokens

_NOT_TEXT = frozenset(("message_replace", "message_end"))
_AGENT_MODES = ("agent-chat", "agent")
_ID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")


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


def translator_for(mode, model, settings=None):
    """The translator for an app's mode, presenting agent work, thinking and progress as configured."""
    options = {}
    if settings is not None:
        options = {"agent_work": settings.agent_work, "think_tags": settings.think_tags,
                   "workflow_progress": settings.workflow_progress,
                   "files_base": files_base(settings.dify_api_base)}
    kind = WorkflowTranslator if mode == "workflow" else AnswerTranslator
    return kind(mode, model, **options)


class AnswerTranslator:
    """Follows one Dify run of a message-based app (chat, agent-chat, agent, advanced-chat,
    completion) from its events.

    An event that is not answer text goes to the method HANDLERS names for it. The table holds
    names, not functions, so the method called is the instance's own: a subclass that overrides
    a handler (or extends the table) gets its override, for every event name that uses it.
    """

    HANDLERS = {
        "message_end": "on_message_end",
        "message_replace": "on_message_replace",
        "agent_thought": "on_agent_thought",
        "message_file": "on_message_file",
        "reasoning_chunk": "on_reasoning_chunk",
        "node_started": "on_node_started",
        "iteration_started": "on_node_started",
        "loop_started": "on_node_started",
        "node_finished": "on_node_finished",
        "workflow_finished": "on_workflow_finished",
        "workflow_paused": "on_workflow_paused",
        "error": "on_error",
    }

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
        handler = self.HANDLERS.get(name)
        return tuple(getattr(self, handler)(event)) if handler is not None else ()

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

    def on_message_end(self, event):
        usage = _object(_object(event.get("metadata")).get("usage"))
        self.usage = usage or None
        self.done = True
        return self._flush()

    def on_message_replace(self, event):
        self.replaced = True
        if self._splitter is not None:
            self._splitter = ThinkSplitter()
        answer = event.get("answer")
        return ((REPLACE, answer if answer.__class__ is str else ""),)

    def on_agent_thought(self, event):
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
            if new.strip() and not same_text("".join(self._round_text), thought):
                steps.append((("thought", key) if grows else None, new))
            state["thought"] = thought
        uses = tool_uses(event)
        if uses and not state["calls"]:
            state["calls"] = True
            steps.append((None, "\n\n".join(call_line(label, arguments) for label, arguments, _ in uses)))
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

    def on_message_file(self, event):
        seen = str(event.get("id") or event.get("url"))  # as text: Dify's ids are, malformed ones need not be
        if event.get("belongs_to") == "user" or seen in self._files:
            return ()
        self._files.add(seen)
        markdown = file_markdown(event, self.files_base)
        return self._block(markdown) if markdown else ()

    def on_reasoning_chunk(self, event):
        if self.think_tags == "hidden":
            return ()
        data = event.get("data") if isinstance(event.get("data"), dict) else event
        text = next((data[key] for key in ("reasoning", "text", "delta") if isinstance(data.get(key), str)), "")
        return self._reasoning(text, "reasoning_chunk") if text else ()

    def on_node_started(self, event):
        data = _object(event.get("data"))
        if (self.workflow_progress != "reasoning" or data.get("node_type") == "start"
                or data.get("iteration_id") or data.get("loop_id")):
            return ()
        title = data.get("title") or data.get("node_type") or "node"
        return self._reasoning(f" ▸ {title}" if self._reasoning_key == "progress" else f"running: {title}",
                               "progress")

    def on_node_finished(self, event):
        data = _object(event.get("data"))
        if (self.workflow_progress != "reasoning" or data.get("status") not in ("failed", "exception")
                or data.get("iteration_id") or data.get("loop_id")):
            return ()
        return self._reasoning(f"{data.get('title') or 'A node'} failed: "
                               f"{summarise(data.get('error') or 'no detail', OBSERVATION_LIMIT)}")

    def on_workflow_finished(self, event):
        data = _object(event.get("data"))
        if data.get("status") == "failed":
            self.failure = run_failed(self.model, data.get("error"))
            raise self.failure
        return ()

    def on_workflow_paused(self, event):
        self.failure = run_failed(self.model, "the workflow paused to wait for human input, which cannot be "
                                              "given through the OpenAI API")
        raise self.failure

    def on_error(self, event):
        code = event.get("code")
        raise from_dify(_error_status(event.get("status")), code if isinstance(code, str) else "",
                        str(event.get("message") or "no detail"), self.model)

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

    HANDLERS = {**AnswerTranslator.HANDLERS, "text_chunk": "on_text_chunk"}

    def on_text_chunk(self, event):
        text = _object(event.get("data")).get("text")
        if isinstance(text, str) and text:
            self._streamed = True
            return self._text(text)
        return ()

    def on_workflow_finished(self, event):
        super().on_workflow_finished(event)
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
