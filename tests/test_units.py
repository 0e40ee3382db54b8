"""Direct tests of the small pure functions the request and answer translation is made of."""

import json

import pytest

import memory
from apps import assign_ids, key_id
from config import ConfigError, settings_from
from content import content_text
from dify_events import AnswerTranslator
from errors import APIError, from_dify
from identity import client_id, dify_user
from openai_api import parse_body, parse_chat_request
from openai_output import ChunkEncoder
from pieces import CONTENT, REPLACE

BASE_ENV = {"DIFY_API_KEYS": "app-a, app-b", "DIFY_API_BASE": "https://dify.example/v1/", "VALID_API_KEYS": "k1"}


# --- configuration -------------------------------------------------------------------------

def test_settings_defaults_and_trailing_slash():
    settings = settings_from(BASE_ENV)
    assert settings.dify_api_keys == ("app-a", "app-b")
    assert settings.dify_api_base == "https://dify.example/v1"
    assert (settings.server_host, settings.server_port, settings.conversation_memory_mode) == ("127.0.0.1", 5000, 1)
    assert "app-a" not in repr(settings) and "k1" not in repr(settings)


@pytest.mark.parametrize("change, named", [
    ({"VALID_API_KEYS": ""}, "VALID_API_KEYS"),
    ({"DIFY_API_KEYS": " , "}, "DIFY_API_KEYS"),
    ({"DIFY_API_BASE": "dify.example"}, "DIFY_API_BASE"),
    ({"CONVERSATION_MEMORY_MODE": "3"}, "CONVERSATION_MEMORY_MODE"),
    ({"SERVER_PORT": "http"}, "SERVER_PORT"),
    ({"SERVER_PORT": "70000"}, "SERVER_PORT"),
    ({"DIFY_IDLE_TIMEOUT": "-1"}, "DIFY_IDLE_TIMEOUT"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
])
def test_bad_settings_name_the_setting(change, named):
    with pytest.raises(ConfigError) as caught:
        settings_from({**BASE_ENV, **change})
    message = str(caught.value)
    assert message.startswith(named) and "\n" not in message


def test_missing_client_keys_explains_why():
    with pytest.raises(ConfigError, match="will not start"):
        settings_from({**BASE_ENV, "VALID_API_KEYS": ""})


# --- memory mode 1 -------------------------------------------------------------------------

def test_single_user_message_is_sent_as_itself():
    assert memory.fold_query([{"role": "user", "content": "Hello"}]) == "Hello"


def test_fold_puts_system_once_and_delimits_history():
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "text", "text": "How are you?"}]},
    ]
    query = memory.fold_query(messages)
    assert query == ("<system>\nBe terse.\n\nAnswer in French.\n</system>\n\n"
                     "<history>\n<user>\nHi\n</user>\n<assistant>\nHello!\n</assistant>\n</history>\n\n"
                     "How are you?")
    assert query.count("Be terse.") == 1


def test_list_content_renders_as_text_never_repr_or_base64():
    content = [{"type": "text", "text": "Look:"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAA"}},
               {"type": "image_url", "image_url": {"url": "https://example.com/pics/cat.jpg"}},
               {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBER"}},
               {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}}]
    text = content_text(content)
    assert text == "Look:\n[image]\n[image: cat.jpg]\n[file: a.pdf]\n[audio: wav]"
    folded = memory.fold_query([{"role": "user", "content": content}, {"role": "assistant", "content": "ok"},
                                {"role": "user", "content": "and?"}])
    assert "base64" not in folded and "{'type'" not in folded and "iVBOR" not in folded


def test_tool_call_turns_and_results_are_kept():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, cloudy"},
    ]
    query = memory.fold_query(messages)
    assert "get_weather" in query and "Paris" in query
    assert "call_1" in query and "18C, cloudy" in query
    assert query.index("get_weather") < query.index("18C, cloudy")
    history, new = memory.split_turns(messages)
    assert [m["role"] for m in new] == ["tool"]


def test_trailing_assistant_prefill_is_not_sent_as_the_question():
    query = memory.fold_query([{"role": "user", "content": "Write a poem"},
                               {"role": "assistant", "content": "Roses are"}])
    assert query.endswith("Continue your last reply.")
    assert "<assistant>\nRoses are\n</assistant>" in query


