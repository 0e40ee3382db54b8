"""The OpenAI answers: chat.completion and text_completion bodies, their SSE chunks, the model objects.

Separate from the request edge (openai_api.py): this is what the proxy writes back, as whole
JSON bodies and as the streamed events EventStreamResponse relays; the Responses API's answer
is responses_output.py.
"""

import json
import time
import uuid
from json.encoder import encode_basestring, encode_basestring_ascii


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


def completion_body(completion_id, created, model, choice, usage, kind="chat.completion"):
    """A whole answer: a `chat.completion`, or with `kind` "text_completion" the legacy shape; `choice` is
    its one choice (`chat_choice` or `text_choice`)."""
    return {"id": completion_id, "object": kind, "created": created, "model": model, "choices": [choice],
            "usage": usage_object(usage)}


def chat_choice(message, finish_reason):
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}


def text_finish_reason(reason):
    """Text completions know no tool calls: every other ending is a plain stop."""
    return reason if reason in ("stop", "length", "content_filter") else "stop"


def text_choice(text, finish_reason):
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": text_finish_reason(finish_reason)}


def json_bytes(data):
    """A JSON document as UTF-8; \\u escapes for anything UTF-8 cannot carry (a lone surrogate in text
    that did not come through the edge, such as a URL path), so an answer can always be written."""
    text = json.dumps(data, ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data).encode()


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
