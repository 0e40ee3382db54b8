"""Attachments: images, documents and audio from OpenAI messages to Dify, read and checked before
anything is uploaded.

End-to-end tests go through the real proxy to the fake Dify and check what it stored and what the
chat request referenced; reading a part, finding the new turn's parts and the history's placeholders
are also tested directly.
"""

import asyncio
import base64
import json
import socket
import time

import openai
import pytest

import attachment_policy
import attachments
import content
import memory
from attachment_support import (AGENT, CHAT, GIF, JPEG, MB, PDF, WAV, WEBP, audio_part, chat, data_url, file_part,
                                file_upload, harness_with, image, nothing_sent, png, refused, user)
from apps import App
from errors import APIError


@pytest.mark.parametrize("data, ext, mime", [(png(), "png", "image/png"), (JPEG, "jpg", "image/jpeg"),
                                             (WEBP, "webp", "image/webp"), (GIF, "gif", "image/gif")],
                         ids=["png", "jpeg", "webp", "gif"])
@pytest.mark.parametrize("stream", [False, True])
def test_each_image_type_is_uploaded_as_what_its_bytes_are(harness, data, ext, mime, stream):
    # Every image is labelled image/png, as careless clients do: the bytes decide.
    answer = chat(harness, user(image(data_url(data, "image/png"))), stream=stream)
    assert answer.startswith("Echo: What is this?")
    [(upload_id, upload)] = harness.dify.uploads.items()
    assert upload.data == data and upload.mime == mime
    assert upload.filename.endswith("." + ext) and upload.filename.startswith("image-")
    [sent] = harness.chat_bodies()
    assert sent["files"] == [{"type": "image", "transfer_method": "local_file", "upload_file_id": upload_id}]
    assert upload.user == sent["user"]
    assert "base64" not in sent["query"] and sent["query"] == f"What is this?\n[image: {ext}]"


def test_a_data_url_name_becomes_the_filename_with_the_real_extension(harness):
    chat(harness, user(image(data_url(JPEG, "image/png", name="holiday%20photo.png"))))
    [upload] = harness.dify.uploads.values()
    assert upload.filename == "holiday photo.jpg" and upload.mime == "image/jpeg"


@pytest.mark.real_difies
def test_several_images_upload_concurrently_and_keep_their_order(harness):
    harness.dify.upload_rendezvous = 3
    images = [png(), JPEG, GIF]
    chat(harness, user(*(image(data_url(data)) for data in images)))
    assert harness.dify.max_concurrent_uploads == 3
    [sent] = harness.chat_bodies()
    stored = [harness.dify.uploads[f["upload_file_id"]].data for f in sent["files"]]
    assert stored == images


def test_image_only_message_still_asks_something(harness):
    chat(harness, user(image(data_url(png())), text=""))
    [sent] = harness.chat_bodies()
    assert sent["query"].strip() and "base64" not in sent["query"] and len(sent["files"]) == 1


@pytest.mark.real_difies
def test_agent_apps_get_the_attachments_too(harness):
    answer = chat(harness, user(image(data_url(png())), image("https://example.com/cat.png")), model=AGENT,
                  stream=True)
    assert answer.startswith("Echo")
    [sent] = harness.chat_bodies()
    assert [f["transfer_method"] for f in sent["files"]] == ["local_file", "remote_url"]
    assert harness.dify.uploads[sent["files"][0]["upload_file_id"]].user == sent["user"]


def test_only_the_new_turn_is_attached_and_history_holds_placeholders(harness):
    old, new = png(), JPEG
    chat(harness,
         user(image(data_url(old, name="first.png")), text="Look"),
         {"role": "assistant", "content": "A dot."},
         user(image(data_url(new)), text="And this?"))
    [sent] = harness.chat_bodies()
    [upload] = harness.dify.uploads.values()
    assert upload.data == new and len(sent["files"]) == 1
    assert "[image: first.png]" in sent["query"] and "[image: jpg]" in sent["query"]
    assert base64.b64encode(old).decode()[:12] not in sent["query"]


@pytest.mark.real_difies
def test_attachments_in_memory_mode_2(make_harness):
    harness = make_harness(env={"CONVERSATION_MEMORY_MODE": "2"})
    first = chat(harness, user(text="Hello"))
    chat(harness, user(text="Hello"), {"role": "assistant", "content": first}, user(image(data_url(GIF))))
    sent = harness.chat_bodies()[-1]
    assert sent["conversation_id"] and "Hello" not in sent["query"]
    assert [harness.dify.uploads[f["upload_file_id"]].data for f in sent["files"]] == [GIF]


