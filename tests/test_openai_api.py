"""openai_api.py, the request edge: what a body may hold, and what makes it a 400."""

import pytest

from errors import APIError
from openai_api import parse_body, parse_chat_request, parse_text_completion_request


def test_every_documented_and_unknown_field_is_accepted():
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": False,
            "stream_options": {"include_usage": True}, "n": 1, "temperature": 0, "top_p": 1, "max_tokens": 0,
            "max_completion_tokens": 5, "stop": ["a"], "presence_penalty": 0, "frequency_penalty": 0,
            "logit_bias": {"1": 2}, "logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"},
            "seed": -9007199254740991, "tools": [], "tool_choice": "auto", "parallel_tool_calls": False,
            "user": "u", "metadata": {"a": "b"}, "store": False, "reasoning_effort": "max", "modalities": ["text"],
            "service_tier": "auto", "top_k": 3, "thinking": {"type": "enabled"}, "whatever": [1]}
    request = parse_chat_request(body)
    assert request.user == "u" and request.stream is False and request.include_usage is True


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": 3, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
])
def test_only_model_and_messages_make_a_400(body, param):
    with pytest.raises(APIError) as caught:
        parse_chat_request(body)
    assert caught.value.status_code == 400 and caught.value.param == param


def test_body_must_be_a_json_object():
    for raw in (b"", b"{", b"[1]", b"\xff"):
        with pytest.raises(APIError) as caught:
            parse_body(raw)
        assert caught.value.status_code == 400


def test_text_completion_request_accepts_legacy_fields():
    request = parse_text_completion_request({"model": "m", "prompt": ["def add(a, b):"], "suffix": "\n",
                                             "echo": False, "best_of": 1, "logprobs": 2, "max_tokens": 16,
                                             "stream": True, "stream_options": {"include_usage": True}})
    assert request.messages == [{"role": "user", "content": "def add(a, b):"}]
    assert request.stream and request.include_usage


@pytest.mark.parametrize("prompt", [None, "", "  ", ["a", "b"], [1, 2, 3], [[1, 2]], 5])
def test_unusable_prompts_are_400(prompt):
    with pytest.raises(APIError) as caught:
        parse_text_completion_request({"model": "m", "prompt": prompt})
    assert caught.value.status_code == 400 and caught.value.param == "prompt"