# --- OpenAI request model ------------------------------------------------------------------

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


# --- chunks --------------------------------------------------------------------------------

def test_chunk_encoder_shapes():
    encoder = ChunkEncoder("chatcmpl-1", "My App/ü", created=42)
    role = json.loads(encoder.role()[6:])
    assert role == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 42, "model": "My App/ü",
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]}
    text = "naïve \"quotes\" \n 中文 🎉"
    chunk = encoder.content(text)
    assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"\n") == 2
    assert json.loads(chunk[6:])["choices"][0]["delta"] == {"content": text}
    assert json.loads(encoder.finish("stop")[6:])["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                                   "finish_reason": "stop"}
    usage = json.loads(encoder.usage({"prompt_tokens": 3, "completion_tokens": 4})[6:])
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_lone_surrogates_still_make_valid_utf8():
    chunk = ChunkEncoder("c", "m", created=1).content("bad \ud800 half")
    chunk.decode("utf-8")
    assert json.loads(chunk[6:])["choices"][0]["delta"]["content"] == "bad \ud800 half"


# --- errors --------------------------------------------------------------------------------

def test_dify_key_rejection_is_a_server_problem_naming_the_model():
    error = from_dify(401, "unauthorized", "Access token is invalid", "Chat Bot")
    assert error.status_code == 502 and "Chat Bot" in error.message and error.headers()["x-should-retry"] == "false"


@pytest.mark.parametrize("status, code, expected_status, retry", [
    (429, "too_many_requests", 429, "true"),
    (400, "provider_quota_exceeded", 429, "false"),
    (400, "app_unavailable", 502, "false"),
    (400, "completion_request_error", 502, "false"),
    (400, "invalid_param", 400, None),
    (500, "internal_server_error", 502, None),
    (503, "unknown", 503, "true"),
])
def test_dify_error_mapping(status, code, expected_status, retry):
    error = from_dify(status, code, "detail", "m")
    assert error.status_code == expected_status
    assert error.headers().get("x-should-retry") == retry
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


# --- apps ----------------------------------------------------------------------------------

def test_duplicate_names_get_distinct_stable_ids():
    apps = {"app-1": {"name": "Bot"}, "app-2": {"name": "Bot"}, "app-3": {"name": "Other"}}
    ids = assign_ids(apps, ["app-1", "app-2", "app-3"])
    assert ids == {"app-1": "Bot", "app-2": f"Bot#{key_id('app-2')}", "app-3": "Other"}
    assert assign_ids(dict(reversed(list(apps.items()))), ["app-1", "app-2", "app-3"]) == ids


# --- users ---------------------------------------------------------------------------------

def test_dify_user_is_opaque_and_per_client():
    secret = b"s" * 32
    one, two = client_id(secret, "sk-one"), client_id(secret, "sk-two")
    assert one != two and "sk-one" not in dify_user(one)
    assert dify_user(one, "alice") != dify_user(two, "alice")
    assert dify_user(one, "alice").endswith(":alice")


# --- events --------------------------------------------------------------------------------

def test_translator_text_replace_usage():
    translator = AnswerTranslator("chat", "m")
    assert translator.feed({"event": "message", "answer": "Hi", "task_id": "t"}) == ((CONTENT, "Hi"),)
    assert translator.feed({"event": "message_file", "answer": " there"}) == ((CONTENT, " there"),)
    assert translator.feed({"event": "message_replace", "answer": "Blocked"}) == ((REPLACE, "Blocked"),)
    translator.feed({"event": "message_end", "conversation_id": "c", "metadata": {"usage": {"prompt_tokens": 1}}})
    assert translator.done and translator.usage == {"prompt_tokens": 1}
    assert translator.finish_reason() == "content_filter"


def test_translator_error_event_raises_openai_error():
    translator = AnswerTranslator("chat", "m")
    with pytest.raises(APIError) as caught:
        translator.feed({"event": "error", "status": 400, "code": "completion_request_error", "message": "boom"})
    assert "boom" in caught.value.message


def test_new_agent_final_message_is_not_appended_twice():
    translator = AnswerTranslator("agent", "m")
    assert translator.feed({"event": "agent_message", "answer": "Hel"}) == ((CONTENT, "Hel"),)
    assert translator.feed({"event": "message", "answer": "Hello"}) == ()
