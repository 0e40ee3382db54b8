"""Every Dify app mode end to end: the fake Dify plays each mode's real event sequence, the real
proxy translates it, and the real openai client reads it, streaming and not."""

import json
import socket
import time

import openai
import pytest

from fake_dify import End, Event, FakeApp, Hang, Start, Text, default_parameters
from support import CLIENT_KEY, sse_events

CHAT, AGENT, FLOW, WRITER, PIPELINE = "Chat Bot", "Agent Bot", "Flow Bot", "Writer", "Pipeline"


def all_modes():
    return [FakeApp(key="app-chat0000000000000000000000", name=CHAT, mode="chat"),
            FakeApp(key="app-agent000000000000000000000", name=AGENT, mode="agent-chat"),
            FakeApp(key="app-flow0000000000000000000000", name=FLOW, mode="advanced-chat"),
            FakeApp(key="app-writer00000000000000000000", name=WRITER, mode="completion"),
            FakeApp(key="app-pipe0000000000000000000000", name=PIPELINE, mode="workflow")]


@pytest.fixture
def modes(make_harness):
    return make_harness(apps=all_modes())


def ask(harness, model, stream, text="hi", **options):
    """(content, reasoning, usage, finish_reason) of one chat completion through the openai client."""
    client = harness.client()
    messages = [{"role": "user", "content": text}]
    if not stream:
        answer = client.chat.completions.create(model=model, messages=messages, **options)
        message = answer.choices[0].message
        return (message.content, getattr(message, "reasoning_content", None) or "", answer.usage,
                answer.choices[0].finish_reason)
    content, reasoning, usage, finish = [], [], None, None
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **options):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            finish = choice.finish_reason or finish
    return "".join(content), "".join(reasoning), usage, finish


def sent_to(harness, path):
    return [r.json for r in harness.dify.requests_to(path)]


def wait_for(condition, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.01)
    return condition()


# --- every mode answers ----------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", [CHAT, AGENT, FLOW, WRITER, PIPELINE])
@pytest.mark.real_difies
def test_every_mode_answers_through_the_openai_client(modes, model, stream):
    content, reasoning, usage, finish = ask(modes, model, stream, text="Bonjour")
    assert content == "Echo: Bonjour" and reasoning == "" and finish == "stop"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0


@pytest.mark.real_difies
def test_models_list_every_mode(modes):
    assert [m.id for m in modes.client().models.list()] == [CHAT, AGENT, FLOW, WRITER, PIPELINE]


# --- agent apps ------------------------------------------------------------------------------

def thought(ident, position, **fields):
    return Event({"event": "agent_thought", "id": ident, "position": position, "thought": "", "observation": "",
                  "tool": "", "tool_labels": {}, "tool_input": "", "message_files": [], **fields})


DALLE = {"tool": "dalle3", "tool_labels": {"dalle3": {"en_US": "DALL-E 3", "zh_Hans": "DALL-E 3 绘画"}},
         "tool_input": '{"dalle3": {"prompt": "a cat on a sofa"}}'}
OBSERVATION = ("image has been created and sent to user already, you do not need to create it, just tell the user "
               "to check it now. " * 8)


def agent_run():
    """Dify's agent-chat sequence: two rounds, a tool that makes an image, thoughts re-sent as they grow."""
    return [thought("th-1", 1),
            Text("Let me draw ", "that."),
            thought("th-1", 1, thought="Let me draw that.", **DALLE),
            thought("th-1", 1, thought="Let me draw that.", observation=json.dumps({"dalle3": OBSERVATION}),
                    message_files=["file-1"], **DALLE),
            Event({"event": "message_file", "id": "file-1", "type": "image", "belongs_to": "assistant",
                   "url": "/files/tools/cat.png?timestamp=1&nonce=n&sign=s"}),
            thought("th-2", 2),
            Text("Here is ", "your cat."),
            thought("th-2", 2, thought="Here is your cat."),
            End(usage={"prompt_tokens": 300, "completion_tokens": 25})]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.real_difies
