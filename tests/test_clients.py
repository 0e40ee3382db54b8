"""Real clients (issue 13): Open WebUI's captured requests replayed, tools, tasks, regenerate, structured output."""

import json
import os

import pytest

from dify_client import DifyClient

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
