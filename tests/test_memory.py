"""memory.py: how a message list becomes the one query Dify takes (mode 1's fold)."""

import memory
from content import content_text


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
