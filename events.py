"""Dify's stream events, translated into the pieces an OpenAI answer is made of.

A piece is a (kind, value) tuple, in answer order:
  (CONTENT, text)    text to append to the answer;
  (REASONING, text)  thinking to show apart from the answer (`reasoning_content`);
  (REPLACE, text)    Dify's moderation replaced the whole answer with this text;
  (TOOL_CALL, call)  a client tool call {"index", "id", "name", "arguments"};
  (MARK, text)       invisible text that must reach the client whole, in one chunk.
Everything else a
run reports (usage, the conversation id, how it ended) is kept on the
translator. Any event that carries an `answer` string is text, whatever its name, because
Dify 1.11.2+ sends text chunks as `message_file` events once a message has a file.
"""

from errors import from_dify

CONTENT = "content"
REASONING = "reasoning"
REPLACE = "replace"
TOOL_CALL = "tool_call"
MARK = "mark"

_NOT_TEXT = frozenset(("message_replace", "message_end"))


class AnswerTranslator:
    """Follows one Dify run (chat, agent-chat, advanced-chat or agent) from its events."""

    def __init__(self, mode, model):
        self.mode = mode
        self.model = model
        self.usage = None
        self.conversation_id = None
        self.done = False
        self.replaced = False
        self.failure = None
        self._agent_text = False

    def feed(self, event):
        """The pieces one event adds; raises APIError for an error event."""
        name = event.get("event")
        answer = event.get("answer")
        if answer.__class__ is str and name not in _NOT_TEXT:
            if name == "agent_message":
                self._agent_text = True
            elif self._agent_text and self.mode == "agent":
                return ()
            return ((CONTENT, answer),) if answer else ()
        if event.get("conversation_id") and self.conversation_id is None:
            self.conversation_id = event["conversation_id"]
        if name == "message_end":
            self.usage = (event.get("metadata") or {}).get("usage") or None
            self.done = True
            if self.conversation_id is None:
                self.conversation_id = event.get("conversation_id")
        elif name == "message_replace":
            self.replaced = True
            return ((REPLACE, answer or ""),)
        elif name == "workflow_finished":
            data = event.get("data") or {}
            if data.get("status") == "failed":
                self.failure = from_dify(400, "workflow_failed", f"Run failed: {data.get('error') or 'no detail'}",
                                         self.model)
        elif name == "error":
            raise from_dify(int(event.get("status") or 500), event.get("code") or "",
                            str(event.get("message") or "no detail"), self.model)
        return ()

    def finish_reason(self):
        return "content_filter" if self.replaced else "stop"

