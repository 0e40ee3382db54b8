"""What real Dify servers (1.13, 0.11) do that the proxy must live with: start-up, outages, odd
/info answers, apps whose mode old Dify does not say, slow starts, lost uploads.

Facts R1-R23: /work/shared/reference/dify-captures/README.md.
"""

import json
import logging
import socket
import time

import openai
import pytest

from conftest import default_apps
from fake_dify import FakeApp
from support import sse_comments, sse_events, wait_for

CHAT, AGENT, FLOW = "Chat Bot", "Agent Bot", "Flow Bot"


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- start-up and outages (issue 12 item 6) -------------------------------------------------

def test_models_listed_right_after_start_wait_for_the_first_info_round(make_harness):
    apps = [FakeApp(key=app.key, name=app.name, mode=app.mode, info_delay=0.4) for app in default_apps()]
    harness = make_harness(apps=apps, listed=False)
    started = time.monotonic()
    status, _, body = harness.raw("GET", "/v1/models")
    assert status == 200 and sorted(m["id"] for m in json.loads(body)["data"]) == [AGENT, CHAT, FLOW]
    assert time.monotonic() - started < 2


def test_a_chat_right_after_start_finds_its_model(make_harness):
    apps = [FakeApp(key=app.key, name=app.name, mode=app.mode, info_delay=0.4) for app in default_apps()]
    harness = make_harness(apps=apps, listed=False)
    answer = harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "Echo: x"


def test_the_first_listing_wait_is_bounded(make_harness):
    apps = [FakeApp(key="app-slow000000000000000000000", name="Slow", info_delay=5)]
    harness = make_harness(apps=apps, listed=False)
    started = time.monotonic()
    status, _, body = harness.raw("GET", "/v1/models")
    assert status == 200 and json.loads(body)["data"] == [] and time.monotonic() - started < 3


def test_with_dify_unreachable_from_the_start_a_chat_says_so(make_harness):
    harness = make_harness(env={"DIFY_API_BASE": f"http://127.0.0.1:{closed_port()}/v1"}, listed=False)
    with pytest.raises(openai.InternalServerError) as caught:
        harness.client().chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 503 and caught.value.code == "upstream_unreachable"
    assert "Dify cannot be reached" in caught.value.message and "DIFY_API_KEYS" not in caught.value.message
    assert caught.value.response.headers["retry-after"] == "2"


def test_when_dify_goes_away_the_last_known_apps_stay_listed(make_harness):
    harness = make_harness()
    harness.loop.run(harness.dify.stop())
    harness.loop.run(harness.proxy.registry.refresh())
    status, _, body = harness.raw("GET", "/v1/models")
    assert sorted(m["id"] for m in json.loads(body)["data"]) == [AGENT, CHAT, FLOW]
    client = harness.client()
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 502 and caught.value.code == "upstream_unreachable"
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="Renamed Bot", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 503 and "Dify cannot be reached" in caught.value.message


# --- odd /info answers never stop the refreshes (issue 14 item 4) ---------------------------

@pytest.mark.parametrize("odd", [["Chat Bot"], "a string"])
def test_an_odd_info_answer_does_not_stop_model_refreshes(make_harness, odd, caplog):
    apps = default_apps()
    apps[0].info_body = odd
    harness = make_harness(apps=apps, env={"MODEL_REFRESH_INTERVAL": "1"}, listed=False)
    with caplog.at_level(logging.ERROR):
        assert wait_for(lambda: harness.proxy.registry.rounds >= 1)
    assert CHAT not in [app.model_id for app in harness.proxy.registry.all()]
    assert "not an object" in caplog.text
    apps[0].info_body = None
    assert wait_for(lambda: harness.served(CHAT) is not None, timeout=5)
    assert not harness.proxy.refresher.done()


def test_the_refresher_survives_an_unexpected_failure(make_harness, caplog, monkeypatch):
    harness = make_harness(env={"MODEL_REFRESH_INTERVAL": "1"})
    registry = harness.proxy.registry
    rounds = registry.rounds
    real = registry._refresh

    async def broken():
        monkeypatch.setattr(registry, "_refresh", real)
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(registry, "_refresh", broken)
    with caplog.at_level(logging.ERROR):
        assert wait_for(lambda: registry.rounds > rounds, timeout=5)
    assert "something nobody expected" in caplog.text and not harness.proxy.refresher.done()


# --- apps whose mode Dify before 1.4 does not say (issue 12 item 5, R14) ---------------------

