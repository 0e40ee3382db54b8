"""The fake Dify must itself follow the reference, or proxy tests prove nothing."""

from __future__ import annotations

import ast
import asyncio
import http.client
import json
import os
import uuid
from types import SimpleNamespace

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

try:
    from fake_dify import (  # conftest puts tests/ on sys.path
        Drop, End, ErrorEvent, Event, FakeApp, FakeDify, FakeDifyThread, Hang, HttpError, Raw, Sleep, Start, Text,
    )
except ImportError:
    from tests.fake_dify import (  # type: ignore[no-redef]
        Drop, End, ErrorEvent, Event, FakeApp, FakeDify, FakeDifyThread, Hang, HttpError, Raw, Sleep, Start, Text,
    )

CHAT = "app-chat00000000000000000000"
AGENT = "app-agent0000000000000000000"
FLOW = "app-flow00000000000000000000"
COMP = "app-comp00000000000000000000"
WF = "app-wf0000000000000000000000"


def all_apps() -> list[FakeApp]:
    return [
        FakeApp(CHAT, "Chat"),
        FakeApp(AGENT, "Agent", mode="agent-chat"),
        FakeApp(FLOW, "Flow", mode="advanced-chat"),
        FakeApp(COMP, "Comp", mode="completion"),
        FakeApp(WF, "WF", mode="workflow", info_has_mode=False),
    ]


class Client:
    """Thin AsyncHTTPClient wrapper; never raises on HTTP errors."""

    def __init__(self, fake: FakeDify) -> None:
        self.fake = fake
        self.http = AsyncHTTPClient(force_instance=True)

    async def call(self, method, path, key=CHAT, body=None, *, raw=None, headers=None, chunks=None, timeout=5.0):
        hdrs = {"Authorization": f"Bearer {key}"} if key else {}
        if body is not None:
            raw = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        request = HTTPRequest(
            self.fake.base_url + path, method=method, headers=hdrs, body=raw, request_timeout=timeout,
            allow_nonstandard_methods=True,
            streaming_callback=chunks.append if chunks is not None else None,
        )
        try:
            return await self.http.fetch(request, raise_error=False)
        except HTTPClientError as err:  # 599: connection dropped or timed out
            return SimpleNamespace(code=err.code, body=b"", headers={}, error=err)


def run(test, apps=None, **options):
    """Start a fake on a fresh loop, run `test(fake, client)`, always stop it."""

    async def main():
        fake = FakeDify(apps or all_apps(), **options)
        await fake.start()
        client = Client(fake)
        try:
            return await test(fake, client)
        finally:
            client.http.close()
            await fake.stop()

    return asyncio.run(main())


def events_of(body: bytes) -> list[dict]:
    return [json.loads(block[6:]) for block in body.split(b"\n\n") if block.startswith(b"data: ")]


def chat(query="hi there", user="u1", mode="streaming", **extra):
    return {"inputs": {}, "query": query, "user": user, "response_mode": mode, **extra}


