"""errors.py: Dify's failures said as OpenAI errors."""

import pytest

from errors import from_dify


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
