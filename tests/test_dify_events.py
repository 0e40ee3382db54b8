"""The translators: Dify's stream events of every app mode into answer pieces (agent rounds,
thinking, progress, files, workflow outputs, failures), and the settings that shape them."""

import pytest

from config import ConfigError, settings_from
from dify_events import AnswerTranslator, WorkflowTranslator, translator_for
from errors import APIError
from pieces import CONTENT, REASONING, REPLACE
from support import merged

BASE_ENV = {"DIFY_API_KEYS": "app-a", "DIFY_API_BASE": "https://dify.example/v1/", "VALID_API_KEYS": "k1"}


def thought(ident, position, **fields):
    return {"event": "agent_thought", "id": ident, "position": position, "thought": "", "observation": "",
            "tool": "", "tool_labels": {}, "tool_input": "", "message_files": [], **fields}


AGENT_ROUND = [
    thought("t1", 1),
    {"event": "agent_message", "answer": "Let me draw it."},
    thought("t1", 1, thought="Let me draw it.", tool="dalle3", tool_labels={"dalle3": {"en_US": "DALL-E 3"}},
            tool_input='{"dalle3": {"prompt": "a cat"}}'),
    thought("t1", 1, thought="Let me draw it.", tool="dalle3", tool_labels={"dalle3": {"en_US": "DALL-E 3"}},
            tool_input='{"dalle3": {"prompt": "a cat"}}', observation='{"dalle3": "image created"}'),
    {"event": "message_file", "id": "f1", "type": "image", "belongs_to": "assistant", "url": "/files/tools/c.png?s=1"},
    {"event": "message_file", "id": "f1", "type": "image", "belongs_to": "assistant", "url": "/files/tools/c.png?s=1"},
    thought("t2", 2),
    {"event": "agent_message", "answer": "Here it is."},
    thought("t2", 2, thought="Here it is."),
    {"event": "message_end", "metadata": {"usage": {"prompt_tokens": 5, "completion_tokens": 6}}},
]


def run(translator, events):
    pieces = []
    for event in events:
        pieces.extend(translator.feed(event))
    return merged(pieces)


def test_agent_round_reasoning_never_repeats_and_images_are_markdown():
    translator = AnswerTranslator("agent-chat", "m", files_base="https://dify.example/")
    assert run(translator, AGENT_ROUND) == [
        (CONTENT, "Let me draw it."),
        (REASONING, "Calling **DALL-E 3** with prompt: a cat\n\n**DALL-E 3** returned: image created"),
        (CONTENT, "\n\n![image](https://dify.example/files/tools/c.png?s=1)\n\nHere it is."),
    ]
    assert translator.done and translator.usage == {"prompt_tokens": 5, "completion_tokens": 6}


def test_agent_work_inline_quotes_the_steps_in_the_answer():
    content = run(AnswerTranslator("agent-chat", "m", agent_work="inline"), AGENT_ROUND)
    assert content == [(CONTENT, "Let me draw it.\n\n> Calling **DALL-E 3** with prompt: a cat\n\n"
                                 "> **DALL-E 3** returned: image created\n\n![image](/files/tools/c.png?s=1)\n\n"
                                 "Here it is.")]


def test_agent_work_hidden_keeps_only_the_answer_and_files():
    assert run(AnswerTranslator("agent-chat", "m", agent_work="hidden"), AGENT_ROUND) == [
        (CONTENT, "Let me draw it.\n\n![image](/files/tools/c.png?s=1)\n\nHere it is.")]


def test_a_thought_the_answer_did_not_stream_is_reasoning():
    translator = AnswerTranslator("agent-chat", "m")
    pieces = run(translator, [thought("t1", 1, thought="I need the weather"),
                              thought("t1", 1, thought="I need the weather first.", tool="weather",
                                      tool_input='{"weather": {"city": "Oslo"}}')])
    assert pieces == [(REASONING, "I need the weather first.\n\nCalling **weather** with city: Oslo")]


def test_new_agent_final_message_is_not_appended_twice():
    translator = AnswerTranslator("agent", "m")
    assert translator.feed({"event": "agent_message", "answer": "Hel"}) == ((CONTENT, "Hel"),)
    assert translator.feed({"event": "message", "answer": "Hello"}) == ()


# --- reasoning models and chatflow progress --------------------------------------------------

def test_think_tags_settings():
    events = [{"event": "message", "answer": "<think>hm</think>"}, {"event": "message", "answer": "Hi"},
              {"event": "message_end"}]
    assert run(AnswerTranslator("chat", "m"), events) == [(REASONING, "hm"), (CONTENT, "Hi")]
    assert run(AnswerTranslator("chat", "m", think_tags="keep"), events) == [(CONTENT, "<think>hm</think>Hi")]
    assert run(AnswerTranslator("chat", "m", think_tags="hidden"), events) == [(CONTENT, "Hi")]


def test_reasoning_chunk_events():
    event = {"event": "reasoning_chunk", "data": {"reasoning": "pondering"}}
    assert AnswerTranslator("advanced-chat", "m").feed(event) == ((REASONING, "pondering"),)
    assert AnswerTranslator("advanced-chat", "m", think_tags="hidden").feed(event) == ()


