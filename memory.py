"""Conversation memory: how an OpenAI message list becomes the one `query` Dify takes.

Mode 1 (history_message): every request is a fresh Dify conversation and the whole
transcript is folded into the query, in tagged blocks a model reads unambiguously:

    <system>
    You are terse.
    </system>

    <history>
    <user>
    Weather in Paris?
    </user>
    <assistant>
    ...
    </assistant>
    </history>

    And tomorrow?

The system/developer prompt appears once, list content is rendered as text (attachments
as short placeholders, never base64), and assistant tool calls and tool results are kept.
A single plain user message is sent as itself.

Mode 2 (conversation marks): Dify keeps the conversation, and every reply ends with an
invisible mark (see marks.py) carrying the Dify conversation id. The mark's integrity
check is bound to the app, the client, and a digest of the visible transcript up to and
including that reply. So the mark on the newest reply validates only if the chat the
client resends is the chat Dify holds: a forged mark, another client's or app's mark, or
a history the user edited or trimmed all fail the same check, and the proxy then starts a
fresh Dify conversation from the visible history instead of continuing a stale one. No
state is kept on the server, so restarts and several instances agree.
"""

import hashlib
import json
import uuid
from dataclasses import dataclass

import marks
from content import content_text
from errors import bad_request
from tool_history import render_tool_calls, render_tool_result

SYSTEM_ROLES = ("system", "developer")


def render_turn(message, names_by_id):
    role = message.get("role")
    if role in ("tool", "function"):
        return render_tool_result(message, names_by_id)
    text = content_text(message.get("content"))
    if role == "assistant":
        text = marks.strip_marks(text).strip()
        calls = list(message.get("tool_calls") or ())
        if "function_call" in message:
            calls.append({"id": "", "function": message["function_call"]})
        text = "\n".join(t for t in (text, render_tool_calls(calls)) if t)
    name = message.get("name")
    attribute = f' name="{name}"' if name else ""
    return f"<{role}{attribute}>\n{text}\n</{role}>"


def tool_names(messages):
    """tool_call_id → function name, so a result can name the tool it answers."""
    names = {}
    for message in messages:
        for call in message.get("tool_calls", ()):
            names[call.get("id")] = call["function"]["name"]
    return names


def system_prompt(messages):
    return "\n\n".join(t for t in (content_text(m.get("content")) for m in messages
                                   if m.get("role") in SYSTEM_ROLES) if t)


def new_turn_start(messages):
    """Where the new turn starts: just after the last assistant message (0 when there is none). The new
    turn is what the client asks now; everything before it is the conversation so far."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "assistant":
            return index + 1
    return 0


def _turns(messages):
    """The messages that are turns of the chat: all but the system and developer prompts."""
    return [m for m in messages if m.get("role") not in SYSTEM_ROLES]


def split_turns(messages):
    """(conversation so far, new turns), the system and developer prompts left out of both."""
    start = new_turn_start(messages)
    return _turns(messages[:start]), _turns(messages[start:])


def render_new_turns(turns, names_by_id):
    """The new turns as the query: a lone user message as itself, anything else as tagged blocks."""
    if len(turns) == 1 and turns[0].get("role") == "user" and not turns[0].get("name"):
        return content_text(turns[0].get("content"))
    return "\n".join(render_turn(m, names_by_id) for m in turns)


def folded_blocks(messages):
    """Mode 1's query as its blocks, each with what it holds: (label, text). The labels let an error
    about the query's size say what made it long."""
    names = tool_names(messages)
    history, new = split_turns(messages)
    blocks = []
    system = system_prompt(messages)
    if system:
        blocks.append(("the system prompt", f"<system>\n{system}\n</system>"))
    if history:
        label = f"{len(history)} earlier message{'s' if len(history) != 1 else ''}"
        blocks.append((label, "<history>\n" + "\n".join(render_turn(m, names) for m in history) + "\n</history>"))
    if new:
        blocks.append(("the new message" if len(new) == 1 else f"{len(new)} new messages",
                       render_new_turns(new, names)))
    elif history:
        blocks.append(("the request to continue", "Continue your last reply."))
    return blocks


def fold_query(messages):
    """Mode 1: the whole transcript as one Dify query."""
    return "\n\n".join(text for _, text in folded_blocks(messages))


