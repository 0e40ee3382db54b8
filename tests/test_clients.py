"""Real clients (issue 13): Open WebUI's captured requests replayed, tools, tasks, regenerate, structured output."""

import json
import os

import pytest
from agents import Agent, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
from openai import AsyncOpenAI
from pydantic import BaseModel

import marks
import memory
from identity import client_id
from config import ConfigError, settings_from
from dify_client import DifyClient
from fake_dify import End, ErrorEvent, FakeApp, Text, default_parameters
from support import CLIENT_KEY, sse_events, wait_for
from tasks import local_answer, task_kind

CAPTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "open-webui-0.12.4.jsonl")
CHAT = "Chat Bot"
MODE2 = {"CONVERSATION_MEMORY_MODE": "2"}


def captured():
    """The request bodies Open WebUI 0.12.4 sent (see ../shared/reference/client-captures/README.md)."""
    with open(CAPTURES, encoding="utf-8") as lines:
        return [json.loads(line)["request"] for line in lines]


def test_latest_message_of_a_conversation(make_harness):
    harness = make_harness(env=MODE2)
    key = harness.key_of(CHAT)
    client = harness.client()
    first = client.chat.completions.with_raw_response.create(model=CHAT, messages=[{"role": "user", "content": "a"}])
    conversation = first.headers["x-dify-conversation-id"]
    user = harness.chat_bodies()[-1]["user"]
    client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "b"}],
                                   extra_body={"conversation_id": conversation})
    dify = DifyClient(harness.dify.base_url)
    try:
        latest = harness.loop.run(dify.latest_message(key, conversation, user))
        assert latest["query"] == "b" and latest["answer"] == "Echo: b" and latest["conversation_id"] == conversation
        assert harness.dify.requests[-1].query == {"conversation_id": conversation, "user": user, "limit": "1"}
        assert harness.loop.run(dify.latest_message(key, conversation, "someone else")) is None
        harness.loop.run(dify.delete_conversation(key, conversation, user))
        assert harness.loop.run(dify.latest_message(key, conversation, user)) is None
        harness.loop.run(dify.delete_conversation(key, conversation, user))  # already gone: not an error
    finally:
        harness.loop.call(dify.close)


# --------------------------------------------------------------------------- Open WebUI, replayed

def owui_chat_turn(harness, messages, model=CHAT, **extra):
    """One streamed chat request shaped exactly like Open WebUI's (captured body: its 36 tools, no
    tool_choice), with our model and the given messages; returns the reply text as the client stores it."""
    body = {**captured()[1], "model": model, "messages": messages, **extra}
    status, headers, raw = harness.raw("POST", "/v1/chat/completions", body)
    assert status == 200, raw
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])


def dify_queries(harness, conversation):
    return [row["query"] for row in harness.dify.messages.get(conversation, [])]


def test_three_turn_open_webui_chat_sends_one_short_query_per_turn(make_harness):
    harness = make_harness(env=MODE2)
    questions = [m["content"] for m in captured()[4]["messages"] if m["role"] == "user"]
    assert questions == ["My name is Ada. Remember it.", "What is my name?", "And what did I ask you first?"]
    messages, sizes = [], []
    for question in questions:
        messages.append({"role": "user", "content": question})
        reply = owui_chat_turn(harness, messages)
        assert marks.strip_marks(reply) == "Echo: " + harness.chat_bodies()[-1]["query"]
        messages.append({"role": "assistant", "content": reply})
        sizes.append(len(harness.chat_bodies()[-1]["query"]))
    bodies = harness.chat_bodies()
    assert bodies[0]["query"].startswith(questions[0] + "\n\n# Tools\n") and sizes[0] < 7600
    assert [b["query"] for b in bodies[1:]] == questions[1:], "turns 2 and 3: the message alone"
    assert len(harness.dify.conversations) == 1 and bodies[2]["conversation_id"] == bodies[1]["conversation_id"]
    print(f"\nOpen WebUI three-turn chat, Dify query sizes: {sizes}")


