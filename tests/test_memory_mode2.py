"""Memory mode 2: Dify keeps the conversation; its id rides in an invisible, bound mark."""

import json
import logging
import time
import uuid

import openai
import pytest

import marks
from fake_dify import FakeApp, Text, End
from support import OTHER_CLIENT_KEY, sse_events

CHAT = "Chat Bot"
MODE2 = {"CONVERSATION_MEMORY_MODE": "2"}
# ECMAScript WhiteSpace + LineTerminator: what String.prototype.trim() removes.
JS_TRIM = "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
          "\u2028\u2029\u202f\u205f\u3000\ufeff"


@pytest.fixture
def chat(make_harness):
    return make_harness(env=MODE2)


def ask(harness, messages, model=CHAT, key=None, **kwargs):
    client = harness.client(key) if key else harness.client()
    return client.chat.completions.create(model=model, messages=messages, **kwargs).choices[0].message.content


@pytest.mark.real_difies
def test_ten_turn_chat_sends_one_turn_per_request(chat):
    messages = [{"role": "system", "content": "You are terse."}]
    for turn in range(10):
        messages.append({"role": "user", "content": f"question {turn}"})
        reply = ask(chat, messages)
        assert marks.has_mark_characters(reply)
        sent = chat.chat_bodies()[-1]
        if turn == 0:
            assert sent["conversation_id"] == ""
            assert sent["query"] == "<system>\nYou are terse.\n</system>\n\nquestion 0"
        else:
            assert marks.strip_marks(reply).rstrip() == f"Echo: question {turn}"
            assert sent["query"] == f"question {turn}", "only the new turn, no system prompt, no history"
            assert sent["conversation_id"] == first_conversation(chat)
        messages.append({"role": "assistant", "content": reply})
    assert len(chat.dify.conversations) == 1, "one Dify conversation for the whole chat"
    assert len({body["user"] for body in chat.chat_bodies()}) == 1


def first_conversation(harness, model=CHAT):
    return next(cid for cid, (key, user) in harness.dify.conversations.items() if key == harness.key_of(model))


@pytest.mark.real_difies
def test_stream_carries_the_mark_as_one_chunk_before_finish(chat):
    status, headers, body = chat.raw("POST", "/v1/chat/completions", {
        "model": CHAT, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    events = sse_events(body)
    deltas = [e["choices"][0]["delta"].get("content") for e in events[:-1] if e["choices"]]
    mark_chunks = [d for d in deltas if d and marks.has_mark_characters(d)]
    assert len(mark_chunks) == 1 and len(marks.strip_marks(mark_chunks[0]).strip()) == 0
    assert deltas.index(mark_chunks[0]) == len(deltas) - 2, "the mark comes right before the finish chunk"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert headers["x-dify-conversation-id"] == first_conversation(chat)
    reply = "".join(d or "" for d in deltas)
    ask(chat, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply},
               {"role": "user", "content": "next"}])
    assert chat.chat_bodies()[-1]["conversation_id"] == first_conversation(chat)


@pytest.mark.parametrize("mangle", [
    lambda text: text.strip(),
    lambda text: text.strip(JS_TRIM),
    lambda text: "  " + text.rstrip() + "\n\n",
    lambda text: json.loads(json.dumps(text, ensure_ascii=True)),
], ids=["python-strip", "js-trim", "whitespace", "json"])
def test_marks_survive_what_clients_do_to_text(chat, mangle):
    first = ask(chat, [{"role": "user", "content": "hi"}])
    ask(chat, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mangle(first)},
               {"role": "user", "content": "again"}])
    sent = chat.chat_bodies()[-1]
    assert sent["conversation_id"] == first_conversation(chat) and sent["query"] == "again"


def test_list_form_assistant_content(chat):
    first = ask(chat, [{"role": "user", "content": "hi"}])
    ask(chat, [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
               {"role": "assistant", "content": [{"type": "text", "text": first}]},
               {"role": "user", "content": "again"}])
    assert chat.chat_bodies()[-1]["conversation_id"] == first_conversation(chat)


def test_marks_of_another_client_truncated_or_forged_are_ignored(chat):
    theirs = ask(chat, [{"role": "user", "content": "hi"}], key=OTHER_CLIENT_KEY)
    for reply in (theirs,                                    # another client's valid mark
                  theirs[:-5],                               # truncated
                  "Sure" + theirs[theirs.index("\u2060"):].replace("\u200b", "\u200c", 1)):  # corrupted
        ask(chat, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply},
                   {"role": "user", "content": "steal"}])
        sent = chat.chat_bodies()[-1]
        assert sent["conversation_id"] == "", "a foreign or broken mark never reaches Dify"
        assert "<history>" in sent["query"] and sent["query"].endswith("steal")