def node(title, node_type="llm", **fields):
    return {"event": "node_started", "data": {"title": title, "node_type": node_type, **fields}}


def test_node_progress_as_one_reasoning_line():
    translator = AnswerTranslator("advanced-chat", "m", workflow_progress="reasoning")
    pieces = run(translator, [node("Start", "start"), node("Knowledge retrieval", "knowledge-retrieval"),
                              {"event": "iteration_started", "data": {"title": "Each doc", "node_type": "iteration"}},
                              node("Inner", iteration_id="it1"), node("LLM"),
                              {"event": "message", "answer": "<think>x</think>Answer"}])
    assert pieces == [(REASONING, "running: Knowledge retrieval ▸ Each doc ▸ LLM\n\nx"), (CONTENT, "Answer")]
    assert run(AnswerTranslator("advanced-chat", "m"), [node("LLM")]) == []


def test_a_subclass_overriding_a_handler_gets_its_override_for_every_event_it_handles():
    class Overridden(AnswerTranslator):
        def on_node_started(self, event):
            return [(REASONING, "overridden " + event["event"])]

    translator = Overridden("advanced-chat", "m")
    assert [translator.feed({"event": name, "data": {"title": "x"}})
            for name in ("node_started", "iteration_started", "loop_started")] == [
        ((REASONING, "overridden node_started"),), ((REASONING, "overridden iteration_started"),),
        ((REASONING, "overridden loop_started"),)]


@pytest.mark.parametrize("order", [("workflow_finished", "message_end"), ("message_end", "workflow_finished")])
def test_chatflow_ends_in_either_order(order):
    translator = AnswerTranslator("advanced-chat", "m")
    ends = {"workflow_finished": {"event": "workflow_finished", "data": {"status": "succeeded"}},
            "message_end": {"event": "message_end", "metadata": {"usage": {"total_tokens": 3}}}}
    translator.feed({"event": "message", "answer": "Hi"})
    translator.feed(ends[order[0]])
    translator.feed(ends[order[1]])
    assert translator.done and translator.usage == {"total_tokens": 3}


def test_failed_chatflow_raises_with_difys_message():
    translator = AnswerTranslator("advanced-chat", "m")
    with pytest.raises(APIError) as caught:
        translator.feed({"event": "workflow_finished", "data": {"status": "failed", "error": "node timed out"}})
    assert caught.value.status_code == 502 and "node timed out" in caught.value.message
    assert translator.failure is caught.value


def test_replace_resets_pending_thinking():
    translator = AnswerTranslator("chat", "m")
    translator.feed({"event": "message", "answer": "<think>secret"})
    assert translator.feed({"event": "message_replace", "answer": "Blocked"}) == ((REPLACE, "Blocked"),)
    assert translator.feed({"event": "message_end"}) == ()
    assert translator.finish_reason() == "content_filter"


# --- workflow apps -------------------------------------------------------------------------

def test_workflow_text_chunks_then_outputs_are_not_repeated():
    translator = WorkflowTranslator("workflow", "m")
    pieces = run(translator, [{"event": "workflow_started", "data": {}},
                              {"event": "text_chunk", "data": {"text": "Bon"}},
                              {"event": "text_chunk", "data": {"text": "jour"}},
                              {"event": "workflow_finished",
                               "data": {"status": "succeeded", "outputs": {"text": "Bonjour"}, "total_tokens": 40}}])
    assert pieces == [(CONTENT, "Bonjour")] and translator.done
    assert translator.usage == {"prompt_tokens": 38, "completion_tokens": 2, "total_tokens": 40}


def test_workflow_outputs_become_the_answer_when_nothing_streamed():
    translator = WorkflowTranslator("workflow", "m")
    assert run(translator, [{"event": "workflow_finished", "data": {"status": "succeeded", "outputs": {
        "summary": "Short.", "score": 3}, "total_tokens": 0}}]) == [
        (CONTENT, '{\n  "summary": "Short.",\n  "score": 3\n}')]
    assert translator.usage is None


def test_failed_workflow_raises_with_difys_message():
    with pytest.raises(APIError) as caught:
        WorkflowTranslator("workflow", "m").feed(
            {"event": "workflow_finished", "data": {"status": "failed", "error": "Division by zero"}})
    assert "Division by zero" in caught.value.message and caught.value.headers()["x-should-retry"] == "false"


def test_translator_for_follows_the_settings():
    settings = settings_from({**BASE_ENV, "AGENT_WORK": "inline", "THINK_TAGS": "keep",
                              "WORKFLOW_PROGRESS": "reasoning"})
    translator = translator_for("agent-chat", "m", settings)
    assert (translator.agent_work, translator.think_tags, translator.workflow_progress) == (
        "inline", "keep", "reasoning")
    assert translator.files_base == "https://dify.example/"
    assert isinstance(translator_for("workflow", "m", settings), WorkflowTranslator)
    assert type(translator_for("completion", "m")) is AnswerTranslator


@pytest.mark.parametrize("name", ["AGENT_WORK", "THINK_TAGS", "WORKFLOW_PROGRESS"])
def test_bad_presentation_settings_name_the_setting(name):
    with pytest.raises(ConfigError) as caught:
        settings_from({**BASE_ENV, name: "loud"})
    assert str(caught.value).startswith(name)


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
