"""The Dify request builder (dify_requests.py): the three request shapes and where the user's text,
the client's tools and the output format go, checked without a server."""

import pytest

import tool_prompt
from apps import App
from dify_requests import (app_inputs, dify_query, dify_request, fits, kept_tools, message_variable, offered_tools,
                           text_parts)
from errors import APIError
from memory import Binding, Plan, tools_fingerprint
from tool_request import tool_request

FORM = {"user_input_form": [{"select": {"variable": "tone", "options": ["dry", "warm"]}},
                            {"paragraph": {"variable": "text", "max_length": 40}},
                            {"text-input": {"variable": "topic"}}]}
BINDING = Binding(b"secret", "app", "client")
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def app(mode, parameters=FORM):
    return App(model_id="Bot", name="Bot", mode=mode, key="app-x", parameters=parameters)


def test_a_chat_app_is_asked_in_query_and_continues_its_conversation():
    path, body = dify_request(app("advanced-chat"), "u", "hello", {"tone": "dry"}, None, "c-1", [])
    assert path == "/chat-messages"
    assert body == {"inputs": {"tone": "dry"}, "user": "u", "response_mode": "streaming", "query": "hello",
                    "conversation_id": "c-1", "auto_generate_name": False}


def test_a_completion_app_gets_query_only_when_no_form_variable_holds_the_text():
    files = [{"type": "image", "transfer_method": "local_file", "upload_file_id": "f"}]
    path, body = dify_request(app("completion"), "u", "hello", {"text": "hello"}, "text", "", files)
    assert path == "/completion-messages" and "query" not in body and body["files"] == files
    _, body = dify_request(app("completion"), "u", "hello", {}, None, "", [])
    assert body["query"] == "hello" and "files" not in body and "conversation_id" not in body


def test_a_workflow_never_gets_query_nor_a_conversation():
    path, body = dify_request(app("workflow"), "u", "hello", {"text": "hello"}, "text", "c-1", [])
    assert path == "/workflows/run"
    assert body == {"inputs": {"text": "hello"}, "user": "u", "response_mode": "streaming"}


def test_the_query_is_the_plan_then_the_tools_then_the_output_format():
    assert dify_query("hi", "TOOLS", "JSON") == "hi\n\nTOOLS\n\nJSON"
    assert dify_query("hi", "", "JSON") == "hi\n\nJSON"
    assert dify_query("hi", "", "") == "hi"


def test_a_completion_or_workflow_app_keeps_only_a_forced_call_and_the_policy_rules_all():
    offered = tool_request({"tools": [WEATHER]})
    forced = tool_request({"tools": [WEATHER], "tool_choice": "required"})
    assert kept_tools(offered, "all", "agent-chat") is offered
    assert kept_tools(offered, "all", "workflow") is None and kept_tools(forced, "all", "completion") is forced
    assert kept_tools(offered, "forced", "chat") is None and kept_tools(forced, "off", "chat") is None


def test_a_conversation_that_has_the_catalogue_gets_only_the_turns_rule():
    request = tool_request({"tools": [WEATHER], "tool_choice": "required"})
    seen = tools_fingerprint(tool_prompt.catalogue(request), BINDING)
    fresh_seen, fresh_text = offered_tools(request, Plan("", "q", "q"), BINDING)
    known_seen, known_text = offered_tools(request, Plan("c-1", "q", "q", tools_seen=seen), BINDING)
    assert fresh_seen == known_seen == seen
    assert tool_prompt.catalogue(request) in fresh_text and tool_prompt.catalogue(request) not in known_text
    assert known_text == tool_prompt.turn_rule(request)
    other_seen, other_text = offered_tools(request, Plan("c-1", "q", "q", tools_seen=b"older"), BINDING)
    assert other_seen == seen and tool_prompt.catalogue(request) in other_text


def test_without_tools_a_continued_conversation_keeps_the_catalogue_it_had():
    assert offered_tools(None, Plan("c-1", "q", "q", tools_seen=b"had"), BINDING) == (b"had", "")
    assert offered_tools(None, Plan("", "q", "q", tools_seen=b"had"), BINDING) == (None, "")


def test_the_text_goes_into_the_input_variable_setting_or_the_first_free_text_variable():
    form, target = message_variable(app("completion"), {}, "")
    assert target == "text" and [v.name for v in form] == ["tone", "text", "topic"]
    assert message_variable(app("workflow"), {"text": "mine"}, "")[1] == "topic"
    assert message_variable(app("workflow"), {}, "topic")[1] == "topic"
    assert message_variable(app("chat"), {}, "text")[1] is None
    assert message_variable(app("completion", {}), {}, "")[1] == "query"


def test_only_a_form_limit_makes_a_text_not_fit():
    form, _ = message_variable(app("completion"), {}, "")
    assert fits(form, "text", "x" * 40) and not fits(form, "text", "x" * 41)
    assert fits(form, "topic", "x" * 1000) and fits(None, "query", "x" * 1000)


def test_inputs_carry_the_text_and_a_too_long_one_is_a_400_naming_its_parts():
    form, target = message_variable(app("completion"), {}, "")
    assert app_inputs(form, {"tone": "warm"}, target, "hello", lambda: ()) == {"tone": "warm", "text": "hello"}
    messages = [{"role": "system", "content": "s" * 30}, {"role": "user", "content": "hi"}]
    with pytest.raises(APIError) as caught:
        app_inputs(form, {}, target, "x" * 50, lambda: text_parts(messages, "T" * 9, ""))
    assert caught.value.param == "inputs.text" and "the system prompt" in str(caught.value)
    assert "the tool catalogue (9)" in str(caught.value)


def test_the_texts_parts_name_the_tools_and_the_format_only_when_sent():
    messages = [{"role": "user", "content": "hello"}]
    labels = [label for label, _ in text_parts(messages, "", "")]
    assert labels and "the tool catalogue" not in labels
    parts = dict(text_parts(messages, "TOOLS", "JSON!"))
    assert parts["the tool catalogue"] == 5 and parts["the output format instruction"] == 5
