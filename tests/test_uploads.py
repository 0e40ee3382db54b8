"""Uploads: each file uploaded once per app, Dify user and content; Dify refusing or losing an upload."""

import time

import openai
import pytest

import uploads
from attachment_support import FLOW, JPEG, chat, data_url, image, png, user
from support import OTHER_CLIENT_KEY


@pytest.mark.real_difies
def test_a_resent_image_is_not_uploaded_again_but_another_client_gets_its_own(harness):
    conversation = [user(image(data_url(png())))]
    chat(harness, *conversation)
    chat(harness, *conversation, stream=True)
    first, second = harness.chat_bodies()
    assert len(harness.dify.uploads) == 1 and first["files"] == second["files"]
    chat(harness, *conversation, key=OTHER_CLIENT_KEY)
    assert len(harness.dify.uploads) == 2
    other = harness.chat_bodies()[-1]
    assert harness.dify.uploads[other["files"][0]["upload_file_id"]].user == other["user"] != first["user"]


def test_the_cache_can_be_turned_off(make_harness):
    harness = make_harness(env={"UPLOAD_CACHE_SIZE": "0"})
    chat(harness, user(image(data_url(png()))))
    chat(harness, user(image(data_url(png()))))
    assert len(harness.dify.uploads) == 2


def test_the_same_image_twice_in_one_message_is_uploaded_once(harness):
    chat(harness, user(image(data_url(png())), image(data_url(png()))))
    [sent] = harness.chat_bodies()
    assert len(harness.dify.uploads) == 1 and sent["files"][0] == sent["files"][1]


@pytest.mark.parametrize("status, code, expected", [(413, "file_too_large", 413), (415, "unsupported_file_type", 415),
                                                    (400, "file_extension_blocked", 400)])
def test_dify_upload_failures_name_the_file(harness, status, code, expected):
    harness.dify.upload_error = (status, code, "Dify says no.")
    with pytest.raises(openai.APIStatusError) as caught:
        chat(harness, user(image(data_url(JPEG, name="scan.jpg"))), stream=True)
    assert caught.value.status_code == expected and caught.value.code == code
    assert "'scan.jpg'" in caught.value.body["message"] and "Dify says no." in caught.value.body["message"]
    assert not harness.dify.requests_to("/chat-messages")
    harness.dify.upload_error = None
    assert chat(harness, user(image(data_url(JPEG, name="scan.jpg")))).startswith("Echo"), "failures are not cached"


@pytest.mark.real_difies
def test_an_upload_dify_lost_is_sent_again_once(harness):
    message = user(image(data_url(png())))
    chat(harness, message)
    assert len(harness.dify.uploads) == 1
    harness.dify.uploads.clear()
    answer = chat(harness, message)
    assert answer.startswith("Echo: ")
    assert len(harness.dify.uploads) == 1, "uploaded again after Dify refused the cached id"
    bodies = harness.chat_bodies()
    assert bodies[-1]["files"][0]["upload_file_id"] in harness.dify.uploads
    assert bodies[-2]["files"][0]["upload_file_id"] not in harness.dify.uploads


@pytest.mark.real_difies
def test_a_chatflow_whose_upload_dify_lost_gets_the_file_again_at_once(harness):
    # Dify 1.13 meets an unknown upload id in a streaming chatflow with a ping, then silence (R1/R19).
    message = user(image(data_url(png())))
    client = harness.client(timeout=10)
    client.chat.completions.create(model=FLOW, messages=[message])
    harness.dify.uploads.clear()
    started = time.monotonic()
    answer = client.chat.completions.create(model=FLOW, messages=[message]).choices[0].message.content
    assert answer.startswith("Echo: ") and time.monotonic() - started < 2
    assert harness.chat_bodies()[-1]["files"][0]["upload_file_id"] in harness.dify.uploads
    assert harness.dify.silent_failures == []


def test_upload_cache_is_bounded_and_expires():
    now = [0.0]
    cache = uploads.UploadCache(size=2, ttl=10, clock=lambda: now[0])
    cache.put("a", "1")
    cache.put("b", "2")
    assert cache.get("a") == "1"
    cache.put("c", "3")
    assert cache.get("b") is None and cache.get("a") == "1" and cache.get("c") == "3", "least recently used goes"
    now[0] = 9.9
    assert cache.get("a") == "1"
    now[0] = 10.0
    assert cache.get("a") is None and cache.get("c") is None, "expired"
    uploads.UploadCache(size=0).put("x", "y")