def test_remote_urls_go_to_dify_and_are_never_fetched(make_harness):
    harness = make_harness(env={"ALLOW_PRIVATE_URLS": "on"})  # the trap listens on loopback
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(8)
    trap.setblocking(False)
    url = f"http://127.0.0.1:{trap.getsockname()[1]}/pics/cat.png?size=large"
    try:
        chat(harness, user(image(url), image("https://example.com/a%20dog.webp")), stream=True)
        with pytest.raises(BlockingIOError):
            trap.accept()
    finally:
        trap.close()
    [sent] = harness.chat_bodies()
    assert sent["files"] == [{"type": "image", "transfer_method": "remote_url", "url": url},
                             {"type": "image", "transfer_method": "remote_url",
                              "url": "https://example.com/a%20dog.webp"}]
    assert "[image: cat.png]" in sent["query"] and "[image: a dog.webp]" in sent["query"]
    assert not harness.dify.uploads


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/cat.png", "javascript:alert(1)",
                                 "gopher://127.0.0.1:6379/_INFO", "cat.png", "http:///nohost.png",
                                 "https://example.com/a cat.png", "http://[::1/cat.png",
                                 "https://example.com/" + "x" * 9000])
def test_other_urls_are_400_and_nothing_is_sent(harness, url):
    status, error = refused(harness, user(image(url)))
    assert status == 400 and error["code"] == "invalid_image_url" and error["param"] == "messages[0].content[1]"
    assert "http(s)" in error["message"]
    assert nothing_sent(harness)


@pytest.mark.parametrize("payload, says", [
    ("iVBORw0KGgo=AAAA", "data after its '=' padding"),
    ("iVBORw0KGgoAAA", "multiple of 4"),
    ("iVBORw0K GgoAAA=", "not standard base64"),
    ("iVBORw0K-_o=", "not standard base64"),
    ("iVBORw0KGg=A", "padding is wrong"),
])
def test_corrupt_base64_is_400(harness, payload, says):
    status, error = refused(harness, user(image(f"data:image/png;base64,{payload}")))
    assert status == 400 and error["code"] == "invalid_base64" and says in error["message"]
    assert "messages[0].content[1]" in error["message"] and nothing_sent(harness)


def test_a_data_url_that_is_not_base64_is_400(harness):
    status, error = refused(harness, user(image("data:image/svg+xml,<svg onload=alert(1)/>")))
    assert status == 400 and error["code"] == "invalid_data_url" and "base64" in error["message"]


@pytest.mark.parametrize("data, mime", [(PDF, "image/png"), (b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                                              "image/svg+xml"), (b"\x00" * 64, "image/jpeg")],
                         ids=["pdf", "svg", "zeros"])
def test_an_image_whose_bytes_are_not_an_image_is_400(harness, data, mime):
    status, error = refused(harness, user(image(data_url(data, mime))))
    assert status == 400 and error["code"] == "file_type_mismatch" and "PNG, JPEG, WEBP or GIF" in error["message"]
    assert mime in error["message"] and nothing_sent(harness)


def test_a_non_image_data_url_in_an_image_part_says_to_send_a_file(harness):
    status, error = refused(harness, user(image(data_url(PDF, "application/pdf"))))
    assert status == 400 and "'file' part" in error["message"]


def test_an_empty_image_is_400(harness):
    status, error = refused(harness, user(image("data:image/png;base64,")))
    assert status == 400 and error["code"] == "empty_file"


def test_a_file_named_pdf_holding_a_png_is_400(make_harness):
    harness = harness_with(make_harness, file_upload(allowed_file_types=["image", "document"]))
    status, error = refused(harness, user(file_part(png(), "report.pdf")))
    assert status == 400 and error["code"] == "file_type_mismatch"
    assert "'report.pdf'" in error["message"] and "PNG image" in error["message"] and nothing_sent(harness)


def test_openai_file_ids_are_400_explaining_why(harness):
    status, error = refused(harness, user({"type": "file", "file": {"file_id": "file-abc123"}}))
    assert status == 400 and error["code"] == "file_id_not_supported"
    assert "file-abc123" in error["message"] and "file_data" in error["message"]


def test_an_oversized_body_is_413_in_openai_shape(make_harness):
    harness = make_harness(env={"MAX_REQUEST_MB": "1"})
    with pytest.raises(openai.APIStatusError) as caught:
        chat(harness, user(image(data_url(png(2 * MB)))))
    assert caught.value.status_code == 413 and caught.value.code == "request_too_large"
    assert "1 MB" in caught.value.body["message"] and "MAX_REQUEST_MB" in caught.value.body["message"]
    assert nothing_sent(harness)


def test_an_oversized_body_is_refused_from_its_content_length_alone(make_harness):
    harness = make_harness(env={"MAX_REQUEST_MB": "1"})
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-key-one"
                           b"\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n")
        response = read_response(connection)
    assert response.startswith(b"HTTP/1.1 413 ")
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"


def test_an_oversized_chunked_body_is_413(make_harness):
    harness = make_harness(env={"MAX_REQUEST_MB": "1"})
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-key-one"
                           b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n" % (256 * 1024) + b" " * (256 * 1024) + b"\r\n"
        try:
            for _ in range(8):
                connection.sendall(piece)
        except ConnectionError:
            pass  # the proxy hangs up once it has answered
        response = read_response(connection)
    assert response.startswith(b"HTTP/1.1 413 ") and b"request_too_large" in response


