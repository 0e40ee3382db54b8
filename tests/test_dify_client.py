"""The Dify client on libcurl: aborts, connection slots, egress proxies, stale connections,
an unreachable Dify, CA certificates, the fallback without pycurl, kept connections and the
SSE decoder.

Each test runs real sockets on loopback: the fake Dify, small raw servers where a test needs
Dify to misbehave at the TCP level, and a recording forward proxy.
"""

import asyncio
import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time

import openai
import pytest

from dify_client import DifyClient, DifyMalformed, DifyUnreachable, SSEDecoder
from fake_dify import End, Hang, Sleep, Text
from forward_proxy import RecordingProxy
from support import CLIENT_KEY, open_raw_stream, wait_for

CHAT = "Chat Bot"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STREAM_BODY = {"inputs": {}, "query": "x", "user": "u", "response_mode": "streaming"}


def ask(harness, content="x", **kwargs):
    answer = harness.client(**kwargs).chat.completions.create(model=CHAT, messages=[{"role": "user", "content": content}])
    return answer.choices[0].message.content


def ask_streaming(harness, content="x"):
    stream = harness.client().chat.completions.create(model=CHAT, stream=True,
                                                      messages=[{"role": "user", "content": content}])
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def open_stream(harness, content):
    """A raw streaming request, returned once its first text has arrived (the caller closes it)."""
    body = {"model": CHAT, "stream": True, "messages": [{"role": "user", "content": content}]}
    return open_raw_stream(harness.port, "/v1/chat/completions", body, until=b"content")


# --- a departed client ---------------------------------------------------------------------