@dataclass(frozen=True)
class Binding:
    """What a mark is bound to besides the transcript: the server secret, the app and the client."""
    secret: bytes
    app_id: str
    client: str


@dataclass
class Plan:
    """What to ask Dify: continue `conversation_id` with `query`, or ("", the whole chat folded).

    A plan read from a version-2 mark holds, until checked against Dify, the fingerprint of the
    Dify message the mark sits on (`sits_on`): the conversation is continued only if that is
    still its newest message. `tools_seen` is the fingerprint of the tool catalogue the
    conversation was last given (None: unknown, give it the catalogue)."""
    conversation_id: str
    query: str
    fresh_query: str
    explicit: bool = False
    sits_on: bytes | None = None
    tools_seen: bytes | None = None

    def fresh(self):
        """The plan for a fresh conversation from the whole visible chat."""
        return fresh_plan(self.fresh_query)


def fresh_plan(folded):
    """The plan for a fresh Dify conversation, asked the whole chat folded into one query."""
    return Plan("", folded, folded)


def _call_summary(call):
    function = call["function"]
    try:
        arguments = json.dumps(json.loads(function["arguments"]), sort_keys=True, ensure_ascii=False)
    except ValueError:
        arguments = " ".join(function["arguments"].split())
    return [function["name"], arguments]


def transcript_digest(messages):
    """A digest of what the user sees of a chat. What clients change harmlessly (whitespace,
    the marks themselves, call ids, list versus string content) does not change it."""
    digest = hashlib.sha256()
    for message in messages:
        text = " ".join(marks.strip_marks(content_text(message.get("content"))).split())
        calls = [_call_summary(call) for call in message.get("tool_calls", ())]
        entry = [message.get("role"), text, calls]
        digest.update(json.dumps(entry, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


def _mark_client(binding, messages):
    return f"{binding.client}:{transcript_digest(messages)}"


def _newest_marked_reply(messages):
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.get("role") == "assistant" and _has_mark(message.get("content")):
            return index
    return None


def _has_mark(content):
    return marks.has_mark_characters(content_text(content, placeholders=False))


def checked_conversation_id(value):
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise bad_request("conversation_id must be a Dify conversation id (a UUID).", param="conversation_id",
                          code="invalid_value")


def plan_conversation(messages, binding, explicit_id=""):
    """Mode 2: continue the Dify conversation whose mark is on the newest reply, sending only
    the turns after it, when that mark is valid for this app, client and visible history;
    otherwise a fresh conversation from the whole chat, folded as in mode 1."""
    fresh = fold_query(messages)
    names = tool_names(messages)
    if explicit_id:
        _, new = split_turns(messages)
        return Plan(checked_conversation_id(explicit_id), render_new_turns(new, names) or fresh, fresh, True)
    index = _newest_marked_reply(messages)
    if index is None:
        return fresh_plan(fresh)
    reply = content_text(messages[index].get("content"), placeholders=False)
    found = marks.find_mark(reply, secret=binding.secret, app_id=binding.app_id,
                            client_id=_mark_client(binding, messages[:index + 1]))
    new = _turns(messages[index + 1:])
    if found is None or not new:
        return fresh_plan(fresh)
    return Plan(found.conversation_id, render_new_turns(new, names), fresh, sits_on=found.message,
                tools_seen=found.tools)


def is_newest(plan, message_id, binding):
    """Whether the Dify message a plan's mark sits on is `message_id`, its conversation's newest
    message. It is not when the client regenerated or edited its last turn: Dify then holds a
    discarded answer after the marked one."""
    return isinstance(message_id, str) and plan.sits_on == marks.fingerprint(binding.secret, "message", message_id)


def tools_fingerprint(catalogue, binding):
    return marks.fingerprint(binding.secret, "tools", catalogue)


def reply_mark(conversation_id, message_id, tools_seen, messages, reply_text, tool_calls, binding):
    """The mark that ends a reply, bound to the transcript the client will resend, carrying the Dify
    message it sits on and the tool catalogue the conversation now has."""
    reply = {"role": "assistant", "content": reply_text, "tool_calls": tool_calls}
    return marks.make_mark(conversation_id, secret=binding.secret, app_id=binding.app_id,
                           client_id=_mark_client(binding, list(messages) + [reply]), message_id=message_id,
                           tools=tools_seen)
