"""content.py: the one rule for message content as text, with and without placeholders."""

import tasks
from content import content_text, part_text
from responses_request import call_output, message_item

IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/pics/cat.jpg"}}
PARTS = [{"type": "text", "text": "Look:"}, IMAGE, {"type": "text", "text": ""},
         {"type": "input_text", "text": "in"}, {"type": "output_text", "text": "out"},
         {"type": "refusal", "refusal": "no"}, {"type": "input_json", "json": {"a": 1}},
         {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBER"}}]


def test_placeholders_name_what_is_not_text():
    assert content_text(PARTS) == "Look:\n[image: cat.jpg]\nin\nout\nno\n[input_json]\n[file: a.pdf]"
    assert part_text(IMAGE) == "[image: cat.jpg]"


def test_written_text_is_only_what_was_written():
    assert content_text(PARTS, placeholders=False) == "Look:\nin\nout\nno"
    assert part_text(IMAGE, placeholders=False) == ""


def test_strings_and_null():
    for placeholders in (True, False):
        assert content_text("a\n\nb", placeholders) == "a\n\nb"
        assert content_text(None, placeholders) == ""
        assert content_text([], placeholders) == ""


def test_a_local_title_is_made_of_written_words_not_placeholders():
    messages = [{"role": "user", "content": [IMAGE, {"type": "text", "text": "Plan a trip to Lisbon"}]}]
    assert tasks.local_answer("plain_title", messages) == "Plan a trip to Lisbon"


def test_responses_input_text_follows_the_same_rule():
    """A Responses assistant item or tool output becomes chat text by the same rule (empty parts left
    out, as when the same parts come through the chat API)."""
    parts = [{"type": "output_text", "text": "a"}, {"type": "output_text", "text": ""},
             {"type": "output_text", "text": "b"}]
    assert message_item("input[0]", {"role": "assistant", "content": parts})["content"] == "a\nb"
    output = call_output("input[1]", {"type": "function_call_output", "call_id": "call_1", "output": parts})
    assert output["content"] == "a\nb" == content_text(parts)
