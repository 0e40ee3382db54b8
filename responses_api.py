"""The OpenAI Responses API: its request read into the chat request model, its answer written back.

The proxy serves `POST /v1/responses` with the same pipeline as chat completions: a
Responses body is translated into the ChatRequest the chat path runs (messages, function
tools, tool_choice, response_format), and the answer's pieces are written as Responses
output items, as one JSON object or as the typed event stream. Only the protocol is new.

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
import time
import uuid
from dataclasses import dataclass, field

from content import content_text
from errors import bad_request
from openai_api import ChatRequest, ChunkEncoder, json_string, parse_chat_request
from output_format import format_instructions

log = logging.getLogger("opendify.responses")

MESSAGE_ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
CALL_ITEMS = ("function_call", "custom_tool_call")
OUTPUT_ITEMS = ("function_call_output", "custom_tool_call_output")
IGNORED_ITEMS = ("reasoning", "item_reference", "compaction")
MAX_USER = 64
_MESSAGE_PARAM = re.compile(r"messages\[(\d+)\]")
_NAMED_CALL_ID = re.compile(r"call_[A-Za-z0-9]{1,40}__([A-Za-z0-9_.:-]{1,64})\Z")


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

    @property
    def model(self):
        return self.chat.model

    @property
    def stream(self):
        return self.chat.stream


# --- the request ---------------------------------------------------------------------------

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


def named_call_id(call_id, name):
    """The call id a client sees: the proxy's own, with the function's name after `__`. A later
    `function_call_output` names only the call id; with `previous_response_id` its call is not in the
    request, and the name read back from the id lets the result say which tool it answers."""
    named = f"{call_id}__{name}"
    return named if _NAMED_CALL_ID.match(named) else call_id


def call_output(where, item):
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise bad_request(f"{where} ({item.get('type')}) needs a 'call_id' string.", param=f"{where}.call_id",
                          code="invalid_value")
    named = _NAMED_CALL_ID.match(call_id)
    output = item.get("output")
    if isinstance(output, list):
        parts = (chat_part(f"{where}.output", part) for part in output)
        output = content_text([part for part in parts if part is not None], placeholders=False)
    elif not isinstance(output, str):
        output = json.dumps(output, ensure_ascii=False)
    result = {"role": "tool", "tool_call_id": call_id, "content": output}
    if named:
        result["name"] = named.group(1)
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


# --- the response --------------------------------------------------------------------------

def new_item_id(prefix):
    return prefix + uuid.uuid4().hex


def usage_object(usage):
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


def text_part(text):
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item_object(item_id, text, status="completed"):
    content = [text_part(text)] if status == "completed" or text else []
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def reasoning_item_object(item_id, text):
    return {"id": item_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}] if text else []}


def function_call_object(item_id, call, status="completed"):
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call["id"], "name": call["name"],
            "arguments": call["arguments"] if status == "completed" else ""}


def ending(finish_reason):
    """(status, incomplete_details) for the answer's finish reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def response_error(error):
    """The spec's response error: its `code` is one of a fixed list, so the proxy's own code goes in the message."""
    code = "rate_limit_exceeded" if error.status_code == 429 else "server_error"
    return {"code": code, "message": f"{error.message} ({error.code or error.type})"}


def response_object(response_id, created_at, model, echo, output, status, usage=None, error=None, incomplete=None,
                    previous_response_id=None):
    body = {"id": response_id, "object": "response", "created_at": created_at, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error, "incomplete_details": incomplete, "model": model, "output": output,
            "previous_response_id": previous_response_id or None}
    if usage is not None:
        body["usage"] = usage_object(usage)
    body.update(echo)
    return body


def answer_output(answer):
    """The output items of a whole (non-streamed) answer: its reasoning, its text, then its calls."""
    output = []
    reasoning = "".join(answer.reasoning)
    if reasoning:
        output.append(reasoning_item_object(new_item_id("rs_"), reasoning))
    text = "".join(answer.content)
    if text or not answer.tool_calls:
        output.append(message_item_object(new_item_id("msg_"), text))
    for call in answer.tool_calls:
        name = call["function"]["name"]
        flat = {"id": named_call_id(call["id"], name), "name": name, "arguments": call["function"]["arguments"]}
        output.append(function_call_object(new_item_id("fc_"), flat))
    return output