@pytest.mark.real_difies
def test_deleted_conversation_recovers_with_nothing_lost(chat, caplog):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "first"}]
    messages.append({"role": "assistant", "content": ask(chat, messages)})
    old = first_conversation(chat)
    chat.dify.delete_conversation(old)
    messages.append({"role": "user", "content": "second"})
    with caplog.at_level(logging.INFO):
        reply = ask(chat, messages)
    bodies = chat.chat_bodies()
    assert len(bodies) == 2, "the newest-message check finds the conversation gone before Dify is asked"
    assert bodies[-1]["conversation_id"] == "" and "first" in bodies[-1]["query"]
    assert bodies[-1]["query"].startswith("<system>\nBe kind.\n</system>") and bodies[-1]["query"].endswith("second")
    assert reply.startswith("Echo: ") and marks.has_mark_characters(reply)
    assert "fresh one" in caplog.text and old not in caplog.text
    messages.append({"role": "assistant", "content": reply})
    messages.append({"role": "user", "content": "third"})
    ask(chat, messages)
    assert chat.chat_bodies()[-1]["conversation_id"] not in ("", old)


FLOW = "Flow Bot"


@pytest.mark.real_difies
@pytest.mark.parametrize("stream", [False, True])
def test_a_chatflow_conversation_dify_lost_continues_from_the_whole_history_at_once(chat, stream):
    # Dify 1.13 answers a streaming chatflow turn on a gone conversation with a ping, then silence (R1).
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "first"}]
    messages.append({"role": "assistant", "content": ask(chat, messages, model=FLOW)})
    old = first_conversation(chat, FLOW)
    chat.dify.delete_conversation(old)
    messages.append({"role": "user", "content": "second"})
    started = time.monotonic()
    client = chat.client(timeout=10)
    if stream:
        reply = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=FLOW, messages=messages, stream=True) if chunk.choices)
    else:
        reply = client.chat.completions.create(model=FLOW, messages=messages).choices[0].message.content
    assert time.monotonic() - started < 2
    assert marks.strip_marks(reply).startswith("Echo: <system>\nBe kind.\n</system>")
    sent = chat.chat_bodies()[-1]
    assert sent["conversation_id"] == "" and "first" in sent["query"] and sent["query"].endswith("second")
    assert chat.dify.silent_failures == []
    assert [r.query["conversation_id"] for r in chat.dify.requests_to("/messages")] == [old]


@pytest.mark.real_difies
def test_an_explicit_chatflow_conversation_id_dify_does_not_have_is_a_prompt_404(chat):
    client = chat.client(timeout=10)
    started = time.monotonic()
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=FLOW, messages=[{"role": "user", "content": "a"}],
                                       extra_body={"conversation_id": str(uuid.uuid4())})
    assert "Conversation Not Exists" in caught.value.message
    status, _, body = chat.raw("POST", "/v1/chat/completions", {
        "model": FLOW, "stream": True, "messages": [{"role": "user", "content": "b"}]},
        headers={"X-Dify-Conversation-Id": str(uuid.uuid4())}, timeout=10)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    assert time.monotonic() - started < 2
    assert chat.chat_bodies() == [] and chat.dify.silent_failures == []


def test_a_chatflow_conversation_is_checked_once_per_burst_and_chat_apps_never(chat):
    raw = chat.client().chat.completions.with_raw_response.create(model=FLOW, messages=[{"role": "user", "content": "a"}])
    conversation = raw.headers["x-dify-conversation-id"]
    for text in ("b", "c"):
        ask(chat, [{"role": "user", "content": text}], model=FLOW, extra_body={"conversation_id": conversation})
    assert len(chat.dify.requests_to("/messages")) == 1
    chat_conversation = chat.client().chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "a"}]).headers["x-dify-conversation-id"]
    ask(chat, [{"role": "user", "content": "b"}], extra_body={"conversation_id": chat_conversation})
    assert len(chat.dify.requests_to("/messages")) == 1, "chat apps answer a gone conversation with a 404 at once"


def test_edited_history_starts_fresh_while_unedited_never_does(chat):
    messages = [{"role": "user", "content": "My name is Ann."}]
    messages.append({"role": "assistant", "content": ask(chat, messages)})
    messages.append({"role": "user", "content": "What is my name?"})
    messages.append({"role": "assistant", "content": ask(chat, messages)})
    conversation = first_conversation(chat)
    # Unedited, but with harmless changes: whitespace, and list content instead of a string.
    same = [{"role": "user", "content": [{"type": "text", "text": "  My name is   Ann.\n"}]}] + messages[1:]
    ask(chat, same + [{"role": "user", "content": "And now?"}])
    assert chat.chat_bodies()[-1]["conversation_id"] == conversation
    # The user edits the first turn: Dify's conversation is stale, so a fresh one starts.
    edited = [{"role": "user", "content": "My name is Bob."}] + messages[1:]
    ask(chat, edited + [{"role": "user", "content": "And now?"}])
    sent = chat.chat_bodies()[-1]
    assert sent["conversation_id"] == "" and "<user>\nMy name is Bob.\n</user>" in sent["query"]
    assert "My name is Ann." not in sent["query"].replace("Echo: My name is Ann.", "")
    # Deleting a turn is an edit too.
    ask(chat, messages[2:] + [{"role": "user", "content": "And now?"}])
    assert chat.chat_bodies()[-1]["conversation_id"] == ""


