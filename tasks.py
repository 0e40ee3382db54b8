"""Background task requests: the titles, tags and follow-up suggestions chat UIs ask a model for.

Open WebUI (title, tags, follow-ups, search queries, autocomplete, emoji), LibreChat (titles),
Cherry Studio and LobeChat (topic titles) send these to the chat's own model unless the user picks
a separate task model. Over Dify each is a full app run (a full agent run on an agent app) and, in
memory mode 2, a throwaway conversation named after the task. The proxy recognises them
(`task_kind`) and, whatever TASK_MODEL says, never lets them create a marked conversation or
continue a chat's: they run one-shot, folded as in mode 1, and the Dify conversation a chat app
makes for them is deleted once answered. TASK_MODEL can route them to a cheap app, or `local`
answers them here at no cost (`local_answer`): a title made of the chat's first words, no tags
beyond "General", no follow-ups, no search queries.
"""

import json
import re

from content import content_text

# Open WebUI: one user message, "### Task:" then the instructions, quoting the chat.
_OPEN_WEBUI = re.compile(r"\A\s*###\s*Task:\s*(.{0,300})", re.S | re.I)
_OPEN_WEBUI_BODY = re.compile(r"<chat_history>|###\s*(?:Output|Chat History|Guidelines)|JSON format", re.I)
_OPEN_WEBUI_KINDS = (
    ("follow_ups", re.compile(r"follow-?up", re.I)),
    ("tags", re.compile(r"\btags\b", re.I)),
    ("title", re.compile(r"\btitle\b", re.I)),
    ("queries", re.compile(r"\bqueries\b", re.I)),
    ("autocomplete", re.compile(r"autocompletion", re.I)),
)
_OPEN_WEBUI_EMOJI = re.compile(r"reflect the speaker's likely facial expression through a fitting emoji", re.I)
# LibreChat, Cherry Studio, LobeChat: a title in plain text.
_PLAIN_TITLE = re.compile(
    r"5-word-or-less title for the conversation|Analyze this conversation and provide:.{0,200}concise title"
    r"|summarize the (?:user's )?conversation into a title|conversation summarizer", re.S | re.I)
_FIRST_USER_LINE = re.compile(r"^\s*(?:USER|User|user|Human)\s*:\s*(.+)$", re.M)
_TITLE_WORDS = 5


def task_kind(messages):
    """What background task a request is ("title", "tags", "follow_ups", "queries", "autocomplete",
    "emoji", "plain_title" or "task" for another Open WebUI task), or None for a real chat turn."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        return None
    last = content_text(users[-1].get("content"), placeholders=False)
    found = _OPEN_WEBUI.match(last)
    if found and len(users) == 1 and not any(m.get("role") == "assistant" for m in messages) \
            and _OPEN_WEBUI_BODY.search(last):
        head = found.group(1)
        return next((kind for kind, pattern in _OPEN_WEBUI_KINDS if pattern.search(head)), "task")
    if len(users) == 1 and _OPEN_WEBUI_EMOJI.search(last):
        return "emoji"
    system = " ".join(content_text(m.get("content"), placeholders=False) for m in messages
                      if m.get("role") in ("system", "developer"))
    if _PLAIN_TITLE.search(system[:2000]) or _PLAIN_TITLE.search(last[:2000]):
        return "plain_title"
    return None


def _first_words(messages):
    """A title from the first thing the user said in the quoted chat: its first words."""
    for message in messages:
        text = content_text(message.get("content"), placeholders=False)
        quoted = _FIRST_USER_LINE.search(text)
        if quoted:
            text = quoted.group(1)
        elif message.get("role") != "user" or _OPEN_WEBUI.match(text) or _PLAIN_TITLE.search(text):
            continue
        words = re.sub(r"[^\w\s'-]", " ", text).split()
        if words:
            return " ".join(words[:_TITLE_WORDS])[:60]
    return "New Chat"


def local_answer(kind, messages):
    """The proxy's own answer to a background task, in the shape the client parses; None for a task it
    cannot answer sensibly without a model (left to the app)."""
    if kind == "title":
        return json.dumps({"title": _first_words(messages)}, ensure_ascii=False)
    if kind == "plain_title":
        return _first_words(messages)
    if kind == "tags":
        return json.dumps({"tags": ["General"]})
    if kind == "follow_ups":
        return json.dumps({"follow_ups": []})
    if kind == "queries":
        return json.dumps({"queries": []})
    if kind == "autocomplete":
        return json.dumps({"text": ""})
    if kind == "emoji":
        return "\U0001F642"
    return None
