"""Direct tests of the pure pieces behind every app mode: the thinking splitter, agent-round
summaries, workflow outputs, the per-mode translators and the input-form checks."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import ConfigError, settings_from
from errors import APIError
from events import (CONTENT, REASONING, REPLACE, AnswerTranslator, ThinkSplitter, WorkflowTranslator,
                    describe_arguments, file_markdown, render_outputs, summarise, tool_uses, translator_for)
from inputs import check_inputs, form_variables, text_variable
from openai_api import TextChunkEncoder, completion_body, parse_text_completion_request, text_choice

BASE_ENV = {"DIFY_API_KEYS": "app-a", "DIFY_API_BASE": "https://dify.example/v1/", "VALID_API_KEYS": "k1"}


def merged(pieces):
    """Adjacent pieces of one kind joined, so different chunkings compare equal."""
    out = []
    for kind, text in pieces:
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


def split(chunks):
    splitter = ThinkSplitter()
    pieces = []
    for chunk in chunks:
        pieces.extend(splitter.feed(chunk))
    return merged(pieces + splitter.flush())


# --- the thinking splitter -----------------------------------------------------------------

R1_ANSWER = "<think>\nThe user greets me.\n\nI greet back.\n</think>\n\nHello! <b>Welcome</b>."
DETAILS_ANSWER = ('<details style="color:gray;background-color: #f8f8f8;padding: 8px;border-radius: 4px;" open> '
                  "<summary> Thinking... </summary>\nThe user greets me.\n</details>\nHello!")


def test_think_block_becomes_reasoning_and_the_answer_is_trimmed():
    assert split([R1_ANSWER]) == [(REASONING, "The user greets me.\n\nI greet back."),
                                  (CONTENT, "Hello! <b>Welcome</b>.")]


def test_dify_thinking_details_block_becomes_reasoning():
    assert split([DETAILS_ANSWER]) == [(REASONING, "The user greets me."), (CONTENT, "Hello!")]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_chunking_gives_the_same_split(data):
    text = data.draw(st.sampled_from([R1_ANSWER, DETAILS_ANSWER, "x <think> y\n<thinking> z",
                                      "a\n<details><summary>More</summary>b</details>"]))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(text) - 1), max_size=12)))
    chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    assert split(chunks) == split([text])


def test_only_a_possible_tag_prefix_is_held_back():
    splitter = ThinkSplitter()
    assert splitter.feed("Hello <thi") == [(CONTENT, "Hello <thi")]  # not at a line start: never a tag
    splitter = ThinkSplitter()
    assert splitter.feed("Plain text\n<thi") == [(CONTENT, "Plain text\n")]
    assert splitter.feed("s is html") == [(CONTENT, "<this is html")]
    splitter = ThinkSplitter()
    assert splitter.feed("<think>Deep thought </th") == [(REASONING, "Deep thought")]
    assert splitter.feed("ink>Done") == [(CONTENT, "Done")]


def test_mentions_of_the_tags_inside_lines_stay_text():
    text = "Wrap reasoning in `<think>` tags, e.g. a <think> b </think>."
    assert split([text]) == [(CONTENT, text)]


def test_other_details_blocks_stay_text():
    text = "<details><summary>Sources</summary>\n1. a\n</details>\nDone"
    assert split([text]) == [(CONTENT, text)]


def test_unfinished_tags_are_released_at_the_end():
    assert split(["Answer\n<thi"]) == [(CONTENT, "Answer\n<thi")]
    assert split(["<think>never closed"]) == [(REASONING, "never closed")]


# --- agent rounds --------------------------------------------------------------------------

def test_summarise_collapses_whitespace_and_cuts_at_a_word():
    assert summarise("  a\n\n b\t c ", 50) == "a b c"
    long = " ".join(["word"] * 100)
    short = summarise(long, 40)
    assert short.startswith("word word") and len(short) < 70
    assert short.endswith("more characters)") and f"({len(long) - 39} more" in short


def test_tool_uses_per_tool_with_labels_inputs_and_observations():
    thought = {"tool": "google_search;weather", "tool_labels": {"google_search": {"en_US": "Google Search"}},
               "tool_input": json.dumps({"google_search": {"query": "Paris"}, "weather": {"city": "Paris", "days": 2}}),
               "observation": json.dumps({"google_search": "Paris is the capital " * 100, "weather": {"temp": 18}})}
    (search, search_input, search_result), (weather, weather_input, weather_result) = tool_uses(thought)
    assert (search, search_input) == ("Google Search", "query: Paris")
    assert len(search_result) < 600 and search_result.endswith("more characters)")
    assert (weather, weather_input, weather_result) == ("weather", "city: Paris, days: 2", '{"temp": 18}')


def test_tool_uses_before_the_tool_ran_and_without_tools():
    assert tool_uses({"tool": "dalle3", "tool_input": '{"dalle3": {"prompt": "a cat"}}', "observation": ""}) == [
        ("dalle3", "prompt: a cat", None)]
    assert tool_uses({"tool": "", "thought": "just text"}) == []
    assert tool_uses({"tool": "calc", "tool_input": "1+1", "observation": "2"}) == [("calc", "1+1", "2")]


def test_describe_arguments():
    assert describe_arguments({"q": "x", "n": 3, "opts": {"a": True}}) == 'q: x, n: 3, opts: {"a": true}'
    assert describe_arguments("") == "" and describe_arguments([1, 2]) == "[1, 2]"


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

def test_render_outputs():
    assert render_outputs({"result": "Bonjour"}) == "Bonjour"
    assert json.loads(render_outputs({"a": 1, "b": "x"})) == {"a": 1, "b": "x"}
    assert render_outputs({"a": 1, "b": "ü"}).count("\n") == 3 and "ü" in render_outputs({"a": 1, "b": "ü"})
    assert render_outputs({"n": 42}) == "42"
    assert render_outputs({}) == "" and render_outputs(None) == "" and render_outputs({"x": None}) == ""
    image = {"dify_model_identity": "__dify__file__", "type": "image", "url": "/files/x.png", "filename": "x.png"}
    assert render_outputs({"pic": image}, "https://d.example/") == "![x.png](https://d.example/files/x.png)"
    assert render_outputs({"pics": [image, {**image, "type": "document", "filename": "r.pdf"}]}) == (
        "![x.png](/files/x.png)\n\n[r.pdf](/files/x.png)")


def test_file_markdown_keeps_absolute_urls():
    assert file_markdown({"type": "image", "url": "https://cdn.example/a.png"}, "https://d/") == (
        "![image](https://cdn.example/a.png)")
    assert file_markdown({"type": "image"}) == ""


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


# --- app inputs ----------------------------------------------------------------------------

FORM = {"user_input_form": [
    {"text-input": {"label": "City", "variable": "city", "required": True, "max_length": 10, "default": ""}},
    {"paragraph": {"label": "Notes", "variable": "notes", "required": False}},
    {"select": {"label": "Tone", "variable": "tone", "required": False, "options": ["formal", "casual"],
                "default": "formal"}},
    {"number": {"label": "N", "variable": "n", "required": False}},
    {"checkbox": {"label": "Flag", "variable": "flag", "required": False}},
    {"external_data_tool": {"type": "api"}},
]}


def test_form_variables_reads_the_form_and_knows_when_it_is_unknown():
    variables = form_variables(FORM)
    assert [(v.name, v.kind) for v in variables] == [("city", "text-input"), ("notes", "paragraph"),
                                                     ("tone", "select"), ("n", "number"), ("flag", "checkbox")]
    assert variables[0].max_length == 10 and variables[0].required and variables[2].options == ("formal", "casual")
    assert form_variables({}) is None and form_variables({"user_input_form": []}) == []


def test_defaults_are_filled_and_extras_pass_through():
    assert check_inputs(form_variables(FORM), {"city": "Oslo", "extra": 1}) == {
        "city": "Oslo", "extra": 1, "tone": "formal"}


@pytest.mark.parametrize("given, param, words", [
    ({}, "inputs.city", "needs the input 'city' (City)"),
    ({"city": ""}, "inputs.city", "extra_body"),
    ({"city": "Oslo", "tone": "angry"}, "inputs.tone", "'formal', 'casual'"),
    ({"city": "Llanfairpwllgwyngyll"}, "inputs.city", "at most 10"),
    ({"city": 5}, "inputs.city", "must be a string"),
    ({"city": "Oslo", "n": "many"}, "inputs.n", "must be a number"),
    ({"city": "Oslo", "n": True}, "inputs.n", "must be a number"),
    ({"city": "Oslo", "flag": "yes"}, "inputs.flag", "true or false"),
])
def test_bad_inputs_are_400_naming_the_variable(given, param, words):
    with pytest.raises(APIError) as caught:
        check_inputs(form_variables(FORM), given)
    assert caught.value.status_code == 400 and caught.value.param == param and words in caught.value.message


def test_numbers_may_be_numeric_strings():
    assert check_inputs(form_variables(FORM), {"city": "Oslo", "n": "2.5"})["n"] == "2.5"


def test_a_too_long_message_says_it_is_the_message():
    with pytest.raises(APIError) as caught:
        check_inputs(form_variables(FORM), {"city": "A long message here"}, text_variable="city")
    assert caught.value.message.startswith("The message is 19 characters long")


def test_text_variable_choice():
    variables = form_variables(FORM)
    assert text_variable(variables, {}) == "city"
    assert text_variable(variables, {"city": "Oslo"}) == "notes"
    assert text_variable(variables, {}, preferred="notes") == "notes"
    assert text_variable(variables, {}, preferred="absent") == "city"
    assert text_variable(variables, {"city": "a", "notes": "b"}) is None
    assert text_variable(form_variables({"user_input_form": []}), {}) is None
    assert text_variable(None, {}) == "query" and text_variable(None, {}, preferred="text") == "text"


# --- legacy text completions ---------------------------------------------------------------

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


def test_text_completion_shapes():
    body = completion_body("cmpl-1", 7, "m", text_choice("Hi", "tool_calls"), {"prompt_tokens": 1, "completion_tokens": 2},
                           kind="text_completion")
    assert body == {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
                    "choices": [{"text": "Hi", "index": 0, "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    encoder = TextChunkEncoder("cmpl-1", "m", created=7)
    assert encoder.role() == b"" and encoder.reasoning("x") == b"" and encoder.tool_call(0, "i", "n", "{}") == b""
    chunk = json.loads(encoder.content("Hé")[6:])
    assert chunk == {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
                     "choices": [{"text": "Hé", "index": 0, "logprobs": None, "finish_reason": None}]}
    assert json.loads(encoder.finish("length")[6:])["choices"][0] == {"text": "", "index": 0, "logprobs": None,
                                                                      "finish_reason": "length"}
    usage = json.loads(encoder.usage({"prompt_tokens": 1, "completion_tokens": 1})[6:])
    assert usage["object"] == "text_completion" and usage["choices"] == [] and usage["usage"]["total_tokens"] == 2
