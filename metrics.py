"""Prometheus metrics: what the proxy counts, and GET /metrics in the text format.

Off unless METRICS_KEY is set: then nothing is created and every recording function returns
at once. The rest of the proxy calls the small functions below from one clear place each
(the access log line, the stream relay, the error mapping, the upload cache, the model
refresh); nothing else knows about prometheus_client.

With WORKERS > 1 every worker writes its values to files in one directory
(prometheus_client's multi-process mode) and /metrics, whichever worker answers it, adds
up all of them. `main` makes that directory before forking and removes it at exit.
"""

import glob
import hmac
import logging
import os
import shutil
import tempfile

from identity import bearer_token

log = logging.getLogger("opendify.metrics")

DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# Seconds. Time to first token is short (Dify's queue, the model's first token); durations
# run from a fraction of a second to several minutes for agents and workflows.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)

_metrics = None  # the Metrics in use, or None when metrics are off


class Metrics:
    """The metric objects, created once per process (after the fork, so each worker writes its own files)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
        # prometheus_client picks file-backed values from the environment when it is first imported;
        # picking again here makes the choice follow PROMETHEUS_MULTIPROC_DIR whatever imported it first.
        values.ValueClass = values.get_value_class()
        self.multiprocess = bool(os.environ.get(DIR_VARIABLE))
        self.registry = CollectorRegistry()
        registry = None if self.multiprocess else self.registry
        self.requests = Counter("opendify_requests", "Requests answered, by model, endpoint and HTTP status.",
                                ["model", "endpoint", "status"], registry=registry)
        self.ttft = Histogram("opendify_time_to_first_token_seconds",
                              "Streams: seconds from the request to the first answer text sent.",
                              ["model", "endpoint"], buckets=TTFT_BUCKETS, registry=registry)
        self.duration = Histogram("opendify_request_duration_seconds", "Seconds from the request to its last byte.",
                                  ["model", "endpoint"], buckets=DURATION_BUCKETS, registry=registry)
        self.open_streams = Gauge("opendify_open_streams", "Event streams open now.", registry=registry,
                                  multiprocess_mode="livesum")
        self.dify_errors = Counter("opendify_dify_errors", "Dify failures reported to clients, by kind "
                                   "(http_<status>, unreachable, timeout, malformed, dropped).", ["kind"],
                                   registry=registry)
        self.uploads = Counter("opendify_upload_cache", "Attachment uploads: served from the cache (hit) or "
                               "uploaded to Dify (miss).", ["result"], registry=registry)
        self.tokens = Counter("opendify_tokens", "Tokens by model and direction (in: prompt, out: completion), as "
                              "Dify reported them or estimated.", ["model", "direction"], registry=registry)
        self.refreshes = Counter("opendify_model_refresh", "Dify app descriptions fetched for the model list, by "
                                 "result (ok, failed).", ["result"], registry=registry)
        self.open_streams.set(0)

    def exposition(self):
        """(body, content type) of the text format: this process's values, or every worker's."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


def shared_directory():
    """Before forking workers: the directory their values go to. PROMETHEUS_MULTIPROC_DIR when the
    operator set it (emptied: values of an earlier run must not be added in), else a new temporary
    one. Returns (path, whether main made it and must remove it)."""
    given = os.environ.get(DIR_VARIABLE)
    if given:
        os.makedirs(given, exist_ok=True)
        for path in glob.glob(os.path.join(given, "*.db")):
            os.remove(path)
        return given, False
    path = tempfile.mkdtemp(prefix="opendify-metrics-")
    os.environ[DIR_VARIABLE] = path
    return path, True


def remove_directory(path):
    shutil.rmtree(path, ignore_errors=True)


def enable():
    """In each serving process, when METRICS_KEY is set: creates the metrics. A worker that replaces one
    that died also drops the dead one's open-stream count (its other values still add up)."""
    global _metrics
    directory = os.environ.get(DIR_VARIABLE)
    if directory:
        from prometheus_client import multiprocess
        for path in glob.glob(os.path.join(directory, "gauge_livesum_*.db")):
            pid = int(path.rsplit("_", 1)[1][:-3])
            if pid != os.getpid() and not _alive(pid):
                multiprocess.mark_process_dead(pid, directory)
    _metrics = Metrics()
    return _metrics


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def authorized(header, key):
    """Whether an Authorization header carries the metrics key (compared in constant time)."""
    return hmac.compare_digest(bearer_token(header).encode(), key.encode())


def exposition():
    return _metrics.exposition()


def request_done(model, endpoint, status, seconds, tokens):
    """From the access log line: one finished request."""
    metrics = _metrics
    if metrics is None:
        return
    model = model or "-"
    metrics.requests.labels(model, endpoint, str(status)).inc()
    metrics.duration.labels(model, endpoint).observe(seconds)
    if tokens:
        metrics.tokens.labels(model, "in").inc(tokens.get("prompt_tokens") or 0)
        metrics.tokens.labels(model, "out").inc(tokens.get("completion_tokens") or 0)


def first_token(model, endpoint, seconds):
    metrics = _metrics
    if metrics is not None:
        metrics.ttft.labels(model or "-", endpoint).observe(seconds)


def stream_opened():
    if _metrics is not None:
        _metrics.open_streams.inc()


def stream_closed():
    if _metrics is not None:
        _metrics.open_streams.dec()


def dify_error(kind):
    if _metrics is not None:
        _metrics.dify_errors.labels(kind).inc()


def upload(hit):
    if _metrics is not None:
        _metrics.uploads.labels("hit" if hit else "miss").inc()


def model_refresh(ok, failed):
    metrics = _metrics
    if metrics is not None:
        if ok:
            metrics.refreshes.labels("ok").inc(ok)
        if failed:
            metrics.refreshes.labels("failed").inc(failed)
