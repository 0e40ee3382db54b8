"""The fake Dify must itself follow the reference, or proxy tests prove nothing."""

from __future__ import annotations

import asyncio
import http.client
import json
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
