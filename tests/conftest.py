"""Test harness: the fake Dify and the real proxy on one event loop in a background thread.

The tests themselves run in the main thread and talk to both over loopback, with the real
`openai` client or raw HTTP, exactly as a user's client would.
"""

import asyncio
import http.client
import json
import os
import sys
import threading

import openai
import pytest
from hypothesis import settings as hypothesis_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from config import settings_from  # noqa: E402
from fake_dify import FakeApp, FakeDify  # noqa: E402
from main import start  # noqa: E402

from support import CLIENT_KEY, OTHER_CLIENT_KEY, offline_resolver  # noqa: E402

# CI replays the same generated examples every run, so a landing is judged on the code, not on the
# draw; developers' runs keep exploring new examples (and store failures in .hypothesis/).
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


class LoopThread:
    """An asyncio loop running forever in a daemon thread; `run` executes a coroutine on it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout=30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, function, *args):
        async def call():
            return function(*args)
        return self.run(call())


@pytest.fixture(scope="session")
def loop():
    return LoopThread()


def default_apps():
    return [
        FakeApp(key="app-chat0000000000000000000000", name="Chat Bot", mode="chat"),
        FakeApp(key="app-agent000000000000000000000", name="Agent Bot", mode="agent-chat"),
        FakeApp(key="app-flow0000000000000000000000", name="Flow Bot", mode="advanced-chat"),
    ]


class Harness:
    """A fake Dify plus a proxy in front of it, with helpers to talk to the proxy."""

    def __init__(self, loop, dify, proxy, server, port):
        self.loop = loop
        self.dify = dify
        self.proxy = proxy
        self.server = server
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def client(self, key=CLIENT_KEY, **kwargs):
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 20)
        return openai.OpenAI(base_url=self.base_url, api_key=key, **kwargs)

    def key_of(self, name):
        return next(app.key for app in self.dify.apps if app.name == name)

    def served(self, model_id):
        """The App the proxy serves as `model_id` now, or None."""
        return next((app for app in self.proxy.registry.all() if app.model_id == model_id), None)

    def raw(self, method, path, body=None, headers=None, key=CLIENT_KEY, timeout=20):
        """(status, headers, body bytes) of one raw HTTP exchange with the proxy."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        all_headers = {"Authorization": f"Bearer {key}"} if key else {}
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def chat_bodies(self):
        """What the proxy sent Dify for chats (not the mode probes it sends apps whose /info has no mode)."""
        return [r.json for r in self.dify.requests_to("/chat-messages")
                if (r.json or {}).get("user") != "opendify-mode-probe"]


DIFY_PROFILES = ("1.13", "0.11")


def pytest_generate_tests(metafunc):
    """Tests marked `real_difies` run once per real-Dify profile of the fake (see fake_dify.PROFILES);
    the others run against the fake as written from the documentation."""
    if "dify_profile" in metafunc.fixturenames and metafunc.definition.get_closest_marker("real_difies"):
        metafunc.parametrize("dify_profile", DIFY_PROFILES, ids=[f"dify{name}" for name in DIFY_PROFILES])


@pytest.fixture
def dify_profile():
    return None


@pytest.fixture
def make_harness(loop, dify_profile):
    """Builds a harness; keyword arguments override settings (as env names) or pass apps/fake options;
    `listed=False` skips waiting for the first model listing."""
    made = []

    def make(apps=None, env=None, listed=True, **fake_options):
        fake_options.setdefault("profile", dify_profile)
        dify = FakeDify(apps or default_apps(), **fake_options)
        loop.run(dify.start())
        settings = settings_from({
            "DIFY_API_KEYS": ",".join(app.key for app in dify.apps),
            "DIFY_API_BASE": dify.base_url,
            "VALID_API_KEYS": f"{CLIENT_KEY},{OTHER_CLIENT_KEY}",
            "SERVER_PORT": "0",
            **(env or {}),
        })

        async def boot():
            server, proxy, port = start(settings)
            proxy.uploads.guard.resolve = offline_resolver
            if listed:  # else the test meets the proxy as a client right after start-up does
                await proxy.registry.refresh()
            return server, proxy, port

        server, proxy, port = loop.run(boot())
        harness = Harness(loop, dify, proxy, server, port)
        made.append(harness)
        return harness

    yield make

    async def shutdown(harness):
        harness.server.stop()
        harness.proxy.close()
        await harness.dify.stop()

    for harness in made:
        loop.run(shutdown(harness))


@pytest.fixture
def harness(make_harness):
    return make_harness()

