"""What the attachment tests share: real bytes of each file type, the message parts that carry them,
and the requests they send through the proxy.
"""

import base64
import json
import struct
import zlib

from fake_dify import FakeApp, default_parameters

CHAT = "Chat Bot"
AGENT = "Agent Bot"
FLOW = "Flow Bot"
MB = 1024 * 1024


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