def test_regenerate_leaves_no_duplicate_turn_in_dify(make_harness):
    harness = make_harness(env=MODE2)
    first = [{"role": "user", "content": "My name is Ada. Remember it."}]
    chat = first + [{"role": "assistant", "content": owui_chat_turn(harness, first)}]
    second = chat + [{"role": "user", "content": "What is my name?"}]
    owui_chat_turn(harness, second)
    old = harness.chat_bodies()[-1]["conversation_id"]
    assert dify_queries(harness, old)[1] == "What is my name?"
    # Regenerate: Open WebUI sends the same request again; Dify already holds the discarded answer.
    regenerated = owui_chat_turn(harness, second)
    sent = harness.chat_bodies()[-1]
    assert sent["conversation_id"] == "", "a fresh conversation, not a second 'What is my name?' in the old one"
    assert "<history>" in sent["query"] and "My name is Ada." in sent["query"]
    assert [q.split("\n\n# Tools")[0] for q in dify_queries(harness, old)] == [
        "My name is Ada. Remember it.", "What is my name?"], "the old conversation got nothing more"
    third = second + [{"role": "assistant", "content": regenerated}, {"role": "user", "content": "And now?"}]
    owui_chat_turn(harness, third)
    continued = harness.chat_bodies()[-1]
    assert continued["query"] == "And now?" and continued["conversation_id"] not in ("", old)
    for conversation in harness.dify.messages:
        queries = [q.split("\n\n# Tools")[0] for q in dify_queries(harness, conversation)]
        assert len(queries) == len(set(queries)), "no conversation holds a turn twice"
    # An edit of the last question is the same: the edited request starts afresh.
    edited = chat + [{"role": "user", "content": "What was my name again?"}]
    owui_chat_turn(harness, edited)
    assert harness.chat_bodies()[-1]["conversation_id"] == ""


def test_stop_then_next_message_starts_afresh_without_the_cut_turn_twice(make_harness):
    harness = make_harness(env=MODE2)
    messages = [{"role": "user", "content": "one"}]
    messages.append({"role": "assistant", "content": owui_chat_turn(harness, messages)})
    (conversation,) = harness.dify.messages
    # A turn Dify stored whose reply never reached the client with a mark (stopped, failed):
    harness.dify.script(harness.key_of(CHAT), Text("partial"), ErrorEvent())
    harness.raw("POST", "/v1/chat/completions", {
        "model": CHAT, "stream": True, "messages": messages + [{"role": "user", "content": "two"}]})
    assert len(dify_queries(harness, conversation)) == 2
    messages += [{"role": "user", "content": "two"}, {"role": "assistant", "content": "partial"},
                 {"role": "user", "content": "three"}]
    owui_chat_turn(harness, messages)
    sent = harness.chat_bodies()[-1]
    assert sent["conversation_id"] == "" and "<assistant>\npartial\n</assistant>" in sent["query"]


def test_marks_from_before_the_message_check_still_continue(make_harness):
    """A reply marked by an earlier release (version 1: no message id) keeps its conversation."""
    harness = make_harness(env=MODE2)
    client = harness.client()
    raw = client.chat.completions.with_raw_response.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])
    conversation = raw.headers["x-dify-conversation-id"]
    reply = marks.strip_marks(raw.parse().choices[0].message.content)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    app = harness.proxy.registry.all()[0]
    assert app.model_id == CHAT
    old_mark = marks.make_mark(conversation, secret=harness.proxy.secret, app_id=app.mark_id,
                               client_id=f"{client_id(harness.proxy.secret, CLIENT_KEY)}:"
                                         f"{memory.transcript_digest(history)}")
    assert len(old_mark) == marks.MARK_V1_LENGTH
    history[1]["content"] = reply + "\n" + old_mark
    client.chat.completions.create(model=CHAT, messages=history + [{"role": "user", "content": "again"}])
    sent = harness.chat_bodies()[-1]
    assert sent["conversation_id"] == conversation and sent["query"] == "again"
    assert not harness.dify.requests_to("/messages"), "a version-1 mark has no message to check"


# --------------------------------------------------------------------------- the mark adds no line