def test_closing_a_stream_ends_the_transfer_at_once_while_dify_is_silent(loop):
    """libcurl runs its progress callback only when data arrives or about once a second; the
    stream wakes the transfer so Dify sees the connection close now, not at its next ping."""
    async def scenario():
        closed = asyncio.Event()

        async def silent_dify(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            event = b'data: {"event": "message", "task_id": "t1", "answer": "hi"}\n\n'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            while await reader.read(65536):  # the request body, then nothing until the proxy lets go
                pass
            closed.set()

        server = await asyncio.start_server(silent_dify, "127.0.0.1", 0)
        client = DifyClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1")
        try:
            stream = client.stream("app-x", "/chat-messages", STREAM_BODY)
            events = await stream.next_events()
            await asyncio.sleep(0.3)  # Dify stays silent
            left = time.monotonic()
            stream.close()
            await asyncio.wait_for(closed.wait(), 5)
            return events, stream.task_id, time.monotonic() - left
        finally:
            client.close()
            server.close()

    events, task_id, elapsed = loop.run(scenario())
    assert events[0]["answer"] == "hi" and task_id == "t1"
    assert elapsed < 1.0, f"Dify saw the connection close {elapsed:.2f} s after the client left"


# --- connection slots ------------------------------------------------------------------------

def test_time_spent_waiting_for_a_slot_is_not_dify_silence(make_harness):
    harness = make_harness(env={"DIFY_MAX_CONNECTIONS": "1", "DIFY_IDLE_TIMEOUT": "0.5", "DIFY_CONNECT_TIMEOUT": "10",
                                "KEEPALIVE_INTERVAL": "0.1"}, ping_interval=0.1)
    harness.dify.script(harness.key_of(CHAT), Text("slow"), Sleep(1.5), Text(" answer"), End())
    first = open_stream(harness, "first")
    try:
        started = time.monotonic()
        assert ask(harness, "second") == "Echo: second"  # waited ~1.5 s for the slot, three idle timeouts
        assert time.monotonic() - started > 0.5
    finally:
        first.close()


def test_past_the_wait_for_a_slot_the_client_gets_a_503_naming_the_limit(make_harness):
    harness = make_harness(env={"DIFY_MAX_CONNECTIONS": "1", "DIFY_CONNECT_TIMEOUT": "0.3"})
    harness.dify.script(harness.key_of(CHAT), Text("holding the only slot"), Hang())
    first = open_stream(harness, "first")
    try:
        status, headers, body = harness.raw("POST", "/v1/chat/completions", {
            "model": CHAT, "messages": [{"role": "user", "content": "second"}]})
    finally:
        first.close()
    error = json.loads(body)["error"]
    assert status == 503 and headers["retry-after"] == "1" and error["code"] == "dify_connections_busy"
    assert "DIFY_MAX_CONNECTIONS (now 1)" in error["message"]
    assert ask(harness, "third") == "Echo: third"  # the slot came back once the first client left


def test_stop_calls_and_refreshes_never_wait_behind_streams(harness):
    key = harness.key_of(CHAT)
    harness.dify.script(key, Text("holding the only slot"), Hang())

    async def scenario():
        client = DifyClient(harness.dify.base_url, max_connections=1, connect_timeout=10)
        try:
            stream = client.stream(key, "/chat-messages", STREAM_BODY)
            await stream.next_events()
            started = time.monotonic()
            info = await client.get(key, "/info")
            await client.stop(key, "chat", "some-other-task", "u")
            waited = time.monotonic() - started
            stream.close()
            return info, waited
        finally:
            client.close()

    info, waited = harness.loop.run(scenario())
    assert info["name"] == CHAT and ("chat", "some-other-task", "u") in harness.dify.stops
    assert waited < 5, "control calls waited for the stream's slot"


# --- egress proxies --------------------------------------------------------------------------

@pytest.fixture
def forward_proxy(loop):
    proxy = RecordingProxy()
    loop.run(proxy.start())
    yield proxy
    loop.run(proxy.stop())


def test_requests_to_dify_go_through_http_proxy(make_harness, forward_proxy):
    harness = make_harness(env={"HTTP_PROXY": forward_proxy.url, "NO_PROXY": ""})
    assert ask(harness, "one") == "Echo: one" and ask_streaming(harness, "two") == "Echo: two"
    origin = harness.dify.base_url
    assert f"GET {origin}/info HTTP/1.1" in forward_proxy.requests
    assert forward_proxy.requests.count(f"POST {origin}/chat-messages HTTP/1.1") == 2


def test_no_proxy_sends_dify_requests_direct(make_harness, forward_proxy):
    harness = make_harness(env={"http_proxy": forward_proxy.url, "NO_PROXY": "localhost,127.0.0.1"})
    assert ask(harness, "one") == "Echo: one"
    assert forward_proxy.requests == []


def test_https_dify_through_a_connect_proxy(make_harness, forward_proxy, tls_dify):
    harness = make_harness(tls=tls_dify, env={"HTTPS_PROXY": forward_proxy.url, "NO_PROXY": ""})
    assert harness.dify.base_url.startswith("https://")
    assert ask(harness, "one") == "Echo: one" and ask_streaming(harness, "two") == "Echo: two"
    assert forward_proxy.requests and set(forward_proxy.requests) == {f"CONNECT 127.0.0.1:{harness.dify.port} HTTP/1.1"}


def test_a_malformed_proxy_setting_stops_startup_naming_it():
    from config import ConfigError, settings_from
    with pytest.raises(ConfigError, match="HTTPS_PROXY"):
        settings_from({"DIFY_API_KEYS": "app-x", "DIFY_API_BASE": "https://dify.example/v1", "VALID_API_KEYS": "k",
                       "HTTPS_PROXY": "ftp://proxy.example:21"})


# --- CA certificates -------------------------------------------------------------------------

@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1: (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_dify(certificate, monkeypatch):
    """A server TLS context for the fake Dify, its certificate trusted through SSL_CERT_FILE."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    return context


def test_https_dify_is_verified_against_ssl_cert_file(make_harness, tls_dify):
    harness = make_harness(tls=tls_dify)
    assert ask(harness, "one") == "Echo: one" and ask_streaming(harness, "two") == "Echo: two"


def test_ssl_cert_file_in_the_settings_counts_like_the_environment(make_harness, certificate):
    """SSL_CERT_FILE read from `.env` (here: the settings) is trusted, not only the process environment."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    harness = make_harness(tls=context, env={"SSL_CERT_FILE": str(certificate[0])})
    assert ask(harness, "one") == "Echo: one"


def test_an_untrusted_dify_certificate_is_a_clear_unreachable_error(make_harness, tls_dify, monkeypatch):
    harness = make_harness(tls=tls_dify)
    monkeypatch.setenv("SSL_CERT_FILE", ssl.get_default_verify_paths().openssl_cafile)

    async def ask_info():
        client = DifyClient(harness.dify.base_url)
        try:
            await client.get(harness.key_of(CHAT), "/info")
        finally:
            client.close()

    with pytest.raises(DifyUnreachable) as caught:
        harness.loop.run(ask_info())
    assert "certificate" in caught.value.detail.lower()


# --- Dify restarts and outages -----------------------------------------------------------------

def test_a_kept_connection_dify_closes_as_the_next_request_arrives_is_retried(loop):
    """Dify's keep-alive timer can close a connection just as the next request goes out on it: the
    request is sent again on a new connection, not failed."""
    async def scenario():
        seen = {"connections": 0, "requests": 0}

        async def closing_dify(reader, writer):
            seen["connections"] += 1
            answered = False
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                seen["requests"] += 1
                if answered:
                    break  # the keep-alive timer fired: close without answering
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                answered = True
            writer.close()

        server = await asyncio.start_server(closing_dify, "127.0.0.1", 0)
        client = DifyClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1")
        try:
            answers = [await client.get("app-x", "/info"), await client.get("app-x", "/info")]
        finally:
            client.close()
            server.close()
        return answers, seen

    answers, seen = loop.run(scenario())
    assert answers == [{}, {}] and seen == {"connections": 2, "requests": 3}


def test_a_dify_that_accepts_no_connection_is_unreachable_within_the_connect_timeout(make_harness):
    harness = make_harness(env={"DIFY_CONNECT_TIMEOUT": "0.5"})
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once one connection waits, further connects hang
        filler.connect(listener.getsockname())
        harness.proxy.dify.base_url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as caught:
            ask(harness)
        elapsed = time.monotonic() - started
    assert caught.value.status_code == 502 and caught.value.code == "upstream_unreachable"
    assert "Cannot reach" in caught.value.message
    assert 0.4 < elapsed < 3.0


def test_dify_restarted_on_the_same_port_is_used_at_once(harness):
    """A restart drops every kept connection; the next request opens a new one and succeeds."""
    assert ask(harness, "before") == "Echo: before" and ask_streaming(harness, "kept") == "Echo: kept"
    port = harness.dify.port
    harness.loop.run(harness.dify.stop())
    harness.loop.run(harness.dify.start(port))
    assert ask(harness, "after") == "Echo: after" and ask_streaming(harness, "again") == "Echo: again"


# --- without pycurl --------------------------------------------------------------------------

def test_without_pycurl_the_simple_client_serves_after_one_warning(harness, tmp_path):
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "pycurl.py").write_text("raise ImportError('pycurl is blocked for this test')\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DIFY_", "VALID_", "SERVER_")) and k.lower() not in ("http_proxy", "all_proxy")}
    env.update(PYTHONPATH=str(blocker), DIFY_API_KEYS=",".join(app.key for app in harness.dify.apps),
               DIFY_API_BASE=harness.dify.base_url, VALID_API_KEYS=CLIENT_KEY, SERVER_PORT=str(port))
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py")], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=5)
        assert wait_for(lambda: _models(client) == 3, timeout=15), "the server did not come up"
        answer = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "Echo: hi"
        stream = client.chat.completions.create(model=CHAT, stream=True, messages=[{"role": "user", "content": "yo"}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Echo: yo"
    finally:
        server.terminate()
        output = server.communicate(timeout=10)[0]
    warnings = [line for line in output.splitlines() if "pycurl cannot be imported" in line]
    assert len(warnings) == 1 and "simple HTTP client" in warnings[0]


def _models(client):
    try:
        return len(client.models.list().data)
    except openai.APIConnectionError:
        return 0


# --- connections to Dify ---------------------------------------------------------------------

def test_requests_reuse_connections_to_dify(harness):
    client = harness.client()
    client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "warm up"}])
    opened = harness.dify.connections_opened
    for turn in range(10):
        stream = client.chat.completions.create(model=CHAT, stream=turn % 2 == 0,
                                                messages=[{"role": "user", "content": f"turn {turn}"}])
        if turn % 2 == 0:
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == f"Echo: turn {turn}"
        else:
            assert stream.choices[0].message.content == f"Echo: turn {turn}"
    assert harness.dify.connections_opened == opened


