"""The OpenAI request edge: the chat request model parsed from a client's body (chat and legacy
text completions; the Responses API's request is made into one too). The answers are written
by openai_output.py.

Parsing is lenient by design: every documented field and any unknown one is accepted and
ignored where Dify cannot honour it, because real clients (Cherry Studio, LibreChat, Roo
Code) send extras and break on proxies that reject them. Only `model` and `messages` can
make a request invalid.

This is the edge: the body is decoded, bounded in depth, cleaned of lone surrogates and
its messages normalised here, once, so everything behind it can trust their shapes. A
shape whose intent is clear is read tolerantly (a null `name` is no name, a string part is
a text part); any other is a 400 whose `param` names the field, like
`messages[2].tool_calls[0].function`.
"""

import json
import re
from dataclasses import dataclass, field

from attachments import ATTACHMENT_PARTS
from content import TEXT_PARTS
from errors import bad_request
from output_format import format_instructions, wants_json
from tool_request import ToolRequestError, tool_request

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass
class ChatRequest:
    model: str
    messages: list
    stream: bool = False
    include_usage: bool = False
    user: str = ""
    inputs: dict = field(default_factory=dict)
    conversation_id: str = ""
    body: dict = field(default_factory=dict, repr=False)
    tools: object = None  # the tools the client offers (a tool_request.ToolRequest), or None
    format_instructions: str = ""  # what `response_format` asks of the model in words ("" for plain text)
    structured: bool = False  # `response_format` asks for JSON: the reply must parse as JSON


# Deeper than any real request (tool schemas included); deeper bodies would exhaust the recursion of
# the code behind the edge (json.dumps, the tool code) and are refused instead.
MAX_NESTING = 100
# Bodies larger than this are decoded off the event loop (see `parse_body`).
LARGE_BODY_BYTES = 1 << 20
_SURROGATE = re.compile("[\ud800-\udfff]")


def _object(pairs):
    """json's object hook. A Python function on purpose: the decoder calls it for every object, and
    each call lets the interpreter hand the GIL to the event loop, so decoding a large body in an
    executor thread never holds the loop for longer than one object (json.loads alone would)."""
    return dict(pairs)


