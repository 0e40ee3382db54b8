"""OpenAI-shaped errors, and how Dify's failures map onto them.

Every failure the proxy reports, before or during a stream, is an `APIError`: the HTTP
status, the OpenAI error body, and the retry hints SDKs obey. SDKs retry 408/409/429/5xx
twice by default, which re-runs the Dify app, so deterministic failures say
`x-should-retry: false`.
"""

from tornado.web import HTTPError

from dify_client import DifyBusy, DifyError, DifyMalformed, DifyTimeout, DifyUnreachable


class APIError(HTTPError):
    def __init__(self, status, message, type="invalid_request_error", code=None, param=None,
                 retry=None, retry_after=None, headers=None):
        super().__init__(status)
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry = retry
        self.retry_after = retry_after
        self.extra_headers = headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self):
        headers = dict(self.extra_headers)
        if self.retry is not None:
            headers["x-should-retry"] = "true" if self.retry else "false"
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return headers

    def __str__(self):
        return f"{self.status_code} {self.code or self.type}: {self.message}"


def bad_request(message, param=None, code=None):
    return APIError(400, message, param=param, code=code)


def unauthorized(message):
    """A 401 with the challenge RFC 9110 requires: the scheme the client must use."""
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="OpenDify"'})


def generic(status, reason):
    """Tornado's own errors (unknown route, wrong method, crashes) in OpenAI shape."""
    if status == 404:
        return APIError(404, "Unknown URL. This server speaks the OpenAI API under /v1 "
                             "(GET /v1/models, POST /v1/chat/completions, POST /v1/responses).", code="not_found")
    if status == 405:
        return APIError(405, f"Method not allowed here ({reason}).", code="method_not_allowed")
    if status < 500:
        return APIError(status, reason or "Bad request.")
    return APIError(status, "The proxy failed while handling this request; see its log.", type="server_error",
                    code="internal_error")


# Dify codes that mean the app or its model provider is misconfigured: the caller cannot fix
# them and a retry re-runs the same failure.
_APP_MISCONFIGURED = {
    "app_unavailable", "not_chat_app", "not_workflow_app", "not_completion_app",
    "provider_not_initialize", "model_currently_not_support", "forbidden",
}


def from_dify(status, code, message, model):
    """Maps a Dify error envelope (status, code, message) to what the OpenAI client should see."""
    where = f"Dify app for model '{model}'"
    if status == 401:
        return APIError(502, f"The {where} rejected the proxy's Dify API key; the server's DIFY_API_KEYS "
                             "needs fixing (this is not your key's fault).",
                        type="server_error", code="upstream_auth_failed", retry=False)
    if code in _APP_MISCONFIGURED or status == 403:
        return APIError(502, f"The {where} is not usable: {message}", type="server_error",
                        code="upstream_app_unavailable", retry=False)
    if code == "provider_quota_exceeded" or code == "rate_limit_error":
        return APIError(429, f"The {where} has no model quota left: {message}", type="insufficient_quota",
                        code="insufficient_quota", retry=False)
    if status == 429:
        return APIError(429, f"The {where} is busy: {message}", type="rate_limit_error",
                        code="rate_limit_exceeded", retry=True, retry_after=2)
    if code == "completion_request_error":
        return APIError(502, f"The model behind the {where} failed: {message}", type="server_error",
                        code="upstream_model_error", retry=False)
    if status == 404:
        return APIError(404, f"{where}: {message}", code="not_found")
    if status == 413:
        return APIError(413, f"{where}: {message or 'file too large'}", code="file_too_large")
    if status == 415:
        return APIError(415, f"{where}: {message or 'file type not allowed'}", code="unsupported_file_type")
    if 400 <= status < 500:
        return APIError(400, f"{where} refused the request: {message}", code=code or "upstream_bad_request")
    if status == 503:
        return APIError(503, f"The {where} is overloaded: {message}", type="server_error",
                        code="upstream_overloaded", retry=True, retry_after=5)
    return APIError(502, f"The {where} failed: {message}", type="server_error", code="upstream_error")


def run_failed(model, detail):
    """A failed chatflow or workflow run: the app's own error text; retrying re-runs the same failure."""
    return APIError(502, f"The Dify app for model '{model}' failed: {detail or 'no detail'}", type="server_error",
                    code="workflow_failed", retry=False)


def upstream_unreachable(model, detail):
    return APIError(502, f"Cannot reach the Dify app for model '{model}': {detail}", type="server_error",
                    code="upstream_unreachable", retry_after=2)


def dify_busy(limit, detail):
    """Every connection slot to Dify stayed taken: the proxy's own limit, not Dify's answer."""
    return APIError(503, f"The proxy is at its limit of simultaneous requests to Dify ({detail}); retry shortly, "
                         f"or raise DIFY_MAX_CONNECTIONS (now {limit}).", type="server_error",
                    code="dify_connections_busy", retry=True, retry_after=1)


def upstream_timeout(model, seconds):
    return APIError(504, f"The Dify app for model '{model}' sent nothing for {seconds:g} s; giving up.",
                    type="server_error", code="upstream_timeout")


def upstream_broken(model, detail):
    return APIError(502, f"The Dify app for model '{model}' {detail}.", type="server_error",
                    code="upstream_error")


def from_dify_failure(failure, model):
    """The one mapping of a Dify failure (dify_client's DifyFailure hierarchy) to what the OpenAI
    client sees; Dify's own Retry-After is kept when the mapping sets none."""
    if isinstance(failure, DifyError):
        error = from_dify(failure.status, failure.code, failure.message, model)
        if failure.retry_after and error.retry_after is None:
            error.retry_after = failure.retry_after
        return error
    if isinstance(failure, DifyUnreachable):
        return upstream_unreachable(model, failure.detail)
    if isinstance(failure, DifyTimeout):
        return upstream_timeout(model, failure.seconds)
    if isinstance(failure, DifyBusy):
        return dify_busy(failure.limit, failure.detail)
    if isinstance(failure, DifyMalformed):
        return upstream_broken(model, failure.detail)
    return upstream_broken(model, "closed the connection before the answer was complete")
