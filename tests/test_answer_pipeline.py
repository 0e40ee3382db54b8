"""The answer pipeline (answer_pipeline.py): Dify events in, answer pieces out, through the translator,
the tool-call parser, the JSON hold and mode 2's reply mark. Edge cases are cheaper here than through
the server; the server tests (test_tool_loop, test_memory_mode2, test_app_modes) cover the same path end to end."""

import pytest

from answer_pipeline import AnswerPipeline, ReplyMark
from dify_events import translator_for
from errors import APIError
from pieces import CONTENT, MARK, REASONING, TOOL_CALL
from tool_request import tool_request

CONVERSATION = "1b6e6a49-5d4c-4b7a-9d57-1f0c0a0c2e11"
WRITE = {"type": "function", "function": {"name": "write", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}}}}}


def text(answer):
    return {"event": "message", "answer": answer, "conversation_id": CONVERSATION, "message_id": "m-1"}


END = {"event": "message_end", "conversation_id": CONVERSATION, "message_id": "m-1", "metadata": {}}


def pipeline(**stages):
    return AnswerPipeline(translator_for("chat", "Bot"), **stages)


def contents(pieces):
    return "".join(value for kind, value in pieces if kind in (CONTENT, MARK))


def test_text_passes_as_it_comes_and_its_length_counts_a_replace_restarting_it():
    answer = pipeline()
    assert answer.feed([text("Hello"), text(", world")]) == [(CONTENT, "Hello"), (CONTENT, ", world")]
    assert answer.answer_length == 12
    answer.feed([{"event": "message_replace", "answer": "Moderated."}])
    assert answer.answer_length == 10
    assert answer.feed([END]) == [] and answer.translator.done


def test_an_error_after_text_in_one_batch_comes_after_that_text():
    error = {"event": "error", "status": 500, "code": "internal", "message": "boom"}
    answer = pipeline()
    assert answer.feed([text("partial"), error]) == [(CONTENT, "partial")]
    assert isinstance(answer.pending_error, APIError)
    with pytest.raises(APIError):
        pipeline().feed([error])


def test_tool_calls_come_out_as_calls_never_as_text_and_end_the_answer_in_calls():
    answer = pipeline(tool_request=tool_request({"tools": [WRITE]}))
    pieces = answer.feed([text("Writing.\n<tool_call>\n"), text('{"name": "write", "arguments": {"text": "hi"}}\n')])
    pieces += answer.feed([text("</tool_call>"), END])
    calls = [value for kind, value in pieces if kind is TOOL_CALL]
    assert contents(pieces) == "Writing.\n" and [(c["name"], c["arguments"]) for c in calls] == [
        ("write", '{"text":"hi"}')]
    assert answer.called_tools and "legacy" not in calls[0]


def test_a_legacy_functions_request_gets_its_call_flagged_legacy():
    answer = pipeline(tool_request=tool_request({"functions": [WRITE["function"]]}))
    pieces = answer.feed([text('<tool_call>\n{"name": "write", "arguments": {}}\n</tool_call>'), END])
    assert [value["legacy"] for kind, value in pieces if kind is TOOL_CALL] == [True]


def test_a_json_reply_is_held_whole_and_repaired_while_reasoning_passes():
    answer = pipeline(structured=True)
    assert answer.feed([text("<think>hmm</think>Here: ```json\n{\"a\": 1,")]) == [(REASONING, "hmm")]
    assert answer.feed([text("}\n```"), END]) == [(CONTENT, '{"a": 1}')]


def marked(streamed=True, conversation=True):
    seen = []

    def mark_for(reply, calls):
        seen.append((reply, calls))
        return "[mark]" if conversation else None

    return pipeline(reply_mark=ReplyMark(mark_for, streamed)), seen


def test_mode_2_holds_trailing_whitespace_and_ends_the_reply_with_the_mark_before_it():
    answer, seen = marked()
    assert answer.feed([text("Hi there. \n")]) == [(CONTENT, "Hi there.")]
    assert answer.feed([text(" More.\n\n"), END]) == [(CONTENT, " \n More."), (MARK, "[mark]\n\n")]
    assert seen == [("Hi there. \n More.\n\n", [])]


def test_a_reply_ending_in_a_code_fence_gets_the_mark_on_a_line_of_its_own():
    answer, _ = marked()
    assert answer.feed([text("```\ncode\n```"), END])[-1] == (MARK, "\n[mark]")


def test_without_a_conversation_the_held_whitespace_still_ends_the_reply():
    answer, _ = marked(conversation=False)
    assert contents(answer.feed([text("Hi. \n"), END])) == "Hi. \n"


def test_the_mark_binds_the_reply_as_the_client_shows_a_replace_and_the_calls_made():
    answer, seen = marked(streamed=True)
    answer.feed([text("Draft"), {"event": "message_replace", "answer": "Moderated."}, END])
    assert seen[-1][0] == "Draft\n\nModerated."
    answer, seen = marked(streamed=False)
    answer.feed([text("Draft"), {"event": "message_replace", "answer": "Moderated."}, END])
    assert seen[-1][0] == "Moderated."
    answer = AnswerPipeline(translator_for("chat", "Bot"), tool_request({"tools": [WRITE]}),
                            reply_mark=ReplyMark(lambda reply, calls: seen.append((reply, calls)) or "[m]", True))
    answer.feed([text('<tool_call>\n{"name": "write", "arguments": {}}\n</tool_call>'), END])
    assert [call["name"] for call in seen[-1][1]] == ["write"]
