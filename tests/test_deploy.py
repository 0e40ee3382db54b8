"""deploy/ checked where it can be here, and two instances behind nginx (the Debian package; .ci/run installs it).

The systemd unit goes through `systemd-analyze verify`, the nginx site through `nginx -t`, the compose
snippet is parsed; the container image is not built (no Docker engine here). The scale-out test runs
nginx with a temporary prefix in front of two `python main.py` instances, using the same proxy
directives as the shipped site (deploy/nginx/opendify-proxy.conf)."""

import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import openai
import pytest
import yaml

import marks
from config import settings_from
from conftest import default_apps
from fake_dify import End, FakeDify, Hang, Start, Text
from processes import ProxyProcess, RawStream, free_port
from support import CLIENT_KEY, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
CHAT = "Chat Bot"


def run(*args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kwargs)


# --- the files ----------------------------------------------------------------------------------

def test_systemd_unit_verifies(tmp_path):
    unit = open(os.path.join(DEPLOY, "opendify.service")).read()
    for line in ("Restart=on-failure", "LimitNOFILE=65536", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "User=opendify", "KillSignal=SIGTERM", "PrivateTmp=yes"):
        assert re.search(rf"^{re.escape(line)}$", unit, re.M), line
    # systemd-analyze checks that ExecStart exists: point it at this checkout, change nothing else.
    local = unit.replace("/opt/opendify/venv/bin/python", sys.executable).replace("/opt/opendify", ROOT)
    (tmp_path / "opendify.service").write_text(local)
    result = run("systemd-analyze", "verify", str(tmp_path / "opendify.service"))
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def self_signed(folder):
    cert, key = folder / "cert.pem", folder / "key.pem"
    result = run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                 "-keyout", str(key), "-out", str(cert))
    assert result.returncode == 0, result.stderr
    return cert, key