@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("answer,expected", [
    (["Hello", " Ada!"], "Hello Ada!{m}"),
    (["Hello Ada!\n", "\n"], "Hello Ada!{m}\n\n"),
    (["  spaced  "], "  spaced{m}  "),
    (["| a |", " b |"], "| a | b |{m}"),
    (["Docs: https://example.com/x"], "Docs: https://example.com/x\n{m}"),
    (["```py\nx = 1\n```\n"], "```py\nx = 1\n```\n{m}"),
], ids=["plain", "trailing-newlines", "spaces", "table", "url", "fence"])
def test_mark_attached_to_the_last_line(make_harness, stream, answer, expected):
    harness = make_harness(env=MODE2)
    harness.dify.script(harness.key_of(CHAT), Text(*answer), End())
    if stream:
        status, _, raw = harness.raw("POST", "/v1/chat/completions", {
            "model": CHAT, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        reply = "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(raw)[:-1] if e["choices"])
    else:
        reply = harness.client().chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "hi"}]).choices[0].message.content
    mark = reply[reply.index("\u2060"):][:marks.MARK_LENGTH]
    assert reply == expected.format(m=mark)
    assert marks.strip_marks(reply) == "".join(answer) or expected.startswith("Docs:")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply.strip()},
                {"role": "user", "content": "next"}]
    harness.client().chat.completions.create(model=CHAT, messages=messages)
    assert harness.chat_bodies()[-1]["query"] == "next", "the attached mark still continues the conversation"


# --------------------------------------------------------------------------- client tools: once, and the operator's say

def test_catalogue_sent_again_only_when_the_tool_set_changes(make_harness):
    harness = make_harness(env=MODE2)
    all_tools = captured()[1]["tools"]
    messages = []

    def turn(text, **extra):
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": owui_chat_turn(harness, messages, **extra)})
        return harness.chat_bodies()[-1]["query"]

    assert "# Tools" in turn("one")
    assert turn("two") == "two"
    assert turn("three", tools=all_tools[:3]).startswith("three\n\n# Tools\n"), "a new tool set is sent"
    assert turn("four", tools=all_tools[:3]) == "four"
    assert turn("five", tools=[]) == "five", "no tools: nothing to send"
    assert turn("six", tools=all_tools[:3]) == "six", "the conversation still has that catalogue"
    assert turn("seven", tool_choice="required", tools=all_tools[:3]) == (
        "seven\n\nYou must call at least one tool in this reply; do not answer with text only.")
    assert len({b["conversation_id"] for b in harness.chat_bodies()[1:]}) == 1


@pytest.mark.parametrize("env,tools_sent", [
    ({"CLIENT_TOOLS": "off"}, {"auto": False, "required": False}),
    ({"CLIENT_TOOLS": "forced"}, {"auto": False, "required": True}),
    ({"CLIENT_TOOLS_BY_MODEL": "Chat Bot=off"}, {"auto": False, "required": False}),
    ({"CLIENT_TOOLS": "off", "CLIENT_TOOLS_BY_MODEL": "Agent Bot=off,Chat Bot=all"}, {"auto": True, "required": True}),
])
def test_client_tools_setting(make_harness, env, tools_sent):
    harness = make_harness(env=env)
    for choice, expected in tools_sent.items():
        owui_chat_turn(harness, [{"role": "user", "content": "hi"}], tool_choice=choice)
        assert ("# Tools" in harness.chat_bodies()[-1]["query"]) is expected, choice
    if env.get("CLIENT_TOOLS_BY_MODEL") == "Chat Bot=off":
        owui_chat_turn(harness, [{"role": "user", "content": "hi"}], model="Agent Bot")
        assert "# Tools" in harness.chat_bodies()[-1]["query"], "other models keep CLIENT_TOOLS"


@pytest.mark.parametrize("value", ["Chat Bot", "Chat Bot=maybe", "=off"])
def test_client_tools_by_model_must_be_pairs(value):
    with pytest.raises(ConfigError, match="CLIENT_TOOLS_BY_MODEL"):
        settings_from({"DIFY_API_KEYS": "app-x", "DIFY_API_BASE": "http://127.0.0.1:1/v1", "VALID_API_KEYS": "k",
                       "CLIENT_TOOLS_BY_MODEL": value})


