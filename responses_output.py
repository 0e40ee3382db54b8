"""The OpenAI Responses API's answer: the response object and its typed event stream.

The answer's pieces (the chat path's, see answer_pipeline.py) are written as Responses output
items: reasoning, message text and function calls, as one JSON object or as `event:` +
`data:` SSE events with increasing `sequence_number`. The request side is
responses_request.py.
"""

import json
import time
import uuid

from openai_output import ChunkEncoder, json_string
from responses_ids import named_call_id


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
