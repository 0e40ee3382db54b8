"""The access log: one line per request, and the request metrics recorded from the same place.

Separate from the handlers because it runs for every request Tornado answers (its `log_function`),
whichever handler took it, and it is where a request's id, status, duration, model and tokens
meet. Keys, prompts and conversation ids are never in the line.
"""

import logging
import time
from urllib.parse import unquote

import metrics
from handlers import NotFoundHandler

access_log = logging.getLogger("opendify.access")


def log_request(handler):
    """One access line per request: id, method, path, status, duration, model, tokens. No keys, no prompts."""
    status = handler.get_status()
    duration = 1000.0 * (time.monotonic() - getattr(handler, "started", time.monotonic()))
    model = getattr(handler, "model", None)
    tokens = getattr(handler, "tokens", None)
    token_text = (f" tokens={tokens.get('prompt_tokens', 0)}+{tokens.get('completion_tokens', 0)}"
                  if tokens else "")
    error = getattr(handler, "error_code", None)
    level = logging.INFO if status < 500 else logging.WARNING
    if getattr(handler, "probe", False) and status in (200, 503):
        level = logging.DEBUG  # load balancers ask every few seconds; "not ready" is an answer, not a failure
    metrics.request_done(model_label(handler), endpoint_label(handler), status, duration / 1000, tokens)
    access_log.log(level, "%s %s %s %d %.1fms%s%s%s", getattr(handler, "request_id", "-"), handler.request.method,
                   handler.request.path, status, duration, f" model={model!r}" if model else "", token_text,
                   f" error={error}" if error else "")


def endpoint_label(handler):
    """The route a request took, with its path arguments as placeholders (a bounded set of values)."""
    if isinstance(handler, NotFoundHandler):
        return "other"
    path = unquote(handler.request.path)
    for argument in handler.path_args or ():
        path = path.replace(argument, "{id}")
    return path


def model_label(handler):
    """The served model the request named, else "-": a client's invented names must not each become a series."""
    app = getattr(handler, "app", None)
    return app.model_id if app is not None else "-"