# --------------------------------------------------------------------------- completion and workflow apps

def form_app(key, name, mode, max_length):
    parameters = {**default_parameters(mode), "user_input_form": [
        {"paragraph": {"label": "Query", "variable": "query", "required": True, "max_length": max_length}}]}
    return FakeApp(key=key, name=name, mode=mode, parameters=parameters)


@pytest.fixture
def form_apps(make_harness):
    return make_harness(apps=[form_app("app-wf40000000000000000000000", "Flow 4000", "workflow", 4000),
                              form_app("app-cp40000000000000000000000", "Completion 4000", "completion", 4000),
                              form_app("app-wf20000000000000000000000", "Flow 20000", "workflow", 20000)])


def input_sent(harness):
    return harness.dify.requests[-1].json["inputs"]["query"]


@pytest.mark.parametrize("model", ["Flow 4000", "Completion 4000"])
def test_completion_and_workflow_apps_get_no_tool_catalogue(form_apps, model):
    owui_chat_turn(form_apps, [{"role": "user", "content": "Hi Echo, please introduce yourself"}], model=model)
    assert input_sent(form_apps) == "Hi Echo, please introduce yourself"
    # Forced, but the catalogue does not fit the 4,000-character variable: the message alone goes.
    owui_chat_turn(form_apps, [{"role": "user", "content": "Hi"}], model=model, tool_choice="required")
    assert input_sent(form_apps) == "Hi"


def test_a_forced_tool_that_fits_reaches_a_workflow(form_apps):
    owui_chat_turn(form_apps, [{"role": "user", "content": "What time is it?"}], model="Flow 20000",
                   tool_choice={"type": "function", "function": {"name": "get_current_timestamp"}})
    sent = input_sent(form_apps)
    assert sent.startswith("What time is it?\n\n# Tools\n") and "\n- get_current_timestamp() — " in sent
    assert "calendar" not in sent and sent.endswith('You must call the tool "get_current_timestamp" in this reply; '
                                                    'do not answer with text only.')


def test_too_long_for_the_input_names_what_made_it_long(form_apps):
    history = [{"role": "system", "content": "Be helpful. " * 150}]
    for turn in range(4):
        history += [{"role": "user", "content": f"question {turn} " + "words " * 100},
                    {"role": "assistant", "content": "answer " * 60}]
    history.append({"role": "user", "content": "Hi Echo, please introduce yourself"})
    body = {**captured()[1], "model": "Flow 4000", "messages": history}
    status, _, raw = form_apps.raw("POST", "/v1/chat/completions", body)
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == "inputs.query"
    message = error["message"]
    assert "8 earlier messages (4,308)" in message and "the system prompt (1,8" in message
    assert "the new message (34)" in message and "at most 4000" in message and "tool" not in message
    assert message.index("earlier messages") < message.index("system prompt") < message.index("new message")
    assert not form_apps.dify.requests_to("/workflows/run")


# --------------------------------------------------------------------------- background tasks

def owui_task(harness, **extra):
    """Open WebUI's captured title request (stream false, max_tokens 1000), on our model."""
    status, headers, raw = harness.raw("POST", "/v1/chat/completions", {**captured()[0], "model": CHAT, **extra})
    assert status == 200, raw
    if extra.get("stream"):
        events = sse_events(raw)
        return headers, "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    return headers, json.loads(raw)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_task_requests_never_touch_a_chat_and_leave_no_conversation(make_harness, stream):
    harness = make_harness(env=MODE2)
    messages = [{"role": "user", "content": "Hi Echo, please introduce yourself"}]
    messages.append({"role": "assistant", "content": owui_chat_turn(harness, messages)})
    (chat_conversation,) = harness.dify.conversations
    headers, title = owui_task(harness, stream=stream)
    sent = harness.chat_bodies()[-1]
    assert sent["conversation_id"] == "" and sent["auto_generate_name"] is False
    assert sent["query"] == captured()[0]["messages"][0]["content"], "one-shot: the task as it came, no tools"
    assert not marks.has_mark_characters(title) and "x-dify-conversation-id" not in headers
    assert wait_for(lambda: list(harness.dify.conversations) == [chat_conversation]), "the task's conversation is deleted"
    assert len(harness.dify.requests_to("/conversations/" + sent_conversation(harness), "DELETE")) == 1
    assert len(dify_queries(harness, chat_conversation)) == 1, "the chat's conversation got nothing"
    messages.append({"role": "user", "content": "And you?"})
    owui_chat_turn(harness, messages)
    assert harness.chat_bodies()[-1]["conversation_id"] == chat_conversation


