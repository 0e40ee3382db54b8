"""The Responses API (POST /v1/responses) end to end: the real server, the fake Dify, the openai SDK and raw HTTP;
every streamed event and response object validated against the OpenAI spec's own JSON schemas."""

import json
import os

import jsonschema
import openai
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from fake_dify import End, Event, FakeApp, Text
from support import CLIENT_KEY, OTHER_CLIENT_KEY

CHAT = "Chat Bot"
SPEC = json.load(open(os.path.join(os.path.dirname(__file__), "data", "openai_responses_schemas.json")))
_REGISTRY = Registry().with_resource("spec", Resource.from_contents(SPEC, default_specification=DRAFT202012))


def validator(name):
    return jsonschema.Draft202012Validator({"$ref": f"spec#/components/schemas/{name}"}, registry=_REGISTRY)


def check_response(body):
    validator("Response").validate(body)
    return body


def sse(body):
    """(event name, data) pairs of a Responses event stream; every event checked against its spec schema."""
    events = []
    for block in body.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2, block
        name, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == name
        validator(SPEC["events"][name]).validate(data)
        events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def post(harness, body, **kwargs):
    return harness.raw("POST", "/v1/responses", {"model": CHAT, **body}, **kwargs)


def test_string_input_non_streaming(harness):
    response = harness.client().responses.create(model=CHAT, input="Hello there")
    assert response.status == "completed" and response.output_text == "Echo: Hello there"
    assert response.id.startswith("resp_") and response.object == "response"
    assert harness.chat_bodies()[-1]["query"] == "Hello there"
    status, _, body = post(harness, {"input": "Hi"})
    data = check_response(json.loads(body))
    assert status == 200 and data["output"][0]["content"][0]["text"] == "Echo: Hi"
    assert data["usage"]["total_tokens"] == data["usage"]["input_tokens"] + data["usage"]["output_tokens"]


def test_stream_events_in_order(harness):
    harness.dify.script(harness.key_of(CHAT), Text("Hel", "lo ", "world"), End())
    status, headers, body = post(harness, {"input": "Hi", "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse(body)
    kinds = [e["type"] for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello world"
    done = events[-1]["response"]
    assert done["id"] == events[0]["response"]["id"] and done["output"][0]["content"][0]["text"] == "Hello world"
    assert b"[DONE]" not in body


def test_sdk_stream_helper(harness):
    harness.dify.script(harness.key_of(CHAT), Text("Hel", "lo"), End())
    with harness.client().responses.stream(model=CHAT, input="Hi") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Hello" and final.output_text == "Hello"