def parse_body(raw):
    """The body's JSON object, no deeper than MAX_NESTING, with lone surrogates (which no encoder
    can write) replaced by U+FFFD. Large bodies are meant to be decoded in an executor thread."""
    try:
        body = json.loads(raw or b"", object_pairs_hook=_object)
    except RecursionError:
        raise too_deep()
    except (ValueError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON.", code="invalid_json")
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return clean_json(body)


def too_deep():
    return bad_request(f"The request body is nested deeper than {MAX_NESTING} levels.", code="invalid_json")


def clean_string(text):
    """`text` with lone surrogates replaced by U+FFFD (a decoded JSON string keeps valid pairs joined)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def clean_json(value):
    """Walks decoded JSON without recursion: refuses nesting past MAX_NESTING and cleans every string,
    keys included, in place."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise too_deep()
        if isinstance(node, dict):
            if not all(clean_string(key) is key for key in node):
                items = list(node.items())
                node.clear()
                node.update((clean_string(key), item) for key, item in items)
            entries = node.items()
        else:
            entries = enumerate(node)
        for key, item in entries:
            if isinstance(item, str):
                cleaned = clean_string(item)
                if cleaned is not item:
                    node[key] = cleaned
            elif isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
    return value


def _refuse(param, message, code="invalid_type"):
    return bad_request(f"{param} {message}", param=param, code=code)


def _optional_string(message, key, where):
    """A string field that may be absent or null (both read as absent)."""
    value = message.get(key)
    if value is None:
        message.pop(key, None)
    elif not isinstance(value, str):
        raise _refuse(f"{where}.{key}", f"must be a string; got {type(value).__name__}.")


def normalise_attachment(part, where):
    """An attachment part's holder in one shape: `image_url` an object with a string `url` (a bare URL
    string is read as one), `file` and `input_audio` objects. What they hold is checked by
    attachments.py when the new turn's files are sent."""
    kind = part["type"]
    if kind == "image_url":
        image = part.get("image_url")
        if isinstance(image, str):
            return {**part, "image_url": {"url": image}}
        if not isinstance(image, dict) or not isinstance(image.get("url"), str):
            raise bad_request(f"{where}.image_url.url must be an http(s) URL or a data: URL holding a base64 image.",
                              param=where, code="invalid_image_url")
    elif kind == "file" and not isinstance(part.get("file"), dict):
        raise bad_request(f"{where}.file must be an object with 'file_data' and 'filename'.", param=where,
                          code="invalid_file")
    elif kind == "input_audio" and not isinstance(part.get("input_audio"), dict):
        raise bad_request(f"{where}.input_audio must be an object with base64 'data' and a 'format' (wav or mp3).",
                          param=where, code="invalid_audio")
    return part


def normalise_part(part, where):
    """One content part: a string is a text part; a text part's missing text is empty; an attachment's
    holder has one shape (`normalise_attachment`); any other part must be an object with a string `type`."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise _refuse(where, "must be a content part object like {\"type\": \"text\", \"text\": \"...\"}.")
    kind = part.get("type")
    if kind is None and isinstance(part.get("text"), str):
        kind = "text"
    if not isinstance(kind, str) or not kind:
        raise _refuse(f"{where}.type", "must be a string naming the part's type (text, image_url, file, ...).")
    part = {**part, "type": kind}
    if kind in TEXT_PARTS or kind == "refusal":
        key = "refusal" if kind == "refusal" else "text"
        if part.get(key) is None:
            part[key] = ""
        elif not isinstance(part[key], str):
            raise _refuse(f"{where}.{key}", f"must be a string; got {type(part[key]).__name__}.")
    elif kind in ATTACHMENT_PARTS:
        return normalise_attachment(part, where)
    return part


def normalise_content(content, where):
    """Message content: null, a string, or a list of parts (each normalised)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return [normalise_part(part, f"{where}[{index}]") for index, part in enumerate(content)]
    raise _refuse(where, "must be a string, an array of content parts or null.")


def normalise_function(function, where):
    """A called function {name, arguments}: arguments given as JSON rather than a string are encoded,
    missing ones are empty."""
    if not isinstance(function, dict):
        raise _refuse(where, "must be an object with 'name' and 'arguments'.")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise _refuse(f"{where}.name", "must be the called function's name (a non-empty string).")
    arguments = function.get("arguments")
    if arguments is None:
        arguments = ""
    elif isinstance(arguments, (dict, list)):
        arguments = json.dumps(arguments, ensure_ascii=False)
    elif not isinstance(arguments, str):
        raise _refuse(f"{where}.arguments", "must be a string of JSON arguments.")
    return {**function, "name": name, "arguments": arguments}


def normalise_tool_call(call, where):
    if not isinstance(call, dict):
        raise _refuse(where, "must be a tool call object with 'id', 'type' and 'function'.")
    call = {**call, "function": normalise_function(call.get("function"), f"{where}.function")}
    _optional_string(call, "id", where)
    return call


def normalise_message(message, where):
    """One chat message in the shapes the rest of the proxy relies on (a new dict; the input is kept)."""
    if not isinstance(message, dict):
        raise _refuse(where, "must be an object.")
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}.",
                          param=f"{where}.role", code="invalid_value")
    message = {**message, "content": normalise_content(message.get("content"), f"{where}.content")}
    for key in ("name", "tool_call_id"):
        _optional_string(message, key, where)
    calls = message.get("tool_calls")
    if calls is None or calls == []:
        message.pop("tool_calls", None)
    elif isinstance(calls, list):
        message["tool_calls"] = [normalise_tool_call(call, f"{where}.tool_calls[{index}]")
                                 for index, call in enumerate(calls)]
    else:
        raise _refuse(f"{where}.tool_calls", "must be an array of tool calls.")
    if message.get("function_call") is None:
        message.pop("function_call", None)
    else:
        message["function_call"] = normalise_function(message["function_call"], f"{where}.function_call")
    return message


def normalise_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty array of messages.",
                          param="messages", code="invalid_value")
    return [normalise_message(message, f"messages[{index}]") for index, message in enumerate(messages)]


def parse_chat_request(body):
    """A ChatRequest from a decoded JSON body; 400 with `param` set when it cannot be served."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' is required and must be a non-empty string naming a model "
                          "from GET /v1/models.", param="model", code="invalid_value")
    messages = normalise_messages(body.get("messages"))
    options = body.get("stream_options")
    user = next((body[k] for k in ("user", "safety_identifier", "prompt_cache_key")
                 if isinstance(body.get(k), str) and body[k]), "")
    inputs = body.get("inputs")
    conversation_id = body.get("conversation_id")
    try:
        tools = tool_request(body)
    except ToolRequestError as error:
        raise bad_request(str(error), param=error.param, code="invalid_tools")
    instructions = format_instructions(body.get("response_format"))
    return ChatRequest(
        model=model,
        messages=messages,
        stream=body.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        user=user,
        inputs=inputs if isinstance(inputs, dict) else {},
        conversation_id=conversation_id if isinstance(conversation_id, str) else "",
        body={**body, "messages": messages},
        tools=tools,
        format_instructions=instructions,
        structured=wants_json(body.get("response_format")),
    )


def parse_text_completion_request(body):
    """A legacy /v1/completions body as a ChatRequest of one user message holding the prompt.
    `suffix`, `echo`, `best_of`, `logprobs` and the sampling fields are accepted and ignored."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise bad_request("'prompt' holds several prompts; send one prompt per request.", param="prompt",
                          code="invalid_value")
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string (token arrays are not supported).", param="prompt",
                          code="invalid_type")
    if not prompt.strip():
        raise bad_request("'prompt' is empty: send the text to complete.", param="prompt", code="invalid_value")
    return parse_chat_request({**body, "messages": [{"role": "user", "content": prompt}]})