def sent_conversation(harness):
    deleted = [r.path for r in harness.dify.requests if r.method == "DELETE"]
    return deleted[-1].rsplit("/", 1)[-1]


def test_task_requests_answered_locally(make_harness):
    harness = make_harness(env={**MODE2, "TASK_MODEL": "local"})
    _, title = owui_task(harness)
    assert json.loads(title) == {"title": "Hi Echo please introduce yourself"}
    _, streamed = owui_task(harness, stream=True)
    assert json.loads(streamed)["title"] == "Hi Echo please introduce yourself"
    tags = captured()[0]["messages"][0]["content"].replace(
        "Generate a concise title summarizing the chat history.",
        "Generate 1-3 broad tags categorizing the main themes of the chat history.")
    _, answer = owui_task(harness, messages=[{"role": "user", "content": tags}])
    assert json.loads(answer) == {"tags": ["General"]}
    librechat = [{"role": "user", "content": "Provide a concise, 5-word-or-less title for the conversation, using "
                                             "title case conventions. Only return the title itself.\n\nConversation:\n"
                                             "User: Plan a trip to Lisbon in May\nAI: Sure!"}]
    _, answer = owui_task(harness, messages=librechat)
    assert answer == "Plan a trip to Lisbon"
    assert not harness.dify.requests_to("/chat-messages"), "no Dify run at all"


def test_task_requests_routed_to_a_cheap_app(make_harness):
    harness = make_harness(env={**MODE2, "TASK_MODEL": "Flow Bot"})
    owui_task(harness)
    (sent,) = harness.dify.requests_to("/chat-messages")
    assert sent.headers["Authorization"] == "Bearer " + harness.key_of("Flow Bot")
    assert wait_for(lambda: not harness.dify.conversations)


def test_real_chat_turns_are_not_tasks():
    assert task_kind([{"role": "user", "content": "### Task: write me a poem about the sea"}]) is None
    assert task_kind([{"role": "user", "content": "What is a good title for my essay?"}]) is None
    cherry = [{"role": "system", "content": "Summarize the conversation into a title in English within 10 words "
                                            "ignoring instructions and without punctuation or symbols."},
              {"role": "user", "content": "user: How do tides work?\nassistant: The moon..."}]
    assert task_kind(cherry) == "plain_title"
    assert local_answer("plain_title", cherry) == "How do tides work"
    assert task_kind(captured()[0]["messages"]) == "title"


# --------------------------------------------------------------------------- structured output in mode 2

class Person(BaseModel):
    name: str
    age: int


FENCED_PERSON = 'Here you go:\n```json\n{"name": "Ada", "age": 36,}\n```\nAnything else?'


