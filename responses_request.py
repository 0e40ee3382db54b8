"""The OpenAI Responses API's request, read into the chat request model the chat path runs.

The proxy serves `POST /v1/responses` with the same pipeline as chat completions: a
Responses body is translated into the ChatRequest the chat path runs (messages, function
tools, tool_choice, response_format); only the protocol is new. The answer is written back
by responses_output.py.

Input items map onto chat messages: `message` items keep their role (`developer` and
`system` fold into the system prompt), text parts become text, `input_image` and
`input_file` become the chat attachment parts, a `function_call` becomes an assistant
tool call and a `function_call_output` a tool result with the same call id, so the tool
loop renders exactly as in chat. Reasoning items are the model's own past thinking and
are not sent back. Tools of other types than `function` (web search, namespaces, custom
tools...) are not offered to the model; only a `tool_choice` forcing one is an error.
"""

import json
import logging
import re
from dataclasses import dataclass, field

from content import content_text
from errors import bad_request
from identity import MAX_USER
from openai_api import ChatRequest, parse_chat_request
from output_format import format_instructions
from responses_ids import named_call_name

log = logging.getLogger("opendify.responses")

MESSAGE_ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
CALL_ITEMS = ("function_call", "custom_tool_call")
OUTPUT_ITEMS = ("function_call_output", "custom_tool_call_output")
IGNORED_ITEMS = ("reasoning", "item_reference", "compaction")
_MESSAGE_PARAM = re.compile(r"messages\[(\d+)\]")


@dataclass
class ResponsesRequest:
    """A Responses API request: the chat request it runs as, and what the response object echoes."""
    chat: ChatRequest
    previous_response_id: str = ""
    echo: dict = field(default_factory=dict)
    origins: list = field(default_factory=list)  # per chat message, the request field it came from

    def client_terms(self, error):
        """An error about `messages[i]` (raised by the shared chat path) renamed to the input item it came from."""
        found = _MESSAGE_PARAM.match(error.param or "")
        if found is None or int(found.group(1)) >= len(self.origins):
            return error
        where, origin = found.group(0), self.origins[int(found.group(1))]
        error.param = origin + error.param[len(where):]
        error.message = error.message.replace(where, origin)
        return error


def parse_responses_request(body):
    """A ResponsesRequest from a decoded JSON body; 400 with `param` set when it cannot be served.
    Unknown fields (Codex's `client_metadata`, `prompt_cache_key`, `reasoning`...) are ignored. The chat
    request it runs as is made by the chat edge (openai_api.parse_chat_request), so the code behind
    both sees one set of shapes."""
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("'instructions' must be a string.", param="instructions", code="invalid_type")
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise bad_request("'previous_response_id' must be a string.", param="previous_response_id",
                          code="invalid_type")
    origins = []
    messages = input_messages(body.get("input"), instructions, origins)
    chat_body = {"tools": function_tools(body.get("tools")), "tool_choice": chat_tool_choice(body.get("tool_choice"))}
    if body.get("parallel_tool_calls") is not None:
        chat_body["parallel_tool_calls"] = body["parallel_tool_calls"]
    response_format = text_format(body.get("text"))
    if response_format is not None:
        chat_body["response_format"] = response_format
    user = next((body[k] for k in ("user", "safety_identifier") if isinstance(body.get(k), str) and body[k]), "")
    user = user[:MAX_USER]  # as much as the Dify end user takes; the response id carries it
    chat = parse_chat_request({**chat_body, "model": body.get("model"), "messages": messages,
                               "stream": body.get("stream") is True, "user": user, "inputs": body.get("inputs")})
    return ResponsesRequest(chat, previous or "", response_echo(body, instructions), origins)


def input_messages(items, instructions, origins):
    """Chat messages for the `input` (a string or a list of items), after the instructions; `origins`
    gets the field each message came from."""
    messages = [{"role": "system", "content": instructions}] if instructions else []
    origins[:] = ["instructions"] if instructions else []
    if isinstance(items, str):
        if not items.strip():
            raise bad_request("'input' is empty: send the text to answer.", param="input", code="invalid_value")
        origins.append("input")
        return messages + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad_request("'input' is required: a string or a non-empty array of input items.", param="input",
                          code="invalid_value")
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if isinstance(item, str):
            item = {"role": "user", "content": item}
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object (an input item).", param=where, code="invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(message_item(where, item))
        elif kind in CALL_ITEMS:
            add_call(messages, where, item)
        elif kind in OUTPUT_ITEMS:
            messages.append(call_output(where, item))
        elif kind not in IGNORED_ITEMS:
            log.debug("ignoring an input item of type %r", kind)
        origins.extend([where] * (len(messages) - len(origins)))
    if not any(m["role"] != "system" for m in messages):
        raise bad_request("'input' holds no message to answer.", param="input", code="invalid_value")
    return messages


def message_item(where, item):
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}; got {role!r}.",
                          param=f"{where}.role", code="invalid_value")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or an array of content parts.",
                          param=f"{where}.content", code="invalid_type")
    parts = [chat_part(f"{where}.content[{index}]", part) for index, part in enumerate(content)]
    parts = [part for part in parts if part is not None]
    if role != "user":  # only user turns carry attachments; the rest is text
        return {"role": role, "content": content_text(parts, placeholders=False)}
    return {"role": role, "content": parts}


