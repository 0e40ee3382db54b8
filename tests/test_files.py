"""Attachments: images, documents and audio from OpenAI messages to Dify, checked before anything is uploaded.

End-to-end tests go through the real proxy to the fake Dify and check what it stored and
what the chat request referenced; the pure pieces (sniffing, strict base64, data URLs,
the app's rules, the cache) are tested directly below.
"""

import asyncio
import base64
import json
import socket
import struct
import time
import zlib

import openai
import pytest

import attachment_policy
import attachments
import content
import data_urls
import file_formats
import memory
import uploads
from apps import App
from config import ConfigError, settings_from
from errors import APIError
from fake_dify import FakeApp, default_parameters
from support import OTHER_CLIENT_KEY

CHAT = "Chat Bot"
AGENT = "Agent Bot"
FLOW = "Flow Bot"
MB = 1024 * 1024


# --- real bytes of each type ------------------------------------------------------------------

def png(padding=0):
    """A valid 1x1 PNG, optionally with an ancillary chunk of `padding` bytes to make it big."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    extra = chunk(b"zzZz", bytes(padding)) if padding else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)) + extra
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


JPEG = (b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        + b"\xff\xd9")
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
WEBP = base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==")
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
WAV = b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 8000, 1, 8) \
    + b"data" + struct.pack("<I", 0)
DOCX = b"PK\x03\x04" + bytes(26) + b"[Content_Types].xml"


def data_url(data, mime="image/png", name=""):
    name_param = f";name={name}" if name else ""
    return f"data:{mime}{name_param};base64,{base64.b64encode(data).decode()}"


def image(url):
    return {"type": "image_url", "image_url": {"url": url}}


def file_part(data, filename, mime="application/pdf"):
    return {"type": "file", "file": {"filename": filename, "file_data": data_url(data, mime)}}


def audio_part(data, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def user(*parts, text="What is this?"):
    return {"role": "user", "content": ([{"type": "text", "text": text}] if text else []) + list(parts)}


def chat(harness, *messages, model=CHAT, key=None, stream=False, **options):
    client = harness.client(key) if key else harness.client()
    if stream:
        chunks = list(client.chat.completions.create(model=model, messages=list(messages), stream=True, **options))
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return client.chat.completions.create(model=model, messages=list(messages), **options).choices[0].message.content


def refused(harness, *messages, model=CHAT):
    """(status, error body) of a request the proxy should refuse."""
    status, headers, body = harness.raw("POST", "/v1/chat/completions", {"model": model, "messages": list(messages)})
    assert headers["content-type"].startswith("application/json")
    return status, json.loads(body)["error"]


def nothing_sent(harness):
    return not harness.dify.uploads and not harness.dify.requests_to("/chat-messages")


def file_upload(**changes):
    """/parameters of a chat app whose file upload settings are changed as given."""
    parameters = default_parameters("chat")
    parameters["file_upload"].update(changes)
    return parameters


def harness_with(make_harness, parameters, mode="chat", env=None):
    return make_harness(apps=[FakeApp(key="app-files000000000000000000000", name=CHAT, mode=mode,
                                      parameters=parameters)], env=env)


# --- images reach Dify with their real type ---------------------------------------------------

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


# --- remote URLs ------------------------------------------------------------------------------

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


# --- bad data ---------------------------------------------------------------------------------

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


# --- limits -----------------------------------------------------------------------------------

def test_an_image_over_max_image_mb_is_413_naming_the_limit(make_harness):
    harness = make_harness(env={"MAX_IMAGE_MB": "1"})
    status, error = refused(harness, user(image(data_url(png(MB)))))
    assert status == 413 and error["code"] == "file_too_large" and error["param"] == "messages[0].content[1]"
    assert "MAX_IMAGE_MB" in error["message"] and "1 MB" in error["message"] and nothing_sent(harness)
    assert chat(harness, user(image(data_url(png(MB - 1000))))).startswith("Echo")


def test_size_is_judged_before_decoding(make_harness):
    harness = make_harness(env={"MAX_IMAGE_MB": "1"})
    not_even_base64 = "!" * (2 * MB)
    status, error = refused(harness, user(image(f"data:image/png;base64,{not_even_base64}")))
    assert status == 413 and error["code"] == "file_too_large"


def test_the_apps_own_smaller_limit_applies(make_harness):
    parameters = default_parameters("chat")
    parameters["system_parameters"]["image_file_size_limit"] = 1
    harness = harness_with(make_harness, parameters)
    status, error = refused(harness, user(image(data_url(png(MB)))))
    assert status == 413 and "Dify app's upload limit" in error["message"]


def test_too_many_files_for_the_server(make_harness):
    harness = make_harness(env={"MAX_FILES": "2"})
    status, error = refused(harness, user(*(image(data_url(png())) for _ in range(3))))
    assert status == 400 and error["code"] == "too_many_files" and "MAX_FILES" in error["message"]
    assert error["param"] == "messages[0].content[3]" and nothing_sent(harness)


def test_too_many_files_for_the_app(harness):
    status, error = refused(harness, user(*(image(f"https://example.com/{n}.png") for n in range(4))))
    assert status == 400 and error["code"] == "too_many_files" and "at most 3" in error["message"]


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


# --- what the app accepts ---------------------------------------------------------------------

def test_uploads_disabled_on_the_app_is_400(make_harness):
    harness = harness_with(make_harness, file_upload(enabled=False))
    status, error = refused(harness, user(image("https://example.com/cat.png")))
    assert status == 400 and error["code"] == "file_uploads_disabled"
    assert "enable file upload" in error["message"] and nothing_sent(harness)


def test_an_app_without_file_settings_takes_no_files(make_harness):
    parameters = default_parameters("chat")
    parameters["file_upload"] = {"image": {"enabled": False, "number_limits": 3, "detail": "high",
                                           "transfer_methods": ["remote_url", "local_file"]}}
    harness = harness_with(make_harness, parameters)
    status, error = refused(harness, user(image(data_url(png()))))
    assert status == 400 and error["code"] == "file_uploads_disabled"


def test_a_type_the_app_does_not_allow_is_400(harness):
    status, error = refused(harness, user(file_part(PDF, "report.pdf")))
    assert status == 400 and error["code"] == "file_type_not_allowed"
    assert "'report.pdf'" in error["message"] and "only image" in error["message"] and nothing_sent(harness)


def test_a_method_the_app_does_not_allow_is_400(make_harness):
    harness = harness_with(make_harness, file_upload(allowed_file_upload_methods=["local_file"]))
    status, error = refused(harness, user(image("https://example.com/cat.png")))
    assert status == 400 and error["code"] == "upload_method_not_allowed" and "base64" in error["message"]


def test_documents_go_as_documents_when_the_app_allows_them(make_harness):
    harness = harness_with(make_harness, file_upload(allowed_file_types=["image", "document"]))
    chat(harness, user(file_part(PDF, "Q3 report.pdf"), file_part(DOCX, "notes.docx", "application/octet-stream")))
    [sent] = harness.chat_bodies()
    assert [f["type"] for f in sent["files"]] == ["document", "document"]
    uploads = [harness.dify.uploads[f["upload_file_id"]] for f in sent["files"]]
    assert [(u.filename, u.mime, u.data) for u in uploads] == [
        ("Q3 report.pdf", "application/pdf", PDF),
        ("notes.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document", DOCX)]
    assert "[file: Q3 report.pdf]" in sent["query"]


def test_documents_over_max_file_mb_are_413(make_harness):
    harness = harness_with(make_harness, file_upload(allowed_file_types=["document"]), env={"MAX_FILE_MB": "1"})
    status, error = refused(harness, user(file_part(PDF + bytes(MB), "big.pdf")))
    assert status == 413 and "'big.pdf'" in error["message"] and "MAX_FILE_MB" in error["message"]


def test_a_custom_extension_the_app_lists_goes_as_custom(make_harness):
    harness = harness_with(make_harness, file_upload(allowed_file_types=["custom"],
                                                     allowed_file_extensions=[".JSONL"]))
    chat(harness, user(file_part(b'{"a": 1}\n', "rows.jsonl", "application/jsonl")))
    [sent] = harness.chat_bodies()
    [upload] = harness.dify.uploads.values()
    assert sent["files"][0]["type"] == "custom" and upload.filename == "rows.jsonl"


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


# --- the upload cache -------------------------------------------------------------------------

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


# --- Dify refusing an upload ------------------------------------------------------------------

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


# --- the pure pieces --------------------------------------------------------------------------

@pytest.mark.parametrize("data, ext", [(png(), "png"), (JPEG, "jpg"), (WEBP, "webp"), (GIF, "gif"),
                                       (b"GIF87a" + GIF[6:], "gif")], ids=["png", "jpeg", "webp", "gif89a", "gif87a"])
def test_sniff_image(data, ext):
    assert file_formats.sniff_image(data).ext == ext


@pytest.mark.parametrize("data", [b"", PDF, WAV, b"RIFF\0\0\0\0WEBX", b"\x89PNG\r\n", b"<svg/>", b"BM\0\0"],
                         ids=["empty", "pdf", "wav", "riff", "png-cut", "svg", "bmp"])
def test_sniff_image_refuses_what_is_not_a_supported_image(data):
    assert file_formats.sniff_image(data) is None


def test_strict_base64():
    assert data_urls.decode_base64("QUJD") == b"ABC" and data_urls.decode_base64("QQ==") == b"A"
    for bad in ("QQ", "QQ=", "Q Q==", "QUJD\n", "-_8=", "QQ==QQ==", "=QQ=", "é===", "QU\u00a0D"):
        with pytest.raises(ValueError):
            data_urls.decode_base64(bad)


@pytest.mark.parametrize("payload", ["", "QQ==", "QUI=", "QUJD", "QUJDRA==", base64.b64encode(bytes(1000)).decode()])
def test_decoded_size_is_exact_before_decoding(payload):
    assert data_urls.decoded_size(payload) == len(base64.b64decode(payload))
    assert data_urls.decoded_size("data:;base64," + payload, 13) == len(base64.b64decode(payload))


def test_large_base64_decodes_in_pieces_and_padding_mid_way_is_refused():
    data = bytes(range(256)) * 4000
    text = base64.b64encode(data).decode()
    assert len(text) > 2 * data_urls._DECODE_CHUNK and data_urls.decode_base64(text) == data
    with pytest.raises(ValueError, match="after its '=' padding"):
        data_urls.decode_base64(text[:data_urls._DECODE_CHUNK - 4] + "QQ==" + text[data_urls._DECODE_CHUNK:])


def test_parse_data_url():
    parsed = data_urls.parse_data_url("data:Image/PNG;name=my%20cat.png;charset=x;base64,QUJD")
    assert (parsed.mime, parsed.name, parsed.text[parsed.start:]) == ("image/png", "my cat.png", "QUJD")
    assert data_urls.decode_base64(parsed.text, parsed.start) == b"ABC"
    assert data_urls.decoded_size(parsed.text, parsed.start) == 3
    assert data_urls.parse_data_url("data:;base64,QQ==").mime == ""
    for bad in ("data:image/png,QUJD", "data:image/png;base64", "data:text/plain;charset=utf-8,hi"):
        with pytest.raises(ValueError):
            data_urls.parse_data_url(bad)


@pytest.mark.parametrize("name, safe", [("C:\\Users\\me\\photo.png", "photo.png"), ("../../etc/passwd", "passwd"),
                                        ('a:b*c?"d<e>f|g.txt', "a_b_c__d_e_f_g.txt"), ("  .hidden. ", "hidden"),
                                        ("x" * 300 + ".pdf", "x" * 116 + ".pdf"), ("tab\there.md", "tab_here.md")])
def test_safe_filename(name, safe):
    assert file_formats.safe_filename(name) == safe


def test_app_rules_read_dify_settings():
    rules = attachment_policy.app_rules(default_parameters("chat"))
    assert rules.enabled and rules.types == ("image",) and rules.number_limit == 3
    assert rules.methods == ("local_file", "remote_url") and rules.size_limit("image") == 10 * MB
    assert rules.size_limit("document") == 15 * MB and rules.size_limit("audio") == 50 * MB
    legacy = attachment_policy.app_rules({"file_upload": {"image": {"enabled": True, "number_limits": 2,
                                                        "transfer_methods": ["remote_url"]}}})
    assert legacy.enabled and legacy.types == ("image",) and legacy.methods == ("remote_url",)
    assert legacy.number_limit == 2
    assert not attachment_policy.app_rules({"opening_statement": ""}).enabled
    assert attachment_policy.app_rules({}) is None, "unknown settings: Dify decides"
    custom = attachment_policy.app_rules({"file_upload": {"enabled": True, "allowed_file_types": ["custom"],
                                              "allowed_file_extensions": [".PDF", "md"]}})
    assert custom.extensions == ("pdf", "md")


def policy(parameters=None, **limits):
    app = App("m", "m", "chat", "app-key", default_parameters("chat") if parameters is None else parameters)
    return attachment_policy.Policy(attachment_policy.Limits(**limits), app)


def test_policy_reads_documents_and_checks_their_bytes():
    anything = policy({})
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


def test_policy_counts_before_reading_anything():
    parts = [("messages[0].content[%d]" % n, image("not even a url")) for n in range(4)]
    with pytest.raises(APIError) as caught:
        policy(files=3).check_count(parts)
    assert caught.value.code == "too_many_files" and caught.value.param == "messages[0].content[3]"
    with pytest.raises(APIError) as caught:
        policy(files=0).check_count(parts[:1])
    assert "MAX_FILES=0" in caught.value.message


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
    assert content.part_text({"type": "image_url", "image_url": "https://x.example/"}) == "[image]"
    assert content.part_text(image("http://[::1/cat.png")) == "[image]"


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


def test_attachment_settings():
    base = {"DIFY_API_KEYS": "app-a", "DIFY_API_BASE": "https://dify.example/v1", "VALID_API_KEYS": "k"}
    settings = settings_from(base)
    assert (settings.max_image_bytes, settings.max_file_bytes, settings.max_files) == (10 * MB, 15 * MB, 10)
    assert (settings.upload_cache_size, settings.upload_cache_ttl) == (1000, 3600.0)
    assert attachment_policy.Limits.from_settings(settings_from({**base, "MAX_IMAGE_MB": "2", "MAX_FILES": "0"})) == \
        attachment_policy.Limits(2 * MB, 15 * MB, 0)
    for name, bad in (("MAX_IMAGE_MB", "0"), ("MAX_FILE_MB", "lots"), ("MAX_FILES", "-1"), ("UPLOAD_CACHE_TTL", "0")):
        with pytest.raises(ConfigError, match=name):
            settings_from({**base, name: bad})


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