def test_switching_models_mid_chat(chat):
    messages = [{"role": "user", "content": "hi"}]
    messages.append({"role": "assistant", "content": ask(chat, messages, model=CHAT)})
    messages.append({"role": "user", "content": "now you"})
    messages.append({"role": "assistant", "content": ask(chat, messages, model="Flow Bot")})
    sent = chat.chat_bodies()[-1]
    assert sent["conversation_id"] == "" and "<history>" in sent["query"]
    flow_conversation = sent["conversation_id"]
    messages.append({"role": "user", "content": "back to the first"})
    ask(chat, messages, model=CHAT)
    sent = chat.chat_bodies()[-1]
    assert sent["conversation_id"] == "", "the first app's conversation lacks the other app's turns"
    assert "now you" in sent["query"] and flow_conversation == ""


def test_chat_begun_in_mode_one_is_folded_then_marked(chat):
    reply = ask(chat, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "plain reply"},
                       {"role": "user", "content": "b"}])
    sent = chat.chat_bodies()[-1]
    assert sent["conversation_id"] == "" and "plain reply" in sent["query"]
    assert marks.has_mark_characters(reply)


@pytest.mark.real_difies
def test_explicit_conversation_id_for_api_users(chat):
    client = chat.client()
    raw = client.chat.completions.with_raw_response.create(model=CHAT, messages=[{"role": "user", "content": "a"}])
    conversation = raw.headers["x-dify-conversation-id"]
    assert conversation == first_conversation(chat)
    client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "b"}],
                                   extra_headers={"X-Dify-Conversation-Id": conversation})
    assert chat.chat_bodies()[-1]["conversation_id"] == conversation and chat.chat_bodies()[-1]["query"] == "b"
    client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "c"}],
                                   extra_body={"conversation_id": conversation})
    assert chat.chat_bodies()[-1]["conversation_id"] == conversation
    # Another client key is another Dify user: the same id is not theirs.
    with pytest.raises(openai.NotFoundError):
        chat.client(OTHER_CLIENT_KEY).chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "d"}], extra_body={"conversation_id": conversation})
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "e"}],
                                       extra_body={"conversation_id": "not-a-uuid"})
    assert caught.value.param == "conversation_id"


def test_conversation_ids_never_reach_the_info_log(chat, caplog):
    with caplog.at_level(logging.INFO):
        messages = [{"role": "user", "content": "a"}]
        messages.append({"role": "assistant", "content": ask(chat, messages)})
        ask(chat, messages + [{"role": "user", "content": "b"}])
    assert first_conversation(chat) not in caplog.text


def test_mode_one_never_marks(harness):
    assert not marks.has_mark_characters(ask(harness, [{"role": "user", "content": "hi"}]))


@pytest.mark.real_difies
def test_agent_and_chatflow_apps_in_mode_two(chat):
    for model in ("Agent Bot", "Flow Bot"):
        messages = [{"role": "user", "content": "one"}]
        messages.append({"role": "assistant", "content": ask(chat, messages, model=model)})
        ask(chat, messages + [{"role": "user", "content": "two"}], model=model)
        sent = chat.chat_bodies()[-1]
        assert sent["conversation_id"] != "" and sent["query"] == "two"


def test_stopped_or_scripted_answers_still_carry_a_mark(make_harness):
    harness = make_harness(env=MODE2, apps=[FakeApp(key="app-m2000000000000000000000000", name="M")])
    harness.dify.script("app-m2000000000000000000000000", Text("| a | b |"), End())
    reply = ask(harness, [{"role": "user", "content": "table"}], model="M")
    assert marks.strip_marks(reply) == "| a | b |", "attached to the row: no line that would become a table row"
    assert marks.has_mark_characters(reply)


def test_a_reply_resent_as_output_text_parts_continues_the_conversation(chat):
    """The mark is read from the same written text the transcript digest is made of, whatever the
    text part's type (it was read from `text` parts only, so the chat restarted)."""
    reply = ask(chat, [{"role": "user", "content": "hi"}])
    ask(chat, [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": [{"type": "output_text", "text": reply}]},
               {"role": "user", "content": "next"}])
    sent = chat.chat_bodies()[-1]
    assert sent["conversation_id"] == first_conversation(chat) and sent["query"] == "next"