class ResponseEventEncoder:
    """The Responses event stream of one answer, as bytes, for streaming.EventStreamResponse.

    It speaks the chat encoder's interface (content, reasoning, tool_call, finish, error), so
    the relay, pacing and keep-alives are the chat path's own; it keeps the output items open
    and closed in order and numbers every event. `response.created` waits for the Dify run's
    first event, because the response id is made of the conversation and message ids that
    event names (`describe` builds the response object around an output list).
    """

    DONE = b""
    KEEPALIVE = ChunkEncoder.KEEPALIVE

    def __init__(self, describe, identify):
        self.describe = describe  # (output, status, error=None, incomplete=None) -> response object
        self.identify = identify  # () -> True once the response id is known
        self.sequence = 0
        self.output = []
        self.started = False
        self._open = None  # "message" | "reasoning" | None
        self._item_id = ""
        self._texts = []
        self._delta_head = ""
        self._delta_event = b""

    def _event(self, kind, data):
        data["sequence_number"] = self.sequence
        self.sequence += 1
        return ("event: " + kind + "\ndata: " + json.dumps({"type": kind, **data}, ensure_ascii=False)
                + "\n\n").encode()

    def _start(self, force=False):
        if self.started or not (force or self.identify()):
            return b""
        self.started = True
        response = self.describe([], "in_progress")
        return (self._event("response.created", {"response": response})
                + self._event("response.in_progress", {"response": response}))

    def role(self):
        return self._start()

    def _open_item(self, kind):
        out = self._start(force=True) + self._close()
        index = len(self.output)
        self._open, self._item_id, self._texts = kind, new_item_id("msg_" if kind == "message" else "rs_"), []
        if kind == "message":
            out += self._event("response.output_item.added", {
                "output_index": index, "item": message_item_object(self._item_id, "", "in_progress")})
            out += self._event("response.content_part.added", {
                "item_id": self._item_id, "output_index": index, "content_index": 0, "part": text_part("")})
            self._delta_head = ('{"type":"response.output_text.delta","item_id":"%s","output_index":%d,'
                                '"content_index":0,"logprobs":[],"delta":' % (self._item_id, index))
            self._delta_event = b"event: response.output_text.delta\ndata: "
        else:
            out += self._event("response.output_item.added", {
                "output_index": index, "item": reasoning_item_object(self._item_id, "")})
            out += self._event("response.reasoning_summary_part.added", {
                "item_id": self._item_id, "output_index": index, "summary_index": 0,
                "part": {"type": "summary_text", "text": ""}})
            self._delta_head = ('{"type":"response.reasoning_summary_text.delta","item_id":"%s","output_index":%d,'
                                '"summary_index":0,"delta":' % (self._item_id, index))
            self._delta_event = b"event: response.reasoning_summary_text.delta\ndata: "
        return out

    def _delta(self, kind, text):
        out = self._open_item(kind) if self._open != kind else b""
        self._texts.append(text)
        sequence = self.sequence
        self.sequence += 1
        return out + self._delta_event + (self._delta_head + json_string(text) + ',"sequence_number":%d}\n\n'
                                          % sequence).encode()

    def content(self, text):
        return self._delta("message", text) if text else b""

    def reasoning(self, text):
        return self._delta("reasoning", text) if text else b""

    def _close(self):
        """Ends the open message or reasoning item with its done events."""
        kind, self._open = self._open, None
        if kind is None:
            return b""
        index, item_id, text = len(self.output), self._item_id, "".join(self._texts)
        if kind == "message":
            item = message_item_object(item_id, text)
            out = (self._event("response.output_text.done", {"item_id": item_id, "output_index": index,
                                                            "content_index": 0, "text": text, "logprobs": []})
                   + self._event("response.content_part.done", {"item_id": item_id, "output_index": index,
                                                               "content_index": 0, "part": text_part(text)}))
        else:
            item = reasoning_item_object(item_id, text)
            part = {"type": "summary_text", "text": text}
            out = (self._event("response.reasoning_summary_text.done", {"item_id": item_id, "output_index": index,
                                                                       "summary_index": 0, "text": text})
                   + self._event("response.reasoning_summary_part.done", {"item_id": item_id, "output_index": index,
                                                                         "summary_index": 0, "part": part}))
        self.output.append(item)
        return out + self._event("response.output_item.done", {"output_index": index, "item": item})

    def tool_call(self, index, call_id, name, arguments):
        out = self._start(force=True) + self._close()
        position, item_id = len(self.output), new_item_id("fc_")
        call = {"id": named_call_id(call_id, name), "name": name, "arguments": arguments}
        item = function_call_object(item_id, call)
        self.output.append(item)
        return (out + self._event("response.output_item.added", {
                    "output_index": position, "item": function_call_object(item_id, call, "in_progress")})
                + self._event("response.function_call_arguments.delta", {
                    "item_id": item_id, "output_index": position, "delta": arguments})
                + self._event("response.function_call_arguments.done", {
                    "item_id": item_id, "output_index": position, "name": name, "arguments": arguments})
                + self._event("response.output_item.done", {"output_index": position, "item": item}))

    def function_call(self, name, arguments):
        return b""  # legacy `functions` answers never come from a Responses request

    def finish(self, reason):
        out = self._start(force=True) + self._close()
        status, incomplete = ending(reason)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + self._event(kind, {"response": self.describe(self.output, status, None, incomplete)})

    def usage(self, usage):
        return b""

    def error(self, api_error):
        out = self._start(force=True) + self._close()
        response = self.describe(self.output, "failed", response_error(api_error))
        return out + self._event("response.failed", {"response": response})