async def wait_for(predicate, timeout=3.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# ----------------------------------------------------------------------------- basics


def test_auth_401_shape_and_header():
    async def test(fake, c):
        wrong = await c.call("POST", "/chat-messages", key="app-nope", body=chat())
        assert wrong.code == 401
        assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="api"'
        assert wrong.headers["Content-Type"] == "application/json"
        assert json.loads(wrong.body) == {"code": "unauthorized", "message": "Access token is invalid", "status": 401}
        missing = await c.call("GET", "/info", key=None)
        assert json.loads(missing.body)["message"] == "Authorization header must be provided and start with 'Bearer'"
        basic = await c.call("GET", "/info", key=None, headers={"Authorization": f"Basic {CHAT}"})
        assert json.loads(basic.body)["message"] == "Authorization scheme must be 'Bearer'"
        welcome = await c.call("GET", "/", key=None)
        assert json.loads(welcome.body)["welcome"] == "Dify OpenAPI"
        unknown = await c.call("GET", "/nope")
        assert (unknown.code, json.loads(unknown.body)["code"]) == (404, "not_found")
        assert [r.path for r in fake.requests] == ["/chat-messages", "/info", "/info", "/", "/nope"]
        assert fake.requests[0].json["query"] == "hi there"

    run(test)


def test_info_with_and_without_mode_and_parameters():
    async def test(fake, c):
        info = json.loads((await c.call("GET", "/info")).body)
        assert info == {"name": "Chat", "description": "Chat (fake)", "tags": [], "mode": "chat",
                        "author_name": "Fake Dify"}
        old = json.loads((await c.call("GET", "/info", key=WF)).body)
        assert old["name"] == "WF" and "mode" not in old
        params = json.loads((await c.call("GET", "/parameters")).body)
        assert params["file_upload"]["enabled"] is True
        assert params["file_upload"]["image"]["enabled"] is True
        assert params["user_input_form"][0]["text-input"]["variable"] == "city"

    run(test)


def test_info_status_error_envelope():
    async def test(fake, c):
        resp = await c.call("GET", "/info")
        assert resp.code == 403
        assert json.loads(resp.body)["code"] == "forbidden"

    run(test, apps=[FakeApp(CHAT, "Chat", info_status=403)])


def test_json_endpoint_errors_and_validation_order():
    async def test(fake, c):
        r = await c.call("POST", "/chat-messages", raw=b"{}", headers={"Content-Type": "text/plain"})
        assert (r.code, json.loads(r.body)["code"]) == (415, "unsupported_media_type")
        r = await c.call("POST", "/chat-messages", raw=b"", headers={"Content-Type": "application/json"})
        assert (r.code, json.loads(r.body)["code"]) == (400, "bad_request")
        r = await c.call("POST", "/chat-messages", body={"inputs": {}, "query": "x"})
        assert json.loads(r.body)["message"] == "Arg user must be provided."
        r = await c.call("POST", "/chat-messages", key=WF, body=chat())
        assert json.loads(r.body)["code"] == "not_chat_app"
        r = await c.call("POST", "/completion-messages", body=chat())
        assert json.loads(r.body)["code"] == "app_unavailable"
        r = await c.call("POST", "/workflows/run", body=chat())
        assert json.loads(r.body)["code"] == "not_workflow_app"
        r = await c.call("POST", "/chat-messages", body={"query": "x", "user": "u"})
        assert json.loads(r.body)["code"] == "invalid_param" and "inputs" in json.loads(r.body)["message"]
        r = await c.call("POST", "/chat-messages", body=chat(query=""))
        assert json.loads(r.body)["message"] == "query is required"

    run(test)


def test_required_input_variable():
    params = {"user_input_form": [{"text-input": {"variable": "city", "label": "City", "required": True}}]}

    async def test(fake, c):
        r = await c.call("POST", "/chat-messages", body=chat(mode="blocking"))
        assert (r.code, json.loads(r.body)["message"]) == (400, "city is required in input form")
        r = await c.call("POST", "/chat-messages", body=chat(mode="blocking", inputs={"city": "Paris"}))
        assert r.code == 200

    run(test, apps=[FakeApp(CHAT, "Chat", parameters=params)])


# ----------------------------------------------------------------------------- streaming


def test_streaming_chat_exact_bytes():
    async def test(fake, c):
        r = await c.call("POST", "/chat-messages", body=chat())
        assert r.code == 200
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        body = r.body
        events = events_of(body)
        first = events[0]
        conv, mid, task, ts = first["conversation_id"], first["message_id"], first["task_id"], first["created_at"]
        assert fake.conversations[conv] == (CHAT, "u1")
        pieces = [e["answer"] for e in events[:-1]]
        assert "".join(pieces) == "Echo: hi there" and len(pieces) == 3
        expected = b"".join(
            (
                'data: {"event":"message","conversation_id":"%s","message_id":"%s","created_at":%d,"task_id":"%s",'
                '"id":"%s","answer":%s,"from_variable_selector":null}\n\n'
                % (conv, mid, ts, task, mid, json.dumps(p))
            ).encode()
            for p in pieces
        )
        assert body.startswith(expected)
        end = body[len(expected):]
        assert end.startswith(
            ('data: {"event":"message_end","conversation_id":"%s","message_id":"%s","created_at":%d,'
             '"task_id":"%s","id":"%s","metadata":{"annotation_reply":null,"retriever_resources":[],"usage":{'
             % (conv, mid, ts, task, mid)).encode()
        )
        assert end.endswith(b'"files":null}\n\n') and end.count(b"\n\n") == 1
        usage = events[-1]["metadata"]["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (2, 3, 5)
        assert all(isinstance(usage[k], str) for k in ("prompt_price", "completion_unit_price", "total_price"))
        assert usage["currency"] == "USD" and usage["time_to_first_token"] is None

    run(test)


def test_dumps_json_style_and_message_file_quirk():
    async def test(fake, c):
        fake.script(CHAT, Text("é"), End())
        body = (await c.call("POST", "/chat-messages", body=chat())).body
        assert b'{"event": "message_file", "conversation_id": ' in body
        assert b'"answer": "\\u00e9"' in body

    run(test, json_style="dumps", message_file_text=True)


def test_agent_chat_blocking_rejected_and_streaming_shape():
    async def test(fake, c):
        r = await c.call("POST", "/chat-messages", key=AGENT, body=chat(mode="blocking"))
        assert r.code == 400
        assert json.loads(r.body) == {"code": "invalid_param",
                                      "message": "Agent Chat App does not support blocking mode", "status": 400}
        events = events_of((await c.call("POST", "/chat-messages", key=AGENT, body=chat())).body)
        assert [e["event"] for e in events] == ["agent_thought"] + ["agent_message"] * 3 + ["message_end"]
        assert events[0]["position"] == 1 and events[0]["thought"] == ""

    run(test)


@pytest.mark.parametrize("order", ["workflow_first", "message_first"])
def test_chatflow_end_orders(order):
    async def test(fake, c):
        events = events_of((await c.call("POST", "/chat-messages", key=FLOW, body=chat())).body)
        names = [e["event"] for e in events]
        tail = ["workflow_finished", "message_end"]
        assert names == ["workflow_started", "node_started", "node_finished"] + ["message"] * 3 + (
            tail if order == "workflow_first" else tail[::-1])
        assert len({(e["task_id"], e["message_id"], e["conversation_id"]) for e in events}) == 1
        assert list(events[0])[:7] == ["event", "conversation_id", "message_id", "created_at", "task_id",
                                       "workflow_run_id", "data"]
        finished = next(e for e in events if e["event"] == "workflow_finished")
        assert finished["data"]["status"] == "succeeded"
        assert finished["data"]["outputs"] == {"answer": "Echo: hi there"}

    run(test, chatflow_end_order=order)


def test_workflow_and_completion_runs():
    async def test(fake, c):
        wf = {"inputs": {"query": "bonjour"}, "user": "u1", "response_mode": "streaming"}
        events = events_of((await c.call("POST", "/workflows/run", key=WF, body=wf)).body)
        assert [e["event"] for e in events][:3] == ["workflow_started", "node_started", "node_finished"]
        assert list(events[0])[:3] == ["event", "workflow_run_id", "task_id"]
        assert events[-1]["data"]["outputs"] == {"text": "Echo: bonjour"}
        fake.script(WF, Text("x"), End(status="failed", error="boom"))
        blocking = await c.call("POST", "/workflows/run", key=WF, body={**wf, "response_mode": "blocking"})
        data = json.loads(blocking.body)["data"]
        assert blocking.code == 200 and (data["status"], data["error"]) == ("failed", "boom")
        comp = {"inputs": {"query": "salut"}, "user": "u1", "response_mode": "blocking"}
        body = json.loads((await c.call("POST", "/completion-messages", key=COMP, body=comp)).body)
        assert body["mode"] == "completion" and body["answer"] == "Echo: salut" and "conversation_id" not in body
        assert body["id"] == body["message_id"]

    run(test)


def test_failed_chatflow():
    async def test(fake, c):
        fake.script(FLOW, Start(), Text("a"), End(status="failed", error="x"))
        events = events_of((await c.call("POST", "/chat-messages", key=FLOW, body=chat())).body)
        assert [e["event"] for e in events][-2:] == ["workflow_finished", "error"]
        assert events[-1]["message"] == "Run failed: x" and "task_id" not in events[-1]
        fake.script(FLOW, Text("a"), End(status="failed", error="x"))
        r = await c.call("POST", "/chat-messages", key=FLOW, body=chat(mode="blocking"))
        assert (r.code, json.loads(r.body)["message"]) == (400, "Run failed: x")

    run(test)


def test_faults_error_event_http_error_drop():
    async def test(fake, c):
        fake.script(CHAT, Text("a"), ErrorEvent(message="[models] Error: boom"))
        events = events_of((await c.call("POST", "/chat-messages", body=chat())).body)
        assert events[-1] == {"event": "error", "conversation_id": events[0]["conversation_id"],
                              "message_id": events[0]["message_id"], "created_at": events[0]["created_at"],
                              "code": "completion_request_error", "status": 400, "message": "[models] Error: boom"}
        fake.script(CHAT, HttpError(429, "too_many_requests", "slow down", {"Retry-After": "1"}))
        r = await c.call("POST", "/chat-messages", body=chat())
        assert (r.code, r.headers["Retry-After"], json.loads(r.body)["code"]) == (429, "1", "too_many_requests")
        fake.script(CHAT, Text("a"), Drop())
        chunks: list[bytes] = []
        r = await c.call("POST", "/chat-messages", body=chat(), chunks=chunks)
        assert r.code == 599 and b"".join(chunks).startswith(b'data: {"event":"message"')
        fake.script(CHAT, Event({"event": "message", "answer": "z", "task_id": "T"}), End())
        events = events_of((await c.call("POST", "/chat-messages", body=chat())).body)
        assert events[0]["task_id"] == "T" and events[0]["message_id"] == events[1]["message_id"]
        assert fake.active_streams == 0

    run(test)


def test_raw_split_multibyte_arrives_as_exact_bytes():
    part1 = b'data: {"event":"message","answer":"caf\xc3'
    part2 = b'\xa9"}\n\n'

    async def test(fake, c):
        fake.script(CHAT, Raw(part1), Sleep(0.05), Raw(part2))
        chunks: list[bytes] = []
        r = await c.call("POST", "/chat-messages", body=chat(), chunks=chunks)
        assert r.code == 200
        assert chunks == [part1, part2]  # Sleep emits no ping inside the split event

    run(test, ping_interval=0.01)


# ----------------------------------------------------------------------------- stop / hang


def test_stop_ends_hang_with_message_end_and_is_recorded():
    async def test(fake, c):
        fake.script(CHAT, Text("part"), Hang())
        chunks: list[bytes] = []
        pending = asyncio.ensure_future(c.call("POST", "/chat-messages", body=chat(user="alice"), chunks=chunks))
        await wait_for(lambda: chunks)
        task_id = events_of(chunks[0])[0]["task_id"]
        assert fake.active_streams == 1
        other = await c.call("POST", f"/chat-messages/{task_id}/stop", body={"user": "mallory"})
        assert json.loads(other.body) == {"result": "success"}
        await asyncio.sleep(0.25)
        assert not pending.done()  # wrong user: Dify ignores the stop
        await c.call("POST", f"/chat-messages/{task_id}/stop", body={"user": "alice"})
        assert (await pending).code == 200
        body = b"".join(chunks)
        assert body.count(b"event: ping\n\n") >= 2  # pings kept flowing while hanging
        events = events_of(body)
        assert [e["event"] for e in events] == ["message", "message_end"]
        assert events[-1]["metadata"]["usage"]["completion_tokens"] == 1
        assert fake.stops == [("chat", task_id, "mallory"), ("chat", task_id, "alice")]
        assert fake.active_streams == 0

    run(test, ping_interval=0.1)


def test_stop_workflow_and_client_gone():
    async def test(fake, c):
        fake.script(WF, Start(), Hang())
        chunks: list[bytes] = []
        wf = {"inputs": {}, "user": "u1", "response_mode": "streaming"}
        pending = asyncio.ensure_future(c.call("POST", "/workflows/run", key=WF, body=wf, chunks=chunks))
        await wait_for(lambda: chunks)
        task_id = events_of(chunks[0])[0]["task_id"]
        await c.call("POST", f"/workflows/tasks/{task_id}/stop", key=WF, body={"user": "someone-else"})
        assert (await pending).code == 200
        events = events_of(b"".join(chunks))
        assert events[-1]["event"] == "workflow_finished" and events[-1]["data"]["status"] == "stopped"
        # A client that goes away closes the upstream stream too.
        fake.script(CHAT, Hang())
        r = await c.call("POST", "/chat-messages", body=chat(), timeout=0.2)
        assert r.code == 599
        await wait_for(lambda: fake.active_streams == 0)

    run(test)


# ----------------------------------------------------------------------------- conversations


def test_conversation_scoping():
    async def test(fake, c):
        first = json.loads((await c.call("POST", "/chat-messages", body=chat(user="alice", mode="blocking"))).body)
        conv = first["conversation_id"]
        assert first["id"] == first["message_id"] and first["mode"] == "chat"
        again = await c.call("POST", "/chat-messages", body=chat(user="alice", mode="blocking", conversation_id=conv))
        assert json.loads(again.body)["conversation_id"] == conv
        for key, user, cid in ((CHAT, "bob", conv), (FLOW, "alice", conv), (CHAT, "alice", str(uuid.uuid4()))):
            r = await c.call("POST", "/chat-messages", key=key, body=chat(user=user, mode="blocking",
                                                                          conversation_id=cid))
            assert r.code == 404
            assert json.loads(r.body) == {"code": "not_found", "message": "Conversation Not Exists.", "status": 404}
        bad = await c.call("POST", "/chat-messages", body=chat(user="alice", conversation_id="nope"))
        assert bad.code == 400 and "conversation_id must be a valid UUID" in json.loads(bad.body)["message"]
        listed = json.loads((await c.call("GET", "/conversations?user=alice")).body)
        assert [row["id"] for row in listed["data"]] == [conv]
        gone = await c.call("DELETE", f"/conversations/{conv}", body={"user": "alice"})
        assert gone.code == 204 and conv not in fake.conversations
        r = await c.call("POST", "/chat-messages", body=chat(user="alice", conversation_id=conv))
        assert r.code == 404

    run(test)


# ----------------------------------------------------------------------------- uploads


def multipart(filename='"a.png"', ctype="image/png", data=b"\x89PNG", user="u1"):
    boundary = "XyZ"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="user"\r\n\r\n{user}\r\n'.encode()]
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"'
    if filename is not None:
        head += f"; filename={filename}"
    head += "\r\n" + (f"Content-Type: {ctype}\r\n" if ctype else "") + "\r\n"
    parts.append(head.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_upload_recorded_and_errors():
    async def test(fake, c):
        body, headers = multipart()
        r = await c.call("POST", "/files/upload", raw=body, headers=headers)
        assert r.code == 201
        info = json.loads(r.body)
        assert (info["name"], info["extension"], info["mime_type"], info["size"]) == ("a.png", "png", "image/png", 4)
        upload = fake.uploads[info["id"]]
        assert (upload.data, upload.filename, upload.mime, upload.user) == (b"\x89PNG", "a.png", "image/png", "u1")
        recorded = fake.requests_to("/files/upload", "POST")[0]
        assert recorded.form == {"user": "u1"} and recorded.files == [("a.png", "image/png", b"\x89PNG")]
        for kwargs, status, code in (
            ({"filename": None}, 400, "no_file_uploaded"),
            ({"filename": '""'}, 400, "filename_not_exists_error"),
            ({"ctype": None}, 415, "unsupported_file_type"),
        ):
            body, headers = multipart(**kwargs)
            r = await c.call("POST", "/files/upload", raw=body, headers=headers)
            assert (r.code, json.loads(r.body)["code"]) == (status, code), kwargs
        fake.upload_error = (413, "file_too_large", "File size exceeded.")
        body, headers = multipart()
        r = await c.call("POST", "/files/upload", raw=body, headers=headers)
        assert (r.code, json.loads(r.body)["code"]) == (413, "file_too_large")
        # Chat requests may reference the upload; unknown ids are rejected.
        files = [{"type": "image", "transfer_method": "local_file", "upload_file_id": info["id"]}]
        ok = await c.call("POST", "/chat-messages", body=chat(mode="blocking", files=files))
        assert ok.code == 200
        files[0]["upload_file_id"] = str(uuid.uuid4())
        bad = await c.call("POST", "/chat-messages", body=chat(mode="blocking", files=files))
        assert json.loads(bad.body)["message"] == "Invalid upload file"

    run(test)


# ----------------------------------------------------------------------------- thread mode


def test_thread_mode_keepalive_counts_connections():
    with FakeDifyThread(FakeDify(all_apps())) as fake:
        fake.script(CHAT, Text("one"), End())
        conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
        headers = {"Authorization": f"Bearer {CHAT}", "Content-Type": "application/json"}
        for query in ("a", "b"):
            conn.request("POST", "/v1/chat-messages", json.dumps(chat(query=query)), headers)
            response = conn.getresponse()
            assert response.status == 200
            events = events_of(response.read())
        conn.close()
        assert "".join(e["answer"] for e in events[:-1]) == "Echo: b"  # second run is the default run
        assert fake.connections_opened == 1
        assert [r.json["query"] for r in fake.requests_to("/chat-messages")] == ["a", "b"]


# ----------------------------------------------------------------------------- real-Dify profiles
# Each test names the fact of /work/shared/reference/dify-captures/README.md it reproduces.


async def raw_exchange(fake, path, body, key=CHAT, method="POST", wait=5.0):
    """One request over a raw socket: (head text, [(seconds since sent, network read)]) until the
    chunked body ends, the server closes, or `wait` seconds pass."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    data = json.dumps(body).encode() if body is not None else b""
    writer.write((f"{method} /v1{path} HTTP/1.1\r\nHost: fake\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data)
    sent = loop.time()
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    reads = []
    while loop.time() - sent < wait:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), wait - (loop.time() - sent))
        except asyncio.TimeoutError:
            break
        if not chunk:
            break
        reads.append((loop.time() - sent, chunk))
        if chunk == b"0\r\n\r\n" or chunk.endswith(b"\r\n0\r\n\r\n") or "Content-Length" in head:
            break
    writer.close()
    return head, reads


def dechunk(reads):
    """The chunk payloads of a chunked body, each with the time its read arrived."""
    out, buffer, arrived = [], b"", 0.0
    for at, data in reads:
        buffer += data
        arrived = at
        while b"\r\n" in buffer:
            size_line, rest = buffer.split(b"\r\n", 1)
            size = int(size_line, 16)
            if len(rest) < size + 2:
                break
            out.append((arrived, rest[:size]))
            buffer = rest[size + 2:]
    return out


def test_113_chatflow_stream_ping_first_compact_utf8_message_end_first_late_eof():
    async def test(fake, c):
        head, reads = await raw_exchange(fake, "/chat-messages", chat("hé 你好"), key=FLOW)
        assert "X-Version: 1.13.2" in head and "Vary: Cookie" in head
        # R3: the initial ping, alone, first (Tornado writes chunk sizes in lower-case hex, gunicorn upper)
        assert reads[0][1] == b"d\r\nevent: ping\n\n\r\n"
        chunks = dechunk(reads)
        events = [json.loads(payload[6:]) for _, payload in chunks if payload.startswith(b"data: ")]
        assert [e["event"] for e in events] == ["workflow_started", "node_started", "node_finished"] + [
            "message"] * 3 + ["message_end", "workflow_finished"]  # R4
        body = b"".join(payload for _, payload in chunks)
        assert "hé 你好".encode() in body and b'{"event":"message","conversation_id":' in body  # R11
        usage = events[-2]["metadata"]["usage"]
        assert usage["total_tokens"] == 0 and usage["total_price"] == "0.0"  # R12: no LLM in the flow
        finished_at = next(at for at, payload in chunks if b"workflow_finished" in payload)
        assert reads[-1][1].endswith(b"0\r\n\r\n") and reads[-1][0] - finished_at >= 0.9  # R10

    run(test, profile="1.13")


def test_011_chat_stream_dumps_style_empty_last_text_and_free_model_prices():
    async def test(fake, c):
        head, reads = await raw_exchange(fake, "/chat-messages", chat("hé"))
        assert "X-Version: 0.11.1" in head
        chunks = dechunk(reads)
        assert not any(b"ping" in payload for _, payload in chunks)  # R3: no initial ping
        body = b"".join(payload for _, payload in chunks)
        assert b'{"event": "message", "conversation_id": ' in body and b"\\u00e9" in body  # R11
        events = events_of(body)
        assert [e["event"] for e in events] == ["message"] * 4 + ["message_end"]
        assert events[-2]["answer"] == ""  # R22
        assert list(events[-1]["metadata"]) == ["usage"] and events[-1]["files"] is None
        assert events[-1]["metadata"]["usage"]["total_price"] == "0E-7"  # R12
        assert reads[-1][0] - next(at for at, p in chunks if b"message_end" in p) < 0.5  # R10: ends at once

    run(test, profile="0.11")


def test_011_chatflow_terminal_order_and_agent_empty_messages():
    async def test(fake, c):
        flow = events_of((await c.call("POST", "/chat-messages", key=FLOW, body=chat())).body)
        assert [e["event"] for e in flow][-3:] == ["message", "workflow_finished", "message_end"]  # R4
        assert flow[-3]["answer"] == ""
        fake.script(AGENT, Start(), Event({"event": "agent_thought", "position": 1, "tool": "clock"}),
                    Text("Echo"), End())
        agent = events_of((await c.call("POST", "/chat-messages", key=AGENT, body=chat())).body)
        assert [e["event"] for e in agent] == ["agent_thought", "agent_message", "agent_thought", "agent_message",
                                              "agent_message", "message_end"]
        assert agent[1]["answer"] == "" and agent[-2]["answer"] == ""  # R22
        assert agent[0]["id"] == agent[2]["id"]  # R22: one id per round, reused by its updates

    run(test, profile="0.11")


@pytest.mark.parametrize("case", ["unknown conversation", "missing input", "unknown upload"])
def test_113_worker_side_errors_are_a_ping_then_silence(case):
    required = {"user_input_form": [{"text-input": {"label": "L", "variable": "lang", "required": True}}],
                "file_upload": {"enabled": True, "allowed_file_types": ["image"], "number_limits": 3,
                                "allowed_file_upload_methods": ["local_file"]}}
    apps = [FakeApp(FLOW, "Flow", mode="advanced-chat", parameters=required), FakeApp(CHAT, "Chat")]
    good = {"lang": "fr"}
    bodies = {
        "unknown conversation": chat(inputs=good, conversation_id=str(uuid.uuid4())),
        "missing input": chat(),
        "unknown upload": chat(inputs=good, files=[{"type": "image", "transfer_method": "local_file",
                                                     "upload_file_id": str(uuid.uuid4())}]),
    }

    async def test(fake, c):
        fake.worker_silence = 0.6
        head, reads = await raw_exchange(fake, "/chat-messages", bodies[case], key=FLOW)
        assert head.startswith("HTTP/1.1 200") and reads[0][1] == b"d\r\nevent: ping\n\n\r\n"  # R1
        assert b"".join(data for _, data in reads[1:]) == b"0\r\n\r\n" and reads[-1][0] >= 0.55
        assert len(fake.silent_failures) == 1 and fake.silent_failures[0][0] in (400, 404)
        blocking = await c.call("POST", "/chat-messages", key=FLOW, body={**bodies[case], "response_mode": "blocking"})
        assert blocking.code in (400, 404)  # R1: blocking still answers at once
        if case == "unknown conversation":  # a chat app's conversation is checked by the API process
            assert (await c.call("POST", "/chat-messages", body=bodies[case])).code == 404

    run(test, apps=apps, profile="1.13")


def test_011_errors_come_before_any_byte_and_have_params_without_status():
    async def test(fake, c):
        gone = await c.call("POST", "/chat-messages", key=FLOW, body=chat(conversation_id=str(uuid.uuid4())))
        assert gone.code == 404 and json.loads(gone.body)["message"] == "Conversation Not Exists."  # R1
        bad = await c.call("POST", "/chat-messages", body=chat(conversation_id="nope"))
        assert json.loads(bad.body) == {"code": "invalid_param", "message": "nope is not a valid uuid.",
                                        "params": "conversation_id"}  # R15
        assert fake.silent_failures == []

    run(test, profile="0.11")


def test_113_queue_wait_after_the_initial_ping_has_no_pings():
    async def test(fake, c):
        fake.queue_delay = 0.5
        _, reads = await raw_exchange(fake, "/workflows/run", {"inputs": {"query": "q"}, "user": "u1",
                                                               "response_mode": "streaming"}, key=WF)
        chunks = dechunk(reads)
        assert chunks[0][1] == b"event: ping\n\n" and chunks[0][0] < 0.3  # R2/R3
        assert chunks[1][1].startswith(b'data: {"event":"workflow_started"') and chunks[1][0] >= 0.5

    run(test, profile="1.13", ping_interval=0.1)


@pytest.mark.parametrize("key, path", [(FLOW, "/chat-messages/{}/stop"), (WF, "/workflows/tasks/{}/stop")])
def test_113_stopped_flow_ends_as_an_aborted_failed_run(key, path):
    async def test(fake, c):
        fake.script(key, Start(), Text("part"), Hang())
        chunks: list[bytes] = []
        body = chat() if key == FLOW else {"inputs": {}, "user": "u1", "response_mode": "streaming"}
        route = "/chat-messages" if key == FLOW else "/workflows/run"
        pending = asyncio.ensure_future(c.call("POST", route, key=key, body=body, chunks=chunks))
        await wait_for(lambda: events_of(b"".join(chunks)))
        task_id = events_of(b"".join(chunks))[0]["task_id"]
        await c.call("POST", path.format(task_id), key=key, body={"user": "u1"})
        await pending
        events = events_of(b"".join(chunks))
        assert events[-1]["event"] == "workflow_finished" and "message_end" not in [e["event"] for e in events]  # R5
        assert events[-1]["data"]["status"] == "failed" and events[-1]["data"]["error"] == "Aborted: User requested stop"

    run(test, profile="1.13")


def test_info_parameters_and_mode_probes_per_version():
    async def test_113(fake, c):
        info = json.loads((await c.call("GET", "/info", key=FLOW)).body)
        assert list(info) == ["name", "description", "tags", "mode", "author_name"]  # R13
        upload = json.loads((await c.call("GET", "/parameters", key=FLOW)).body)["file_upload"]
        assert sorted(upload) == ["allowed_file_extensions", "allowed_file_types", "allowed_file_upload_methods",
                                  "enabled", "number_limits"]  # R17

    async def test_011(fake, c):
        assert list(json.loads((await c.call("GET", "/info", key=AGENT)).body)) == ["name", "description"]  # R13
        probe = chat(query="", user="opendify-mode-probe", mode="blocking")
        answers = {key: json.loads((await c.call("POST", "/chat-messages", key=key, body=probe)).body)["message"]
                   for key in (CHAT, AGENT, FLOW)}
        assert answers == {CHAT: "query is required", AGENT: "Agent Chat App does not support blocking mode",
                           FLOW: "query is required"}  # R14
        assert json.loads((await c.call("POST", "/chat-messages", key=WF, body=probe)).body)["code"] == "not_chat_app"
        chat_parameters = json.loads((await c.call("GET", "/parameters", key=CHAT)).body)
        flow_parameters = json.loads((await c.call("GET", "/parameters", key=FLOW)).body)
        assert list(chat_parameters["file_upload"]) == ["image"]  # R17: the legacy setting only
        assert flow_parameters["file_upload"]["enabled"] is True and "image" not in flow_parameters["file_upload"]
        assert flow_parameters["sensitive_word_avoidance"] == {"enabled": False}
        assert all("type" in next(iter(item.values())) for item in flow_parameters["user_input_form"])

    run(test_113, profile="1.13")
    run(test_011, profile="0.11")


def test_messages_lists_the_newest_last_and_404s_a_gone_conversation():
    async def test(fake, c):
        first = json.loads((await c.call("POST", "/chat-messages", body=chat("one", mode="blocking"))).body)
        conversation = first["conversation_id"]
        second = json.loads((await c.call("POST", "/chat-messages", body=chat(
            "two", mode="blocking", conversation_id=conversation))).body)
        page = json.loads((await c.call("GET", f"/messages?conversation_id={conversation}&user=u1&limit=1")).body)
        assert [m["id"] for m in page["data"]] == [second["message_id"]] and page["has_more"] is True
        assert page["data"][0]["answer"] == "Echo: two"
        other = await c.call("GET", f"/messages?conversation_id={conversation}&user=u2&limit=1")
        assert other.code == 404
        fake.delete_conversation(conversation)
        gone = await c.call("GET", f"/messages?conversation_id={conversation}&user=u1&limit=1")
        assert gone.code == 404 and b'"Conversation Not Exists."' in gone.body

    run(test, profile="1.13")


# ----------------------------------------------------------------------------- the fake next to the recordings

CAPTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "dify-captures")


def captured_turns(name):
    """The streamed bodies of a capture file (copied from /work/shared/reference/dify-captures), one
    list of SSE payloads per exchange, as the server sent them."""
    turns, reads = [], None
    with open(os.path.join(CAPTURES, name), encoding="utf-8") as capture:
        for line in capture:
            if line.startswith(">>> POST"):
                reads = []
                turns.append(reads)
            elif line.startswith("[") and "] '" in line and reads is not None:
                reads.append((0.0, ast.literal_eval(line.split("] ", 1)[1]).encode("utf-8")))
    return [[payload for _, payload in dechunk(reads)] for reads in turns]


def shape(payloads):
    """What a client can tell apart in a stream: pings and event names in order, each event's key order
    (with its metadata and usage keys), and the JSON style."""
    kinds, keys = [], {}
    for payload in filter(None, payloads):  # the empty last chunk ends the body
        if payload == b"event: ping\n\n":
            kinds.append("ping")
            continue
        event = json.loads(payload[6:])
        kinds.append(event["event"])
        keys.setdefault(event["event"], list(event))
        if event["event"] == "message_end":
            keys["metadata"] = list(event["metadata"])
            keys["usage"] = list(event["metadata"]["usage"])
    body = b"".join(payloads)
    style = "compact" if b'{"event":"' in body else "spaced"
    return kinds, keys, style


@pytest.mark.parametrize("profile, capture, key", [
    ("1.13", "1.13.2_advanced-chat_stream_2turns.txt", FLOW),
    ("0.11", "0.11.1_advanced-chat_stream_2turns.txt", FLOW),
    ("0.11", "0.11.1_chat_stream_2turns.txt", CHAT),
])
def test_the_fake_streams_like_the_recorded_server(profile, capture, key):
    real_kinds, real_keys, real_style = shape(captured_turns(capture)[1])
    query = "second turn ünïcödé 你好"

    async def test(fake, c):
        first = events_of((await c.call("POST", "/chat-messages", key=key, body=chat("hello real dify"))).body)
        _, reads = await raw_exchange(fake, "/chat-messages", chat(query, conversation_id=first[0]["conversation_id"]),
                                      key=key)
        payloads = [payload for _, payload in dechunk(reads)]
        kinds, keys, style = shape(payloads)
        assert style == real_style
        assert (kinds[0] == "ping") == (real_kinds[0] == "ping") and kinds.count("ping") == real_kinds.count("ping")
        assert kinds[-2:] == real_kinds[-2:]
        for name in set(keys) & set(real_keys):
            assert keys[name] == real_keys[name], name
        assert set(real_keys) - set(keys) <= {"node_started", "node_finished"}
        escaped = query.encode("ascii", "backslashreplace").decode().replace("\\x", "\\u00").encode()
        assert (query.encode() in b"".join(payloads)) == (query.encode() in b"".join(captured_turns(capture)[1]))
        assert (escaped in b"".join(payloads)) == (escaped in b"".join(captured_turns(capture)[1]))

    run(test, profile=profile)