def test_a_connection_dify_closed_while_idle_is_not_used(harness):
    client = harness.client()
    client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "one"}])
    opened = harness.dify.connections_opened
    harness.loop.run(harness.dify._server.close_all_connections())
    answer = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "two"}])
    assert answer.choices[0].message.content == "Echo: two"
    assert harness.dify.connections_opened == opened + 1


def test_a_stream_the_client_left_closes_its_connection_and_the_next_request_works(harness):
    harness.dify.script(harness.key_of(CHAT), Text("first words"), Hang())
    with pytest.raises(OSError):
        harness.raw("POST", "/v1/chat/completions",
                    {"model": CHAT, "stream": True, "messages": [{"role": "user", "content": "x"}]}, timeout=0.5)
    assert wait_for(lambda: harness.dify.stops and harness.dify.active_streams == 0)
    answer = harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "next"}])
    assert answer.choices[0].message.content == "Echo: next"


# --- the SSE decoder, fed in every possible split -----------------------------------------------

SSE = ('event: ping\n\ndata: {"answer": "\u72d0\U0001f98a", "task_id": "t1"}\n\n: comment\n'
       'data: {"answer":\ndata: "two lines"}\r\n\r\ndata: {"answer": "last"}').encode()
SSE_EVENTS = [{"answer": "\u72d0\U0001f98a", "task_id": "t1"}, {"answer": "two lines"}, {"answer": "last"}]