def test_a_body_within_the_limit_still_works_in_pieces(make_harness):
    harness = make_harness(env={"MAX_REQUEST_MB": "1"})
    body = json.dumps({"model": CHAT, "messages": [user(image(data_url(png(600 * 1024))))]}).encode()
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-key-one"
                           b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(body), 100_000):
            piece = body[start:start + 100_000]
            connection.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        connection.sendall(b"0\r\n\r\n")
        response = read_response(connection)
    assert response.startswith(b"HTTP/1.1 200 ") and len(harness.dify.uploads) == 1


def test_a_client_leaving_mid_body_leaves_no_handler_waiting(harness):
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test-key-one"
                           b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"")
        assert wait_for(lambda: handlers_running(harness) == 1)
    assert wait_for(lambda: handlers_running(harness) == 0)


def read_response(connection):
    response = b""
    try:
        while chunk := connection.recv(65536):
            response += chunk
            head, _, rest = response.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(rest) >= length:
                break
    except ConnectionResetError:
        pass
    return response


def handlers_running(harness):
    def count():
        return sum(1 for task in asyncio.all_tasks() if task.get_coro().__qualname__ == "RequestHandler._execute")
    return harness.loop.call(count)


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.01)
    return condition()


def test_input_audio_goes_as_audio(make_harness):
    harness = harness_with(make_harness, file_upload(allowed_file_types=["image", "audio"]))
    chat(harness, user(audio_part(WAV)))
    [sent] = harness.chat_bodies()
    [upload] = harness.dify.uploads.values()
    assert sent["files"][0]["type"] == "audio" and upload.mime == "audio/wav" and upload.data == WAV
    assert upload.filename.endswith(".wav") and "[audio: wav]" in sent["query"]


def test_input_audio_in_the_wrong_format_is_400(make_harness):
    harness = harness_with(make_harness, file_upload(allowed_file_types=["audio"]))
    status, error = refused(harness, user(audio_part(WAV, "mp3")))
    assert status == 400 and error["code"] == "file_type_mismatch" and "input_audio.format" in error["message"]


def test_reading_a_file_part_checks_its_bytes():
    anything = attachment_policy.Policy(attachment_policy.Limits(), App("m", "m", "chat", "app-key", {}))
    text = attachments.read_part(anything, "p", file_part("naïve text\n".encode(), "notes.md", "text/markdown"))
    assert (text.kind, text.mime, text.name, text.dify_type) == ("document", "text/markdown", "notes.md", "document")
    named_by_mime = attachments.read_part(anything, "p",
                                          {"type": "file", "file": {"file_data": data_url(PDF, "application/pdf")}})
    assert named_by_mime.name.endswith(".pdf") and named_by_mime.mime == "application/pdf"
    with pytest.raises(APIError) as caught:
        attachments.read_part(anything, "p", file_part("café".encode("latin-1"), "notes.txt", "text/plain"))
    assert caught.value.code == "file_type_mismatch" and "not UTF-8 text" in caught.value.message
    with pytest.raises(APIError) as caught:
        attachments.read_part(anything, "p", file_part(b"MZ\x90\x00", "setup.exe", "application/octet-stream"))
    assert caught.value.code == "unsupported_file_type" and "pdf" in caught.value.message
    image_by_name = attachments.read_part(anything, "p", file_part(png(), "diagram.jpeg", "image/jpeg"))
    assert (image_by_name.kind, image_by_name.name) == ("image", "diagram.png")


def test_attachment_parts_are_those_of_the_new_turn_with_their_place():
    messages = [{"role": "system", "content": "s"},
                user(image("https://a/1.png")),
                {"role": "assistant", "content": "ok"},
                {"role": "tool", "tool_call_id": "t", "content": "r"},
                user(image("https://a/2.png"), audio_part(WAV), text="x"),
                user(file_part(PDF, "a.pdf"), text="")]
    assert memory.new_turn_start(messages) == 3
    assert [where for where, _ in attachments.attachment_parts(messages, memory.new_turn_start(messages))] == [
        "messages[4].content[1]", "messages[4].content[2]", "messages[5].content[0]"]
    assert memory.new_turn_start(messages[:3]) == 3 and attachments.attachment_parts(messages[:3], 3) == []


def test_history_placeholders_never_carry_data():
    assert content.part_text(image(data_url(png()))) == "[image: png]"
    assert content.part_text(image(data_url(JPEG, "image/png", name="me.jpg"))) == "[image: me.jpg]"
    assert content.part_text(image("data:image/png;base64,!!!!")) == "[image]"
    assert content.part_text(image("https://x.example/p/ca%20t.gif?x=1")) == "[image: ca t.gif]"
    assert content.part_text(file_part(PDF, "../secret/a.pdf")) == "[file: a.pdf]"
    assert content.part_text(image("https://x.example/")) == "[image]"
    assert content.part_text(image("http://[::1/cat.png")) == "[image]"