def nginx_main(folder, http_body):
    """A whole nginx.conf with everything under `folder` (pid, logs, temp files)."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (folder / sub).mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (f"{user}daemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {folder}/body;\n  proxy_temp_path {folder}/proxy;\n"
            f"  fastcgi_temp_path {folder}/fastcgi;\n  uwsgi_temp_path {folder}/uwsgi;\n"
            f"  scgi_temp_path {folder}/scgi;\n{http_body}\n}}\n")


def test_nginx_site_passes_nginx_t(tmp_path):
    cert, key = self_signed(tmp_path)
    site = open(os.path.join(DEPLOY, "nginx", "opendify.conf")).read()
    default = settings_from({"DIFY_API_KEYS": "app-x", "DIFY_API_BASE": "http://127.0.0.1/v1", "VALID_API_KEYS": "k"})
    assert re.search(r"client_max_body_size (\d+)m;", site).group(1) == str(default.max_request_bytes // 2 ** 20)
    site = (site.replace("/etc/letsencrypt/live/opendify.example.com/fullchain.pem", str(cert))
            .replace("/etc/letsencrypt/live/opendify.example.com/privkey.pem", str(key))
            .replace("snippets/opendify-proxy.conf", os.path.join(DEPLOY, "nginx", "opendify-proxy.conf")))
    (tmp_path / "nginx.conf").write_text(nginx_main(tmp_path, site))
    result = run("nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"))
    assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr
    assert "[warn]" not in result.stderr, result.stderr


def test_compose_snippet_reaches_difys_api_service():
    compose = yaml.safe_load(open(os.path.join(DEPLOY, "docker-compose.opendify.yaml")))
    service = compose["services"]["opendify"]
    assert service["environment"]["DIFY_API_BASE"] == "http://api:5001/v1" and service["depends_on"] == ["api"]
    assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert service["ulimits"]["nofile"]["hard"] >= 65536
    dockerfile = open(os.path.join(DEPLOY, "Dockerfile")).read()
    assert 'CMD ["python", "main.py"]' in dockerfile and "USER opendify" in dockerfile
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert any(name.endswith(".py") for name in os.listdir(ROOT)) if "*" in copied else \
            os.path.exists(os.path.join(ROOT, copied))


# --- two instances behind nginx -------------------------------------------------------------------

class Nginx:
    """nginx in front of the given ports, with the shipped proxy directives."""

    def __init__(self, folder, ports):
        self.port = free_port()
        servers = "".join(f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=10s;\n" for port in ports)
        body = (f"  upstream opendify {{\n    least_conn;\n{servers}    keepalive 8;\n  }}\n"
                f"  server {{\n    listen 127.0.0.1:{self.port};\n    client_max_body_size 40m;\n"
                f"    location / {{ include {DEPLOY}/nginx/opendify-proxy.conf; }}\n  }}")
        (folder / "nginx.conf").write_text(nginx_main(folder, body))
        self.popen = subprocess.Popen(["nginx", "-p", str(folder), "-c", str(folder / "nginx.conf")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.folder = folder

    def stop(self):
        self.popen.send_signal(signal.SIGQUIT)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()


@pytest.fixture
def behind_nginx(loop, tmp_path):
    dify = FakeDify(default_apps())
    loop.run(dify.start())
    instances = [ProxyProcess(dify, env={"CONVERSATION_MEMORY_MODE": "2", "KEEPALIVE_INTERVAL": "1"})
                 for _ in range(2)]
    nginx = Nginx(tmp_path, [instance.port for instance in instances])
    try:
        for instance in instances:
            instance.wait_ready()
        assert wait_for(lambda: ready_through(nginx), 15), (tmp_path / "error.log").read_text()
        yield dify, instances, nginx
    finally:
        nginx.stop()
        for instance in instances:
            instance.stop()
        loop.run(dify.stop())


def ready_through(nginx):
    try:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{nginx.port}/v1", api_key=CLIENT_KEY, max_retries=0,
                             timeout=2).models.list() is not None
    except openai.APIError:
        return False


def served_by(instances, request_id):
    """The index of the instance whose access log has the request."""
    assert wait_for(lambda: any(request_id in instance.output() for instance in instances), 5)
    return next(i for i, instance in enumerate(instances) if request_id in instance.output())


def first_content_seconds(port):
    async def one():
        started = time.monotonic()
        stream = await RawStream.open(port, CHAT, "hi")
        await stream.read_until(b"quick answer")
        stream.close()
        return time.monotonic() - started
    return asyncio.run(one())


def test_two_instances_behind_nginx(behind_nginx):
    dify, instances, nginx = behind_nginx
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{nginx.port}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20)

    # A mode-2 conversation continues whichever instance serves each turn.
    messages, servers = [], []
    for turn in range(4):
        messages.append({"role": "user", "content": f"question {turn}"})
        raw = client.chat.completions.with_raw_response.create(model=CHAT, messages=messages)
        reply = raw.parse().choices[0].message.content
        servers.append(served_by(instances, raw.headers["x-request-id"]))
        assert marks.strip_marks(reply).strip() == f"Echo: question {turn}" if turn else True
        messages.append({"role": "assistant", "content": reply})
    assert set(servers) == {0, 1}, f"both instances served turns: {servers}"
    sent = [r.json for r in dify.requests_to("/chat-messages")]
    assert len(dify.conversations) == 1, "one Dify conversation for the whole chat"
    assert [body["query"] for body in sent[1:]] == ["question 1", "question 2", "question 3"]
    assert len({body["conversation_id"] for body in sent[1:]}) == 1 and sent[1]["conversation_id"]

    # Streams arrive unbuffered: the first words reach the client while Dify is still answering.
    dify.script(dify.apps[0].key, Start(), Text("first words"), Hang())

    async def first_words():
        stream = await RawStream.open(nginx.port, CHAT, "stream")
        received = await stream.read_until(b"first words", 10)
        stream.close()
        return received
    assert b"first words" in asyncio.run(first_words())
    assert wait_for(lambda: dify.stops, 10), "Dify was still answering: nginx held nothing back"
    # ... and their time to first token through nginx is within a few ms of direct.
    direct, through = [], []
    for _ in range(30):
        dify.script(dify.apps[0].key, Start(), Text("quick answer"), End())
    for _ in range(15):
        direct.append(first_content_seconds(instances[0].port))
        through.append(first_content_seconds(nginx.port))
    added = statistics.median(through) - statistics.median(direct)
    assert added < 0.05, f"nginx added {added * 1000:.1f} ms to the time to first token"

    # One instance killed mid-run: new requests are served by the other.
    instances[0].popen.kill()
    instances[0].popen.wait(10)
    for turn in range(6):
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": f"after {turn}"}])
        assert raw.parse().choices[0].message.content.startswith(f"Echo: after {turn}")
        assert served_by(instances, raw.headers["x-request-id"]) == 1
