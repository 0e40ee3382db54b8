"""Operations endpoints that need no client key: liveness, readiness, and Prometheus metrics.

Paths follow the common convention of load balancers and Kubernetes probes: GET /health is
the liveness check (200 whenever the process serves HTTP; nothing is computed), GET /ready
the readiness check (200 once models are loaded and Dify answered the latest model refresh,
503 otherwise and while shutting down). Neither names a model unless HEALTH_DETAILS=on, and
neither ever shows a key. GET /metrics exists only when METRICS_KEY is set, and asks for it.
"""

import datetime
import time

import metrics
from errors import APIError, generic
from handlers import BaseHandler


class OpenHandler(BaseHandler):
    """Answers without a client key (probes and scrapers have none)."""

    probe = True  # logged at DEBUG: load balancers and scrapers ask every few seconds

    def prepare(self):
        pass


class LiveHandler(OpenHandler):
    def get(self):
        self.write_json({"status": "ok"})

    head = get


class ReadyHandler(OpenHandler):
    def get(self):
        state = readiness(self.proxy)
        self.set_status(200 if state["status"] == "ready" else 503)
        self.write_json(state)


def readiness(proxy):
    """The readiness view: whether to send this instance traffic, and why not."""
    registry = proxy.registry
    reasons = []
    if proxy.draining:
        reasons.append("shutting down")
    if not registry.all():
        reasons.append("no models loaded" + (" yet" if registry.last_seen is None else ""))
    if not registry.reachable:
        reasons.append("Dify did not answer the latest model refresh")
    dify = {"reachable": registry.reachable, "last_seen": None, "seconds_since_seen": None}
    if registry.last_seen is not None:
        dify["last_seen"] = datetime.datetime.fromtimestamp(registry.last_seen, datetime.timezone.utc).isoformat(
            timespec="seconds").replace("+00:00", "Z")
        dify["seconds_since_seen"] = round(time.time() - registry.last_seen, 1)
    state = {"status": "not ready" if reasons else "ready", "models": len(registry.all()), "dify": dify}
    if reasons:
        state["reasons"] = reasons
    if proxy.settings.health_details:
        state["model_ids"] = sorted(app.model_id for app in registry.all())
    return state


class MetricsHandler(OpenHandler):
    """GET /metrics for Prometheus, with `Authorization: Bearer <METRICS_KEY>`; 404 when metrics are off."""

    def prepare(self):
        key = self.proxy.settings.metrics_key
        if not key:
            raise generic(404, "")
        if not metrics.authorized(self.request.headers.get("Authorization"), key):
            raise APIError(401, "Missing or wrong metrics key: send 'Authorization: Bearer <METRICS_KEY>'.",
                           code="invalid_api_key")

    def get(self):
        body, content_type = metrics.exposition()
        self.set_header("Content-Type", content_type)
        self.finish(body)


def routes():
    return [
        (r"/health", LiveHandler),
        (r"/ready", ReadyHandler),
        (r"/metrics", MetricsHandler),
    ]