def decode(pieces):
    decoder, events = SSEDecoder(), []
    for piece in pieces:
        decoder.feed(piece, events)
    decoder.finish(events)
    return decoder, events


@pytest.mark.parametrize("cut", range(1, len(SSE)))
def test_an_sse_body_split_anywhere_decodes_whole(cut):
    decoder, events = decode([SSE[:cut], SSE[cut:]])
    assert events == SSE_EVENTS and decoder.task_id == "t1"


def test_an_sse_body_fed_byte_by_byte_decodes_whole():
    assert decode([SSE[i:i + 1] for i in range(len(SSE))])[1] == SSE_EVENTS


def test_a_long_sse_line_in_many_reads_costs_what_one_read_costs():
    """Issue 14 item 6: a 4 MB line arriving in 4 KiB reads was joined to its growing tail on every
    read (quadratic: ~10x the single read's CPU). Measured as CPU time of this thread, with a
    generous bound; the figure is in the note."""
    line = b'data: {"answer": "' + b"x" * (4 * 1024 * 1024) + b'"}\n\n'
    reads = [line[i:i + 4096] for i in range(0, len(line), 4096)]

    def cpu(pieces):
        best = float("inf")
        for _ in range(3):
            started = time.thread_time()
            assert len(decode(pieces)[1][0]["answer"]) == 4 * 1024 * 1024
            best = min(best, time.thread_time() - started)
        return best

    whole, split = cpu([line]), cpu(reads)
    assert split < 3 * whole + 0.02, f"{len(reads)} reads: {split * 1000:.1f} ms of CPU, one read: {whole * 1000:.1f} ms"


def test_data_that_is_not_a_json_object_is_malformed():
    for body in (b"data: [1, 2]\n\n", b"data: {nope\n\n"):
        with pytest.raises(DifyMalformed):
            decode([body])