def chat_part(where, part):
    """One Responses content part as a chat content part (None for parts with nothing to send)."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise bad_request(f"{where} must be a content part object.", param=where, code="invalid_type")
    kind = part.get("type")
    if kind in TEXT_PARTS:
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{where}.text must be a string.", param=f"{where}.text", code="invalid_type")
        return {"type": "text", "text": text}
    if kind == "refusal":
        return {"type": "text", "text": str(part.get("refusal") or "")}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise bad_request(f"{where} needs 'image_url' (an http(s) URL or a base64 data: URL); OpenAI file ids "
                              "cannot be resolved by this server.", param=f"{where}.image_url", code="invalid_image_url")
        return {"type": "image_url", "image_url": {"url": url, "detail": part.get("detail") or "auto"}}
    if kind == "input_file":
        if not part.get("file_data"):
            missing = "file_url" if part.get("file_url") else "file_id" if part.get("file_id") else None
            said = f" ({missing} is not supported: this server cannot fetch it)" if missing else ""
            raise bad_request(f"{where} needs 'file_data' (the file as a base64 data: URL) and 'filename'{said}.",
                              param=f"{where}.file_data", code="invalid_file")
        return {"type": "file", "file": {"file_data": part["file_data"], "filename": part.get("filename") or ""}}
    if kind == "input_audio":
        return {"type": "input_audio", "input_audio": part.get("input_audio")}
    log.debug("ignoring a content part of type %r", kind)
    return None


def add_call(messages, where, item):
    """A `function_call` item as a tool call of an assistant message (consecutive calls share one)."""
    name = item.get("name")
    call_id = item.get("call_id")
    if not isinstance(name, str) or not name or not isinstance(call_id, str) or not call_id:
        raise bad_request(f"{where} ({item.get('type')}) needs 'call_id' and 'name' strings.", param=where,
                          code="invalid_value")
    arguments = item.get("arguments", item.get("input", ""))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and isinstance(last.get("content"), (str, type(None))):
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def call_output(where, item):
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise bad_request(f"{where} ({item.get('type')}) needs a 'call_id' string.", param=f"{where}.call_id",
                          code="invalid_value")
    name = named_call_name(call_id)
    output = item.get("output")
    if isinstance(output, list):
        parts = (chat_part(f"{where}.output", part) for part in output)
        output = content_text([part for part in parts if part is not None], placeholders=False)
    elif not isinstance(output, str):
        output = json.dumps(output, ensure_ascii=False)
    result = {"role": "tool", "tool_call_id": call_id, "content": output}
    if name:
        result["name"] = name
    return result


def function_tools(tools):
    """The `function` tools in chat form; every other type (web search, namespaces, custom) is left out."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array of tools.", param="tools", code="invalid_type")
    chat_tools = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise bad_request(f"tools[{index}] must be an object.", param=f"tools[{index}]", code="invalid_type")
        if tool.get("type") == "function":
            function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
            chat_tools.append({"type": "function", "function": function})
    return chat_tools


def chat_tool_choice(choice):
    """`tool_choice` in chat form; forcing a tool that is not a function is a 400 naming its type."""
    if choice is None or isinstance(choice, str):
        return choice
    if not isinstance(choice, dict):
        raise bad_request("'tool_choice' must be a string or an object.", param="tool_choice", code="invalid_type")
    kind = choice.get("type")
    if kind == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    if kind in ("allowed_tools", "none", "auto", "required"):
        return choice
    raise bad_request(f"'tool_choice' forces a '{kind}' tool, which this server cannot run: it offers the model "
                      "only the request's function tools.", param="tool_choice", code="unsupported_tool_choice")


def text_format(text):
    """`text.format` as a chat `response_format` (None for plain text); 400 when ill-formed."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad_request("'text' must be an object.", param="text", code="invalid_type")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("'text.format' must be an object with a 'type'.", param="text.format", code="invalid_type")
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        response_format = {"type": "json_schema", "json_schema": spec}
    else:
        response_format = {"type": fmt.get("type")}
    format_instructions(response_format, "text.format")  # refuses an ill-formed format up front
    return response_format


def response_echo(body, instructions):
    """The request fields a response object repeats, in the spec's shape."""
    tools = [{"type": "function", "name": t.get("name"), "description": t.get("description"),
              "parameters": t.get("parameters"), "strict": bool(t.get("strict", True))}
             for t in body.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"]
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    fmt = text.get("format") if isinstance(text.get("format"), dict) else {"type": "text"}
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}

    def number(name):
        value = body.get(name)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    echo = {
        "instructions": instructions,
        "metadata": metadata,
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "temperature": number("temperature"),
        "top_p": number("top_p"),
        "max_output_tokens": number("max_output_tokens"),
        "tool_choice": body.get("tool_choice") if body.get("tool_choice") is not None else "auto",
        "tools": tools,
        "text": {"format": fmt},
        "store": body.get("store") is not False,
        "truncation": "disabled",
        "reasoning": {"effort": None, "summary": None},
        "background": False,
        "service_tier": "default",
    }
    echo.update({name: body[name] for name in ("user", "safety_identifier", "prompt_cache_key")
                 if isinstance(body.get(name), str)})
    return echo
