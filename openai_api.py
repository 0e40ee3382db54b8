"""The OpenAI side: the request model parsed from a client's body, and the response shapes.

Parsing is lenient by design: every documented field and any unknown one is accepted and
ignored where Dify cannot honour it, because real clients (Cherry Studio, LibreChat, Roo
Code) send extras and break on proxies that reject them. Only `model` and `messages` can
make a request invalid.
"""

import json
import time
import uuid
from dataclasses import dataclass, field
from json.encoder import encode_basestring, encode_basestring_ascii

from errors import bad_request

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


def parse_body(raw):
    try:
        body = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON.", code="invalid_json")
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return body


def parse_chat_request(body):
    """A ChatRequest from a decoded JSON body; 400 with `param` set when it cannot be served."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("'model' is required and must be a non-empty string naming a model "
                          "from GET /v1/models.", param="model", code="invalid_value")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty array of messages.",
                          param="messages", code="invalid_value")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{index}] must be an object.", param=f"messages[{index}]",
                              code="invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{index}].role must be one of {', '.join(ROLES)}; got {role!r}.",
                              param=f"messages[{index}].role", code="invalid_value")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_request(f"messages[{index}].content must be a string, an array of parts or null.",
                              param=f"messages[{index}].content", code="invalid_type")
    options = body.get("stream_options")
    user = next((body[k] for k in ("user", "safety_identifier", "prompt_cache_key")
                 if isinstance(body.get(k), str) and body[k]), "")
    inputs = body.get("inputs")
    conversation_id = body.get("conversation_id")
    return ChatRequest(
        model=model,
        messages=messages,
        stream=body.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        user=user,
        inputs=inputs if isinstance(inputs, dict) else {},
        conversation_id=conversation_id if isinstance(conversation_id, str) else "",
        body=body,
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


def new_completion_id():
    return "chatcmpl-" + uuid.uuid4().hex


def new_text_completion_id():
    return "cmpl-" + uuid.uuid4().hex


def model_object(app):
    return {"id": app.model_id, "object": "model", "created": app.created, "owned_by": "dify"}


def usage_object(usage):
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(completion_id, created, model, message, finish_reason, usage):
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_object(usage),
    }


def text_finish_reason(reason):
    """Text completions know no tool calls: every other ending is a plain stop."""
    return reason if reason in ("stop", "length", "content_filter") else "stop"


def text_completion_body(completion_id, created, model, text, finish_reason, usage):
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": text_finish_reason(finish_reason)}],
        "usage": usage_object(usage),
    }


def json_string(text):
    """`text` as a JSON string literal; raw UTF-8 where it can be (smaller than \\u escapes)."""
    encoded = encode_basestring(text)
    try:
        encoded.encode("utf-8")
    except UnicodeEncodeError:
        return encode_basestring_ascii(text)
    return encoded


class ChunkEncoder:
    """SSE events of one chat.completion stream, as bytes ready for the socket.

    The id/created/model prefix is the same in every chunk of a stream, so it is built
    once and each event costs one string escape and a concatenation.
    """

    DONE = b"data: [DONE]\n\n"
    KEEPALIVE = b": keep-alive\n\n"

    def __init__(self, completion_id, model, created=None):
        self.id = completion_id
        self.model = model
        self.created = int(time.time()) if created is None else created
        self._head = ('data: {"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s,"choices":'
                      % (json_string(completion_id), self.created, json_string(model)))
        self._open = self._head + '[{"index":0,"delta":'
        self._close = ',"logprobs":null,"finish_reason":null}]}\n\n'

    def delta(self, delta_json):
        return (self._open + delta_json + self._close).encode()

    def role(self):
        return self.delta('{"role":"assistant","content":""}')

    def content(self, text):
        return self.delta('{"content":' + json_string(text) + "}")

    def reasoning(self, text):
        return self.delta('{"reasoning_content":' + json_string(text) + "}")

    def tool_call(self, index, call_id, name, arguments):
        """A whole call as the two deltas clients expect: id, type and name first, then arguments."""
        first = {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                 "function": {"name": name, "arguments": ""}}]}
        rest = {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}
        return self.delta(json.dumps(first, ensure_ascii=False)) + self.delta(json.dumps(rest, ensure_ascii=False))

    def function_call(self, name, arguments):
        """A legacy `functions` call: name first, then the arguments."""
        return (self.delta('{"function_call":{"name":' + json_string(name) + ',"arguments":""}}')
                + self.delta('{"function_call":{"arguments":' + json_string(arguments) + "}}"))

    def finish(self, reason):
        return (self._open + '{},"logprobs":null,"finish_reason":' + json_string(reason) + "}]}\n\n").encode()

    def usage(self, usage):
        return (self._head + '[],"usage":' + json.dumps(usage_object(usage)) + "}\n\n").encode()

    @staticmethod
    def error(api_error):
        return ("data: " + json.dumps(api_error.body(), ensure_ascii=False) + "\n\n").encode()


class TextChunkEncoder(ChunkEncoder):
    """SSE events of one legacy text_completion stream: the same framing as chat chunks, with the
    text in `choices[0].text`. Text completions have no role, reasoning or tool-call deltas."""

    def __init__(self, completion_id, model, created=None):
        super().__init__(completion_id, model, created)
        self._head = ('data: {"id":%s,"object":"text_completion","created":%d,"model":%s,"choices":'
                      % (json_string(completion_id), self.created, json_string(model)))
        self._open = self._head + '[{"text":'
        self._close = ',"index":0,"logprobs":null,"finish_reason":null}]}\n\n'

    def role(self):
        return b""

    def content(self, text):
        return (self._open + json_string(text) + self._close).encode()

    def reasoning(self, text):
        return b""

    def tool_call(self, index, call_id, name, arguments):
        return b""

    def function_call(self, name, arguments):
        return b""

    def finish(self, reason):
        return (self._open + '"","index":0,"logprobs":null,"finish_reason":' + json_string(text_finish_reason(reason))
                + "}]}\n\n").encode()
