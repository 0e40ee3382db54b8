"""errors.py: Dify's failures said as OpenAI errors."""

import pytest

from dify_client import DifyBusy, DifyDropped, DifyError, DifyMalformed, DifyTimeout, DifyUnreachable
from errors import from_dify, from_dify_failure


def test_dify_key_rejection_is_a_server_problem_naming_the_model():
    error = from_dify(401, "unauthorized", "Access token is invalid", "Chat Bot")
    assert error.status_code == 502 and "Chat Bot" in error.message and error.headers()["x-should-retry"] == "false"


@pytest.mark.parametrize("status, code, expected_status, retry", [
    (429, "too_many_requests", 429, "true"),
    (400, "provider_quota_exceeded", 429, "false"),
    (400, "app_unavailable", 502, "false"),
    (400, "completion_request_error", 502, "false"),
    (400, "invalid_param", 400, None),
    (500, "internal_server_error", 502, None),
    (503, "unknown", 503, "true"),
])
def test_dify_error_mapping(status, code, expected_status, retry):
    error = from_dify(status, code, "detail", "m")
    assert error.status_code == expected_status
    assert error.headers().get("x-should-retry") == retry
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("failure, status, code, label, words", [
    (DifyUnreachable("connection refused"), 502, "upstream_unreachable", "unreachable", "connection refused"),
    (DifyTimeout("sent nothing for 90 s", 90), 504, "upstream_timeout", "timeout", "90 s"),
    (DifyBusy("all 5 connections to Dify stayed in use for 10 s", 5), 503, "dify_connections_busy", "busy",
     "DIFY_MAX_CONNECTIONS (now 5)"),
    (DifyMalformed("sent data that is not JSON"), 502, "upstream_error", "malformed", "not JSON"),
    (DifyDropped("Connection reset by peer"), 502, "upstream_error", "dropped", "before the answer was complete"),
    (DifyError(429, "too_many_requests", "slow down"), 429, "rate_limit_exceeded", "http_429", "slow down"),
])
def test_every_dify_failure_has_one_mapping_and_keeps_its_metric_label(failure, status, code, label, words):
    error = from_dify_failure(failure, "Chat Bot")
    assert (error.status_code, error.code, failure.label) == (status, code, label)
    assert words in error.message


def test_difys_own_retry_after_is_kept_when_the_mapping_sets_none():
    assert from_dify_failure(DifyError(502, "bad_gateway", "x", retry_after="7"), "m").retry_after == "7"
    assert from_dify_failure(DifyError(429, "too_many_requests", "x", retry_after="7"), "m").retry_after == 2