@pytest.mark.parametrize("dify_profile", ["0.11"])
def test_agent_and_chatflow_apps_are_recognised_without_a_mode_in_info(make_harness, dify_profile):
    harness = make_harness(apps=default_apps() + [
        FakeApp(key="app-writer00000000000000000000", name="Writer", mode="completion"),
        FakeApp(key="app-pipe0000000000000000000000", name="Pipeline", mode="workflow")])
    modes = {app.model_id: app.mode for app in harness.proxy.registry.all()}
    assert modes == {CHAT: "chat", AGENT: "agent-chat", FLOW: "advanced-chat", "Writer": "completion",
                     "Pipeline": "workflow"}


@pytest.mark.parametrize("dify_profile", ["0.11"])
def test_a_chat_app_with_the_new_file_setting_is_still_a_chat_app(make_harness, dify_profile):
    parameters = {"file_upload": {"enabled": True, "allowed_file_types": ["image"], "number_limits": 3,
                                  "image": {"enabled": True, "number_limits": 3}},
                  "sensitive_word_avoidance": {"enabled": False, "type": "", "configs": []},
                  "user_input_form": []}
    harness = make_harness(apps=[FakeApp(key="app-newchat000000000000000000", name="New", parameters=parameters)])
    assert harness.served("New").mode == "chat"


# --- slow starts (issue 12 item 4, R2) --------------------------------------------------------

SLOW_START = {"KEEPALIVE_INTERVAL": "0.2", "DIFY_IDLE_TIMEOUT": "1.5"}


@pytest.mark.parametrize("dify_profile", ["1.13"])
def test_a_run_queued_for_a_worker_gets_keepalives_and_is_not_cut(make_harness, dify_profile):
    harness = make_harness(env=SLOW_START)
    harness.dify.queue_delay = 1.2  # under DIFY_IDLE_TIMEOUT: one initial ping, then 1.2 s of nothing
    status, _, body = harness.raw("POST", "/v1/chat/completions", {
        "model": FLOW, "stream": True, "messages": [{"role": "user", "content": "wait"}]})
    assert status == 200 and len(sse_comments(body)) >= 3
    assert body.index(b": keep-alive") < body.index(b"Echo")
    events = sse_events(body)
    assert events[-1] == "[DONE]" and "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]) == "Echo: wait"


@pytest.mark.parametrize("dify_profile", ["1.13"])
def test_a_queue_longer_than_the_idle_timeout_ends_with_a_clear_error(make_harness, dify_profile):
    harness = make_harness(env=SLOW_START)
    harness.dify.queue_delay = 4
    started = time.monotonic()
    status, _, body = harness.raw("POST", "/v1/chat/completions", {
        "model": FLOW, "stream": True, "messages": [{"role": "user", "content": "wait"}]})
    assert 1.4 < time.monotonic() - started < 3.5
    assert status == 200 and sse_comments(body)
    error = sse_events(body)[-2]["error"]
    assert error["code"] == "upstream_timeout" and "1.5 s" in error["message"] and sse_events(body)[-1] == "[DONE]"


# --- the end of an answer (R10) ---------------------------------------------------------------

@pytest.mark.parametrize("dify_profile", ["1.13"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_ends_at_difys_terminal_event_not_at_its_late_end_of_response(make_harness, dify_profile, stream):
    harness = make_harness()
    harness.dify.end_linger = 3  # 1.13 keeps the response open for a while after workflow_finished
    started = time.monotonic()
    status, _, body = harness.raw("POST", "/v1/chat/completions", {
        "model": FLOW, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and time.monotonic() - started < 1.5
    assert (sse_events(body)[-1] == "[DONE]") if stream else json.loads(body)["choices"][0]["message"]["content"]


# --- inputs Dify 1.13 checks only in its worker (R1) -------------------------------------------

@pytest.mark.real_difies
@pytest.mark.parametrize("inputs, says", [({}, "needs the input"), ({"lang": 5}, "must be"),
                                          ({"lang": "x" * 49}, "at most 48")])
def test_inputs_a_chatflow_would_refuse_in_silence_are_refused_at_once(make_harness, inputs, says):
    form = [{"text-input": {"label": "Language", "variable": "lang", "required": True, "max_length": 48}}]
    harness = make_harness(apps=[FakeApp(key="app-strict0000000000000000000", name="Strict", mode="advanced-chat",
                                         parameters={"user_input_form": form})])
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as caught:
        harness.client(timeout=10).chat.completions.create(
            model="Strict", messages=[{"role": "user", "content": "x"}], stream=True, extra_body={"inputs": inputs})
    assert says in caught.value.message and caught.value.param == "inputs.lang"
    assert time.monotonic() - started < 2 and harness.chat_bodies() == []
