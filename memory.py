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
"""

from urllib.parse import urlsplit

SYSTEM_ROLES = ("system", "developer")


def part_text(part):
    """One content part as text; attachments become placeholders like `[image: cat.png]`."""
    if not isinstance(part, dict):
        return str(part) if isinstance(part, str) else ""
    kind = part.get("type")
    if kind in ("text", "input_text", "output_text"):
        return str(part.get("text") or "")
    if kind == "refusal":
        return str(part.get("refusal") or "")
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url", "") if isinstance(image, dict) else str(image or "")
        name = "" if url.startswith("data:") else urlsplit(url).path.rsplit("/", 1)[-1]
        return f"[image: {name}]" if name else "[image]"
    if kind == "input_audio":
        audio = part.get("input_audio")
        fmt = audio.get("format") if isinstance(audio, dict) else None
        return f"[audio: {fmt}]" if fmt else "[audio]"
    if kind == "file":
        file = part.get("file")
        name = file.get("filename") if isinstance(file, dict) else None
        return f"[file: {name}]" if name else "[file]"
    return f"[{kind}]" if kind else ""


def content_text(content):
    """Message content (string, list of parts or null) as plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(text for text in (part_text(part) for part in content) if text)


def render_tool_calls(tool_calls):
    lines = []
    for call in tool_calls or ():
        function = call.get("function") or {}
        lines.append(f'<tool_call id="{call.get("id", "")}">'
                     f'{{"name": "{function.get("name", "")}", "arguments": {function.get("arguments") or "{}"}}}'
                     "</tool_call>")
    return "\n".join(lines)


def render_tool_result(message, names_by_id):
    call_id = message.get("tool_call_id") or ""
    name = message.get("name") or names_by_id.get(call_id, "")
    return f'<tool_result id="{call_id}" name="{name}">\n{content_text(message.get("content"))}\n</tool_result>'


def render_turn(message, names_by_id):
    role = message.get("role")
    if role in ("tool", "function"):
        return render_tool_result(message, names_by_id)
    text = content_text(message.get("content"))
    if role == "assistant":
        calls = list(message.get("tool_calls") or ())
        legacy = message.get("function_call")
        if isinstance(legacy, dict):
            calls.append({"id": "", "function": legacy})
        text = "\n".join(t for t in (text, render_tool_calls(calls)) if t)
    name = message.get("name")
    attribute = f' name="{name}"' if isinstance(name, str) and name else ""
    return f"<{role}{attribute}>\n{text}\n</{role}>"


def tool_names(messages):
    """tool_call_id → function name, so a result can name the tool it answers."""
    names = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict):
                names[call.get("id")] = (call.get("function") or {}).get("name", "")
    return names


def system_prompt(messages):
    return "\n\n".join(t for t in (content_text(m.get("content")) for m in messages
                                   if m.get("role") in SYSTEM_ROLES) if t)


def split_turns(messages):
    """(conversation so far, new turns): the new turns are those after the last assistant message."""
    turns = [m for m in messages if m.get("role") not in SYSTEM_ROLES]
    last = max((i for i, m in enumerate(turns) if m.get("role") == "assistant"), default=-1)
    if last == len(turns) - 1 and last >= 0:
        return turns, []
    return turns[:last + 1], turns[last + 1:]


def render_new_turns(turns, names_by_id):
    if len(turns) == 1 and turns[0].get("role") == "user" and not turns[0].get("name"):
        return content_text(turns[0].get("content"))
    return "\n".join(render_turn(m, names_by_id) for m in turns)


def fold_query(messages, *, include_system=True):
    """Mode 1: the whole transcript as one Dify query."""
    names = tool_names(messages)
    history, new = split_turns(messages)
    blocks = []
    system = system_prompt(messages) if include_system else ""
    if system:
        blocks.append(f"<system>\n{system}\n</system>")
    if history:
        blocks.append("<history>\n" + "\n".join(render_turn(m, names) for m in history) + "\n</history>")
    if new:
        blocks.append(render_new_turns(new, names))
    elif history:
        blocks.append("Continue your last reply.")
    return "\n\n".join(blocks)