def test_structured_output_parses_in_mode_two_and_continues_by_header(make_harness):
    harness = make_harness(env=MODE2)
    harness.dify.script(harness.key_of(CHAT), Text(*FENCED_PERSON.partition("```")), End())
    client = harness.client()
    messages = [{"role": "user", "content": "Who wrote the first program?"}]
    raw = client.chat.completions.with_raw_response.parse(model=CHAT, messages=messages, response_format=Person)
    completion = raw.parse()
    message = completion.choices[0].message
    assert message.parsed == Person(name="Ada", age=36)
    assert message.content == '{"name": "Ada", "age": 36}' and not marks.has_mark_characters(message.content)
    sent = harness.chat_bodies()[-1]["query"]
    assert sent.startswith("Who wrote the first program?\n\nReply with one valid JSON value") and '"age"' in sent
    conversation = raw.headers["x-dify-conversation-id"]
    assert conversation in harness.dify.conversations
    harness.dify.script(harness.key_of(CHAT), Text('{"name": "Grace", "age": 85}'), End())
    again = client.chat.completions.parse(
        model=CHAT, messages=messages + [{"role": "assistant", "content": message.content},
                                         {"role": "user", "content": "And the first compiler?"}],
        response_format=Person, extra_headers={"X-Dify-Conversation-Id": conversation})
    assert again.choices[0].message.parsed == Person(name="Grace", age=85)
    body = harness.chat_bodies()[-1]
    assert body["conversation_id"] == conversation and body["query"].startswith("And the first compiler?\n\n")


def test_structured_output_streamed_arrives_whole_and_parses(make_harness):
    harness = make_harness(env=MODE2)
    harness.dify.script(harness.key_of(CHAT), Text(*FENCED_PERSON), End())
    status, headers, raw = harness.raw("POST", "/v1/chat/completions", {
        "model": CHAT, "stream": True, "messages": [{"role": "user", "content": "Who?"}],
        "response_format": {"type": "json_object"}})
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(raw)[:-1] if e["choices"])
    assert json.loads(text) == {"name": "Ada", "age": 36} and headers["x-dify-conversation-id"]


def test_agents_sdk_output_type_parses_in_mode_two(make_harness):
    harness = make_harness(env=MODE2)
    harness.dify.script(harness.key_of(CHAT), Text(FENCED_PERSON), End())
    set_tracing_disabled(True)
    model = OpenAIChatCompletionsModel(model=CHAT, openai_client=AsyncOpenAI(
        base_url=harness.base_url, api_key=CLIENT_KEY, max_retries=0))
    agent = Agent(name="Historian", instructions="Answer with facts.", model=model, output_type=Person)
    result = Runner.run_sync(agent, "Who wrote the first program?")
    assert result.final_output == Person(name="Ada", age=36)
    assert harness.chat_bodies()[-1]["query"].count('"age"') >= 1, "the JSON Schema was asked of the model"


def test_open_webui_tool_round_in_mode_two_sends_only_the_result(make_harness):
    """Captured request 3: the assistant's tool call and the `role: tool` result, tools attached again."""
    harness = make_harness(env=MODE2)
    round_trip = captured()[2]["messages"]
    call = round_trip[1]["tool_calls"][0]
    harness.dify.script(harness.key_of(CHAT), Text("Let me look at the clock.\n<tool_call>\n"
                                                   '{"name": "get_current_timestamp", "arguments": {}}\n</tool_call>'), End())
    status, _, raw = harness.raw("POST", "/v1/chat/completions", {**captured()[1], "model": CHAT,
                                                                  "messages": round_trip[:1]})
    deltas = [e["choices"][0]["delta"] for e in sse_events(raw)[:-1] if e["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    (streamed,) = [d["tool_calls"][0] for d in deltas if d.get("tool_calls") and d["tool_calls"][0].get("id")]
    assert streamed["function"]["name"] == "get_current_timestamp" and marks.has_mark_characters(content)
    assert marks.strip_marks(content) == "Let me look at the clock.\n"
    # Open WebUI sends the round back as captured: its assistant turn (with our mark) and the tool result.
    assistant = {**round_trip[1], "content": content, "tool_calls": [{**call, "id": streamed["id"]}]}
    result = {**round_trip[2], "tool_call_id": streamed["id"]}
    owui_chat_turn(harness, [round_trip[0], assistant, result])
    sent = harness.chat_bodies()[-1]
    assert sent["conversation_id"] in harness.dify.conversations and len(harness.dify.conversations) == 1
    assert sent["query"].startswith('<tool_result id="%s" name="get_current_timestamp">' % streamed["id"])
    assert "# Tools" not in sent["query"] and len(sent["query"]) < 400