def test_agent_tool_use_is_thinking_and_the_image_is_in_the_answer(modes, stream):
    modes.dify.script(modes.key_of(AGENT), *agent_run())
    content, reasoning, usage, finish = ask(modes, AGENT, stream, text="Draw a cat")
    image_url = f"http://127.0.0.1:{modes.dify.port}/files/tools/cat.png?timestamp=1&nonce=n&sign=s"
    assert content == f"Let me draw that.\n\n![image]({image_url})\n\nHere is your cat."
    calling, returned = reasoning.split("\n\n")
    assert calling == "Calling **DALL-E 3** with prompt: a cat on a sofa"
    assert returned.startswith("**DALL-E 3** returned: image has been created and sent to user already")
    assert returned.endswith("more characters)") and len(returned) < 600
    assert "Let me draw" not in reasoning and "Here is" not in reasoning
    assert (usage.prompt_tokens, usage.completion_tokens, finish) == (300, 25, "stop")


def test_agent_work_shown_as_reasoning_deltas_while_the_tool_runs(modes):
    modes.dify.script(modes.key_of(AGENT), *agent_run())
    status, _, body = modes.raw("POST", "/v1/chat/completions",
                                {"model": AGENT, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    deltas = [e["choices"][0]["delta"] for e in sse_events(body) if e != "[DONE]" and e["choices"]]
    kinds = [next(iter(d)) for d in deltas if d.get("content") or d.get("reasoning_content")]
    # Pacing may split or merge chunks; what matters is the order: answer, the tool's work, answer.
    order = [kind for index, kind in enumerate(kinds) if index == 0 or kinds[index - 1] != kind]
    assert status == 200
    assert order == ["content", "reasoning_content", "content"]


@pytest.mark.parametrize("stream", [False, True])
def test_agent_work_inline_quotes_steps_in_the_answer(make_harness, stream):
    harness = make_harness(apps=all_modes(), env={"AGENT_WORK": "inline"})
    harness.dify.script(harness.key_of(AGENT), *agent_run())
    content, reasoning, _, _ = ask(harness, AGENT, stream)
    assert reasoning == ""
    assert content.startswith("Let me draw that.\n\n> Calling **DALL-E 3** with prompt: a cat on a sofa\n\n"
                              "> **DALL-E 3** returned: image has been created")
    assert content.endswith(".png?timestamp=1&nonce=n&sign=s)\n\nHere is your cat.")


@pytest.mark.parametrize("stream", [False, True])
def test_agent_work_hidden(make_harness, stream):
    harness = make_harness(apps=all_modes(), env={"AGENT_WORK": "hidden"})
    harness.dify.script(harness.key_of(AGENT), *agent_run())
    content, reasoning, _, _ = ask(harness, AGENT, stream)
    assert reasoning == "" and "DALL-E" not in content
    assert content.startswith("Let me draw that.\n\n![image](") and content.endswith("\n\nHere is your cat.")


# --- reasoning models ------------------------------------------------------------------------

R1_RUN = [Text("<thi", "nk>\nThe user says hi", ".\nI greet back.\n</th", "ink>\n\nHello", "! <b>hi</b>"), End()]


@pytest.mark.parametrize("stream", [False, True])
def test_think_tags_split_across_chunks_become_reasoning(modes, stream):
    modes.dify.script(modes.key_of(CHAT), *R1_RUN)
    content, reasoning, _, _ = ask(modes, CHAT, stream)
    assert (content, reasoning) == ("Hello! <b>hi</b>", "The user says hi.\nI greet back.")


@pytest.mark.parametrize("stream", [False, True])
def test_dify_thinking_details_and_reasoning_chunks(modes, stream):
    modes.dify.script(modes.key_of(FLOW), Start(),
                      Event({"event": "reasoning_chunk", "data": {"reasoning": "Weighing options."}}),
                      Text('<details style="color:gray" open> <summary> Thinking... </summary>\nStep one.',
                           "\n</details>\n", "Done."), End())
    content, reasoning, _, _ = ask(modes, FLOW, stream)
    assert content == "Done."
    assert reasoning == "Weighing options.\n\nStep one."


@pytest.mark.parametrize("setting, content, reasoning", [
    ("keep", "<think>\nThe user says hi.\nI greet back.\n</think>\n\nHello! <b>hi</b>", ""),
    ("hidden", "Hello! <b>hi</b>", ""),
])
def test_think_tags_setting(make_harness, setting, content, reasoning):
    harness = make_harness(apps=all_modes(), env={"THINK_TAGS": setting})
    harness.dify.script(harness.key_of(CHAT), *R1_RUN)
    assert ask(harness, CHAT, True)[:2] == (content, reasoning)


# --- chatflow apps ---------------------------------------------------------------------------

def node_started(title, node_type):
    return Event({"event": "node_started", "data": {"id": title, "node_id": title, "node_type": node_type,
                                                    "title": title, "index": 2, "iteration_id": None}})


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("order", ["workflow_first", "message_first"])
def test_chatflow_progress_and_either_end_order(make_harness, order, stream):
    harness = make_harness(apps=all_modes(), env={"WORKFLOW_PROGRESS": "reasoning"}, chatflow_end_order=order)
    harness.dify.script(harness.key_of(FLOW), Start(), node_started("Knowledge retrieval", "knowledge-retrieval"),
                        node_started("LLM", "llm"), Text("Paris ", "is lovely."), node_started("Answer", "answer"),
                        End(usage={"prompt_tokens": 40, "completion_tokens": 4}))
    content, reasoning, usage, finish = ask(harness, FLOW, stream)
    assert content == "Paris is lovely." and finish == "stop"
    assert reasoning == "running: Knowledge retrieval ▸ LLM ▸ Answer"
    assert (usage.prompt_tokens, usage.completion_tokens) == (40, 4)


def test_chatflow_progress_is_off_by_default(modes):
    modes.dify.script(modes.key_of(FLOW), Start(), node_started("LLM", "llm"), Text("Hi"), End())
    assert ask(modes, FLOW, True)[:2] == ("Hi", "")


@pytest.mark.real_difies
def test_failed_chatflow_is_an_openai_error(modes):
    modes.dify.script(modes.key_of(FLOW), Start(), End(status="failed", error="LLM node timed out"))
    with pytest.raises(openai.APIStatusError) as caught:
        ask(modes, FLOW, False)
    assert caught.value.status_code == 502 and "LLM node timed out" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_failed_chatflow_mid_stream_ends_with_an_error_event(modes):
    modes.dify.script(modes.key_of(FLOW), Start(), Text("Partial "), End(status="failed", error="LLM node timed out"))
    chunks = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in modes.client().chat.completions.create(model=FLOW, stream=True,
                                                            messages=[{"role": "user", "content": "x"}]):
            chunks.append(chunk)
    assert "LLM node timed out" in caught.value.message
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Partial "
    assert all(c.choices[0].finish_reason is None for c in chunks if c.choices)


# --- completion apps -------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_completion_text_goes_into_the_form_and_no_conversation(modes, stream):
    content, _, usage, _ = ask(modes, WRITER, stream, text="Write a haiku", extra_body={"inputs": {"n": 3}})
    sent = sent_to(modes, "/completion-messages")[-1]
    assert sent["inputs"] == {"query": "Write a haiku", "n": 3}
    assert "query" not in sent and "conversation_id" not in sent and sent["response_mode"] == "streaming"
    assert content == "Echo: Write a haiku" and usage.total_tokens > 0
    assert not sent_to(modes, "/chat-messages")


def test_completion_without_a_text_variable_uses_query(make_harness):
    parameters = {**default_parameters("completion"), "user_input_form": [
        {"select": {"label": "Tone", "variable": "tone", "required": False, "options": ["a", "b"], "default": "a"}}]}
    harness = make_harness(apps=[FakeApp(key="app-legacy0000000000000000000", name="Legacy", mode="completion",
                                         parameters=parameters)])
    assert ask(harness, "Legacy", False, text="Old style")[0] == "Echo: Old style"
    assert sent_to(harness, "/completion-messages")[-1] == {
        "inputs": {"tone": "a"}, "user": sent_to(harness, "/completion-messages")[-1]["user"],
        "response_mode": "streaming", "query": "Old style"}


def test_input_variable_setting_chooses_the_text_variable(make_harness):
    harness = make_harness(apps=all_modes(), env={"INPUT_VARIABLE": "notes"})
    ask(harness, WRITER, False, text="Into notes")
    ask(harness, PIPELINE, False, text="Into notes too")
    assert sent_to(harness, "/completion-messages")[-1]["inputs"] == {"notes": "Into notes"}
    assert sent_to(harness, "/workflows/run")[-1]["inputs"] == {"notes": "Into notes too"}


@pytest.mark.real_difies
def test_completion_stream_is_stopped_as_a_completion_when_the_client_leaves(modes):
    leave_mid_stream(modes, WRITER, "/completion-messages")
    assert modes.dify.stops[0][0] == "completion"


# --- workflow apps ---------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_workflow_text_chunks_stream_as_content(modes, stream):
    modes.dify.script(modes.key_of(PIPELINE), Start(), Text("Bon", "jour"),
                      End(usage={"prompt_tokens": 100, "completion_tokens": 20}))
    content, _, usage, finish = ask(modes, PIPELINE, stream, text="Translate hello")
    sent = sent_to(modes, "/workflows/run")[-1]
    assert sent["inputs"] == {"query": "Translate hello"} and set(sent) == {"inputs", "user", "response_mode"}
    assert content == "Bonjour" and finish == "stop"
    assert usage.total_tokens == 120 and usage.completion_tokens == 2


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("outputs, answer", [
    ({"result": "Bonjour le monde"}, "Bonjour le monde"),
    ({"summary": "Short.", "score": 3}, '{\n  "summary": "Short.",\n  "score": 3\n}'),
])
def test_workflow_outputs_become_the_answer_when_nothing_streamed(modes, stream, outputs, answer):
    modes.dify.script(modes.key_of(PIPELINE), Start(), End(outputs=outputs))
    assert ask(modes, PIPELINE, stream)[0] == answer


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.real_difies
def test_failed_workflow_is_an_openai_error_with_difys_message(modes, stream):
    modes.dify.script(modes.key_of(PIPELINE), Start(), End(status="failed", error="Division by zero in Code node"))
    with pytest.raises(openai.APIError) as caught:
        ask(modes, PIPELINE, stream)
    assert "Division by zero in Code node" in caught.value.message and PIPELINE in caught.value.message


def test_workflow_without_a_text_variable_runs_on_its_inputs(make_harness):
    parameters = {**default_parameters("workflow"), "user_input_form": [
        {"number": {"label": "Days", "variable": "days", "required": True}}]}
    harness = make_harness(apps=[FakeApp(key="app-report0000000000000000000", name="Report", mode="workflow",
                                         parameters=parameters)])
    harness.dify.script(harness.key_of("Report"), Start(), End(outputs={"report": "3 days: all quiet"}))
    answer = harness.client().chat.completions.create(model="Report", messages=[{"role": "user", "content": "go"}],
                                                      extra_body={"inputs": {"days": 3}})
    assert answer.choices[0].message.content == "3 days: all quiet"
    assert sent_to(harness, "/workflows/run")[-1]["inputs"] == {"days": 3}


def test_workflow_progress(make_harness):
    harness = make_harness(apps=all_modes(), env={"WORKFLOW_PROGRESS": "reasoning"})
    harness.dify.script(harness.key_of(PIPELINE), Start(), node_started("Code", "code"),
                        node_started("Template", "template-transform"), End(outputs={"text": "42"}))
    assert ask(harness, PIPELINE, True)[:2] == ("42", "running: Code ▸ Template")


@pytest.mark.real_difies
def test_workflow_stream_is_stopped_as_a_workflow_when_the_client_leaves(modes):
    leave_mid_stream(modes, PIPELINE, "/workflows/run")
    assert modes.dify.stops[0][0] == "workflow"


def leave_mid_stream(harness, model, path):
    harness.dify.script(harness.key_of(model), Text("first words"), Hang())
    with socket.create_connection(("127.0.0.1", harness.port)) as conn:
        body = json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": "x"}]})
        conn.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        received = b""
        while b"first words" not in received:
            received += conn.recv(65536)
    assert wait_for(lambda: harness.dify.stops)
    assert harness.dify.stops[0][2] == sent_to(harness, path)[-1]["user"]


# --- app inputs ------------------------------------------------------------------------------

STRICT_FORM = {**default_parameters("chat"), "user_input_form": [
    {"text-input": {"label": "City", "variable": "city", "required": True, "max_length": 12, "default": ""}},
    {"select": {"label": "Tone", "variable": "tone", "required": False, "options": ["formal", "casual"],
                "default": "formal"}},
]}


@pytest.fixture
def strict(make_harness):
    return make_harness(apps=[FakeApp(key="app-strict000000000000000000", name="Strict", mode="chat",
                                      parameters=STRICT_FORM),
                              FakeApp(key="app-short0000000000000000000", name="Short Flow", mode="workflow",
                                      parameters={**default_parameters("workflow"), "user_input_form": [
                                          {"text-input": {"label": "Word", "variable": "word", "required": True,
                                                          "max_length": 10}}]})])


@pytest.mark.parametrize("inputs, param, words", [
    ({}, "inputs.city", "needs the input 'city' (City)"),
    ({"city": "Oslo", "tone": "angry"}, "inputs.tone", "must be one of 'formal', 'casual'"),
    ({"city": "Llanfairpwllgwyngyll"}, "inputs.city", "at most 12"),
])
def test_bad_inputs_are_400_before_dify_is_called(strict, inputs, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        strict.client().chat.completions.create(model="Strict", messages=[{"role": "user", "content": "x"}],
                                                extra_body={"inputs": inputs})
    assert caught.value.param == param and words in caught.value.message
    assert not strict.dify.requests_to("/chat-messages")


def test_inputs_reach_dify_with_defaults_filled(strict):
    strict.client().chat.completions.create(model="Strict", messages=[{"role": "user", "content": "x"}],
                                            extra_body={"inputs": {"city": "Oslo"}})
    assert sent_to(strict, "/chat-messages")[-1]["inputs"] == {"city": "Oslo", "tone": "formal"}


def test_a_message_too_long_for_the_workflow_input_says_so(strict):
    with pytest.raises(openai.BadRequestError) as caught:
        strict.client().chat.completions.create(model="Short Flow",
                                                messages=[{"role": "user", "content": "far too long a message"}])
    assert caught.value.param == "inputs.word" and "The message is 22 characters long" in caught.value.message
    assert not strict.dify.requests_to("/workflows/run")


# --- legacy /v1/completions ------------------------------------------------------------------

@pytest.mark.parametrize("model", [WRITER, CHAT, PIPELINE])
def test_text_completions_non_stream(modes, model):
    answer = modes.client().completions.create(model=model, prompt="Once upon", max_tokens=16, suffix="\n",
                                               echo=False, best_of=1, logprobs=None)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-") and answer.model == model
    assert answer.choices[0].text == "Echo: Once upon" and answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].index == 0 and answer.choices[0].logprobs is None
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens > 0


@pytest.mark.parametrize("model", [WRITER, CHAT, PIPELINE])
def test_text_completions_stream(modes, model):
    chunks = list(modes.client().completions.create(model=model, prompt=["Once upon"], stream=True,
                                                    stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"text_completion"} and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Echo: Once upon"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


def test_text_completion_stream_on_the_wire(modes):
    modes.dify.script(modes.key_of(CHAT), *R1_RUN)
    status, headers, body = modes.raw("POST", "/v1/completions", {"model": CHAT, "prompt": "x", "stream": True})
    events = sse_events(body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == "Hello! <b>hi</b>"  # the thinking is not part of a text completion
    assert all(set(e["choices"][0]) == {"text", "index", "logprobs", "finish_reason"} for e in events[:-1])


def test_text_completion_errors(modes):
    with pytest.raises(openai.BadRequestError) as caught:
        modes.client().completions.create(model=CHAT, prompt=["one", "two"])
    assert caught.value.param == "prompt"
    with pytest.raises(openai.NotFoundError):
        modes.client().completions.create(model="nope", prompt="x")
    modes.dify.script(modes.key_of(PIPELINE), Start(), End(status="failed", error="Code node crashed"))
    with pytest.raises(openai.APIError) as caught:
        list(modes.client().completions.create(model=PIPELINE, prompt="x", stream=True))
    assert "Code node crashed" in caught.value.message
