"""Operations, in process: /health, /ready and /metrics as probes, scrapers and dashboards see them."""

import base64
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

import metrics
from fake_dify import Hang, HttpError, Start, Text
from support import CLIENT_KEY, wait_for

CHAT = "Chat Bot"
METRICS_KEY = "metrics-secret-key"
GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


@pytest.fixture(autouse=True)
def metrics_off_afterwards(monkeypatch):
    """The metrics a test's server turned on are process state: put back as they were (off) after it."""
    monkeypatch.setattr(metrics, "_metrics", metrics._metrics)


def samples(body):
    """{(sample name, sorted label items): value} of a Prometheus text exposition."""
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def scrape(harness):
    status, headers, body = harness.raw("GET", "/metrics", key=None, headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    return samples(body)


def test_health_answers_without_a_key_and_names_nothing(harness):
    status, headers, body = harness.raw("GET", "/health", key=None)
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = harness.raw("GET", "/ready", key=None)
    state = json.loads(body)
    assert status == 200 and state["status"] == "ready" and state["models"] == 3
    assert state["dify"]["reachable"] is True and state["dify"]["last_seen"].endswith("Z")
    assert 0 <= state["dify"]["seconds_since_seen"] < 60
    for app in harness.dify.apps:
        assert app.name.encode() not in body and app.key.encode() not in body


def test_ready_names_the_models_only_when_the_operator_allows(make_harness):
    harness = make_harness(env={"HEALTH_DETAILS": "on"})
    state = json.loads(harness.raw("GET", "/ready", key=None)[2])
    assert state["model_ids"] == ["Agent Bot", "Chat Bot", "Flow Bot"]
    assert not any(app.key in json.dumps(state) for app in harness.dify.apps)


def test_ready_is_503_with_the_reason_when_dify_stops_answering(harness):
    async def refresh_without_dify():
        await harness.dify.stop()
        await harness.proxy.registry.refresh()
    harness.loop.run(refresh_without_dify())
    status, _, body = harness.raw("GET", "/ready", key=None)
    state = json.loads(body)
    assert status == 503 and state["status"] == "not ready"
    assert state["reasons"] == ["Dify did not answer the latest model refresh"]
    assert state["dify"]["reachable"] is False and state["dify"]["last_seen"] is not None
    assert state["models"] == 3, "the last known apps are kept"
    assert harness.raw("GET", "/health", key=None)[0] == 200, "alive, though not ready"


def test_ready_is_503_before_any_model_is_loaded(make_harness):
    harness = make_harness()
    harness.proxy.registry._apps = {}
    harness.proxy.registry.reachable = False
    harness.proxy.registry.last_seen = None
    status, _, body = harness.raw("GET", "/ready", key=None)
    assert status == 503 and "no models loaded yet" in json.loads(body)["reasons"]


def test_metrics_are_off_unless_a_metrics_key_is_set(harness):
    status, _, body = harness.raw("GET", "/metrics", key=None)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_metrics_ask_for_their_own_key(make_harness):
    harness = make_harness(env={"METRICS_KEY": METRICS_KEY})
    assert harness.raw("GET", "/metrics", key=None)[0] == 401
    assert harness.raw("GET", "/metrics", key=CLIENT_KEY)[0] == 401, "a client key is not the metrics key"
    status, _, body = harness.raw("GET", "/metrics", key=METRICS_KEY)
    assert status == 200 and b"# TYPE opendify_open_streams gauge" in body


def test_metrics_count_what_the_proxy_did(make_harness):
    harness = make_harness(env={"METRICS_KEY": METRICS_KEY})
    client = harness.client()
    before = scrape(harness)
    assert before[("opendify_model_refresh_total", (("result", "ok"),))] >= 3
    assert before[("opendify_open_streams", ())] == 0

    stream = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage][0]
    message = {"role": "user", "content": [{"type": "text", "text": "what?"},
                                           {"type": "image_url", "image_url": {"url": "data:image/gif;base64,"
                                                                               + base64.b64encode(GIF).decode()}}]}
    client.chat.completions.create(model=CHAT, messages=[message])
    client.chat.completions.create(model=CHAT, messages=[message])
    harness.dify.script(harness.key_of(CHAT), HttpError(429, "rate_limit_error", "slow down"))
    harness.raw("POST", "/v1/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": "x"}]})
    harness.raw("POST", "/v1/chat/completions", {"model": "nonexistent", "messages": [{"role": "user", "content": "x"}]})

    after = scrape(harness)
    chat = (("endpoint", "/v1/chat/completions"), ("model", CHAT))
    assert after[("opendify_requests_total", chat + (("status", "200"),))] == 3
    assert after[("opendify_requests_total", chat + (("status", "429"),))] == 1
    unknown = (("endpoint", "/v1/chat/completions"), ("model", "-"), ("status", "404"))
    assert after[("opendify_requests_total", unknown)] == 1, "a client's invented model name is not a series"
    assert after[("opendify_time_to_first_token_seconds_count", chat)] == 1
    assert after[("opendify_request_duration_seconds_count", chat)] == 4
    assert after[("opendify_tokens_total", (("direction", "out"), ("model", CHAT)))] >= usage.completion_tokens
    assert after[("opendify_tokens_total", (("direction", "in"), ("model", CHAT)))] >= usage.prompt_tokens > 0
    assert after[("opendify_upload_cache_total", (("result", "miss"),))] == 1
    assert after[("opendify_upload_cache_total", (("result", "hit"),))] == 1
    assert after[("opendify_dify_errors_total", (("kind", "http_429"),))] == 1
    assert after[("opendify_open_streams", ())] == 0
    models = (("endpoint", "/v1/models/{id}"), ("model", "-"), ("status", "200"))
    harness.client().models.retrieve(CHAT)
    assert scrape(harness)[("opendify_requests_total", models)] == 1, "path arguments are not series either"


def test_metrics_show_streams_open_now(make_harness):
    harness = make_harness(env={"METRICS_KEY": METRICS_KEY})
    harness.dify.script(harness.key_of(CHAT), Start(), Text("first words"), Hang())
    stream = harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}],
                                                      stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    assert scrape(harness)[("opendify_open_streams", ())] == 1
    stream.close()
    assert wait_for(lambda: harness.dify.stops, 5)
    assert wait_for(lambda: scrape(harness)[("opendify_open_streams", ())] == 0, 5)
