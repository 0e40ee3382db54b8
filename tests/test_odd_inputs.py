"""Odd but well-formed JSON bodies: each gets an answer or a clear OpenAI error, never a 500."""

import json

import pytest

CASES = [
    {"model": "Chat Bot", "messages": [{"role": "user", "content": [1, None, "x", {"type": "text"}]}]},
    {"model": "Chat Bot", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": None}]}]},
    {"model": "Chat Bot", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]},
    {"model": "Chat Bot", "messages": [{"role": "assistant", "content": None, "tool_calls": "nope"}, {"role": "user", "content": "x"}]},
    {"model": "Chat Bot", "messages": [{"role": "assistant", "tool_calls": [None, 3, {"function": None}]}, {"role": "tool", "content": None}, {"role": "user", "content": "x"}]},
    {"model": "Chat Bot", "messages": [{"role": "user", "content": "x"}], "tools": "all"},
    {"model": "Chat Bot", "messages": [{"role": "user", "content": "x"}], "tools": [None, {"type": "function"}]},
    {"model": "Chat Bot", "messages": [{"role": "user", "content": "x"}], "tool_choice": 7, "tools": [{"type": "function", "function": {"name": "f"}}]},
    {"model": "Chat Bot", "messages": [{"role": "user", "content": "x"}], "inputs": [1], "stream": "yes", "stream_options": 3, "user": 5},
    {"model": "Chat Bot", "messages": [{"role": "user", "content": "x"}], "conversation_id": 12},
    {"model": "Chat Bot", "messages": [{"role": "system", "content": "only system"}]},
    {"model": "Chat Bot", "messages": [{"role": "user", "content": ""}]},
    {"model": "Chat Bot", "messages": [{"role": "user", "content": "x", "name": 5}]},
    {"model": "Chat Bot", "messages": [{"role": "function", "name": None, "content": None}, {"role": "user", "content": "x"}]},
    {"model": "Chat Bot", "messages": [{"role": "user", "content": [{"type": "file", "file": "x"}]}]},
    {"model": "Chat Bot", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": 5}}]}]},
    {"model": "Flow Bot", "messages": [{"role": "user", "content": "x"}], "inputs": {"a": {"b": [1]}}},
]
@pytest.mark.parametrize("body", CASES)
@pytest.mark.parametrize("stream", [False, True])
def test_odd_bodies_never_crash_the_proxy(harness, body, stream):
    status, headers, raw = harness.raw("POST", "/v1/chat/completions", {**body, "stream": stream} if stream else body)
    assert status < 500, raw
    if status >= 400:
        assert headers["content-type"].startswith("application/json")
        assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
