"""A scriptable fake of Dify's Service API, for OpenDify's tests.

The fake is a real HTTP server (Tornado, 127.0.0.1, ephemeral port) so the proxy is
exercised over real sockets: connection reuse, chunked SSE, partial writes and abrupt
closes all behave as they would against Dify. It follows
``/work/shared/reference/dify-service-api.md`` (paths, validation order, error
envelopes, SSE framing, event shapes and orders per app mode).

Each test builds a :class:`FakeDify` with one or more :class:`FakeApp` (one API key per
app, as in Dify), starts it on an IOLoop (``await fake.start()``, or
:class:`FakeDifyThread` for a background thread) and optionally queues scripted runs with
:meth:`FakeDify.script`. A script is a list of steps (:class:`Text`, :class:`Event`,
:class:`Raw`, :class:`Sleep`, :class:`Ping`, :class:`End`, :class:`ErrorEvent`,
:class:`Drop`, :class:`Hang`, :class:`HttpError`, :class:`Start`, :class:`Silence`) consumed by the next
generation request that passes validation. Without a script the app answers a default
"Echo: <query>" run shaped like its mode.

``FakeDify(apps, profile="1.13" | "0.11")`` behaves like those real Dify versions where the
proxy can notice (see :class:`Profile`, and ``queue_delay`` / ``worker_silence`` / ``end_linger``
for the 1.13 worker's timing); without a profile it is the fake written from the documentation.

Everything received is recorded (:attr:`FakeDify.requests`, ``stops``, ``uploads``,
``conversations``). Recorded containers are only mutated on the loop thread; reading them
from the test thread is fine.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from uuid import uuid4

from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

__all__ = [
    "FakeApp",
    "FakeDify",
    "FakeDifyThread",
    "Recorded",
    "Upload",
    "Text",
    "Event",
    "Raw",
    "Sleep",
    "Ping",
    "End",
    "ErrorEvent",
    "Drop",
    "Hang",
    "HttpError",
    "Start",
    "Silence",
    "PROFILES",
    "Profile",
    "default_parameters",
    "versioned_parameters",
    "make_usage",
]

CHAT_MODES = ("chat", "agent-chat", "advanced-chat")
ALL_MODES = CHAT_MODES + ("completion", "workflow")
DEFAULT_USER = "DEFAULT-USER"
SERVER_VERSION = "1.12.1"
WORKER_MODES = ("advanced-chat", "workflow")
ABORTED = "Aborted: User requested stop"

# Events that belong to the workflow engine; in chatflows they also carry workflow_run_id.
_WORKFLOW_EVENT_PREFIXES = (
    "workflow_",
    "node_",
    "iteration_",
    "loop_",
    "parallel_branch_",
    "agent_log",
    "text_chunk",
    "human_input",
)
_TEXT_EVENTS = ("message", "agent_message", "message_file")
_PING = b"event: ping\n\n"


# --------------------------------------------------------------------------- data types


@dataclass
class FakeApp:
    """One Dify app reachable with one API key."""

    key: str
    name: str
    mode: str = "chat"
    info_has_mode: bool = True
    info_status: int = 200
    info_body: Any = None  # answer /info with exactly this JSON instead
    info_delay: float = 0.0  # seconds /info takes to answer
    parameters: dict | None = None
    app_id: str = field(default_factory=lambda: str(uuid4()))

    def __post_init__(self) -> None:
        if self.mode not in ALL_MODES:
            raise ValueError(f"unknown app mode {self.mode!r}")

    @property
    def workflow_id(self) -> str:
        """Stable id of the app's published workflow (chatflow/workflow events use it)."""
        return str(uuid.uuid5(uuid.UUID(self.app_id), "workflow"))

    def effective_parameters(self, style: str = "docs") -> dict:
        if self.parameters is not None:
            return copy.deepcopy(self.parameters)
        return versioned_parameters(self.mode, style)


@dataclass
class Recorded:
    """One request as the fake received it. ``path`` is relative to ``/v1``."""

    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    json: Any | None
    form: dict[str, str]
    files: list[tuple[str, str, bytes]]
    body: bytes = b""


@dataclass
class Upload:
    data: bytes
    filename: str
    mime: str
    user: str | None


# --------------------------------------------------------------------------- script steps


class Text:
    """One text event per piece (``message`` / ``agent_message`` / ``text_chunk`` by mode)."""

    def __init__(self, *pieces: str) -> None:
        self.pieces = pieces

    def __repr__(self) -> str:
        return f"Text{self.pieces!r}"


class Event:
    """Send this event; the mode's envelope fields are filled in only where missing."""

    def __init__(self, event: dict) -> None:
        if "event" not in event:
            raise ValueError("Event needs an 'event' key")
        self.event = event

    def __repr__(self) -> str:
        return f"Event({self.event!r})"


@dataclass
class Raw:
    """Write these exact bytes and flush (split characters/events, malformed data)."""

    data: bytes


@dataclass
class Sleep:
    """Pause; pings still go out on the ping interval, a stop call cuts it short."""

    seconds: float


@dataclass
class Ping:
    """Write ``event: ping\\n\\n`` now."""


@dataclass
class End:
    """The mode's terminal events (message_end / workflow_finished [+ message_end]).

    ``usage`` is merged over a full default LLMUsage (token counts you give also drive
    the default prices/total). ``status`` matters for workflow and chatflow apps only;
    ``error`` is the failure text for ``status="failed"``.
    """

    usage: dict | None = None
    outputs: dict | None = None
    status: str = "succeeded"
    error: str | None = None


@dataclass
class ErrorEvent:
    """A mid-stream ``error`` event (no task_id), then the stream ends."""

    code: str = "completion_request_error"
    status: int = 400
    message: str = "[openai_api_compatible] Error: fake upstream failure"


@dataclass
class Drop:
    """Close the TCP connection abruptly, no terminal event, no chunked trailer.

    ``delay`` lets bytes already written reach the client as their own read first:
    Tornado's HTTP client drops data that arrives in the same read as the EOF, which
    would hide the partial stream a drop test usually wants the proxy to see.
    """

    delay: float = 0.05


@dataclass
class Hang:
    """Stay open (pings only) until a stop call for this task or the client leaves."""


@dataclass
class HttpError:
    """Answer with a Dify error envelope instead of a stream; must precede any output."""

    status: int
    code: str
    message: str
    headers: dict[str, str] | None = None


@dataclass
class Start:
    """The mode's preamble as in the default run (workflow_started + a node pair for
    chatflow/workflow, an empty agent_thought for agent-chat, nothing otherwise)."""


@dataclass
class Silence:
    """Pause with no pings at all (a 1.13 run waiting for a free worker, R2)."""

    seconds: float


_STEP_TYPES = (Text, Event, Raw, Sleep, Ping, End, ErrorEvent, Drop, Hang, HttpError, Start, Silence)


# --------------------------------------------------------------------------- version profiles


@dataclass(frozen=True)
class Profile:
    """What one real Dify version does on the wire, where the proxy can notice (captures in
    /work/shared/reference/dify-captures, facts R1-R23 of its README). ``docs`` is the fake as it
    was written from the documentation (1.12.1) and stays the default."""

    name: str
    version: str
    json_style: str = "orjson"  # R11: SSE JSON
    compact_bodies: bool = False  # R11: JSON answers (errors, lists) without spaces
    chatflow_end_order: str = "workflow_first"  # R4
    worker_runs: bool = False  # R1/R2/R3: streaming chatflow/workflow runs go through a worker
    aborted_stops: bool = False  # R5: a stopped chatflow/workflow ends with a failed workflow_finished
    end_linger: float = 0.0  # R10: seconds the response stays open after the terminal event
    info_has_mode: bool = True  # R13/R14: /info carries mode, tags, author_name
    reqparse_errors: bool = False  # R15: validation errors {code, message, params}, no status
    usage_style: str = "docs"  # R12: "1.13" (no LLM in a flow: zeros, "0.0"), "0.11" ("0E-7")
    empty_final_text: bool = False  # R22: an empty text event before the terminal ones
    parameters_style: str = "docs"  # R17: "1.13" or "0.11" file_upload and feature shapes
    extra_headers: tuple = ()  # R23


PROFILES = {
    "docs": Profile("docs", SERVER_VERSION),
    "1.13": Profile(
        "1.13", "1.13.2", json_style="orjson", compact_bodies=True, chatflow_end_order="message_first",
        worker_runs=True, aborted_stops=True, end_linger=1.0, usage_style="1.13", parameters_style="1.13",
        extra_headers=(("X-Version", "1.13.2"), ("X-Env", "PRODUCTION"), ("Vary", "Cookie")),
    ),
    "0.11": Profile(
        "0.11", "0.11.1", json_style="dumps", chatflow_end_order="workflow_first", info_has_mode=False,
        reqparse_errors=True, usage_style="0.11", empty_final_text=True, parameters_style="0.11",
        extra_headers=(("X-Version", "0.11.1"), ("X-Env", "PRODUCTION")),
    ),
}


# --------------------------------------------------------------------------- helpers


def default_parameters(mode: str = "chat") -> dict:
    """A realistic /parameters body (reference §5). Every input variable is optional so
    tests that send ``inputs: {}`` pass; pass ``FakeApp.parameters`` to require some."""
    form: list[dict] = [
        {"text-input": {"label": "City", "variable": "city", "required": False, "max_length": 48, "default": ""}},
        {"paragraph": {"label": "Notes", "variable": "notes", "required": False}},
        {"select": {"label": "Tone", "variable": "tone", "required": False, "options": ["formal", "casual"]}},
        {"number": {"label": "N", "variable": "n", "required": False}},
        {
            "file": {
                "label": "Doc",
                "variable": "doc",
                "required": False,
                "allowed_file_types": ["document"],
                "allowed_file_extensions": [],
                "allowed_file_upload_methods": ["local_file", "remote_url"],
            }
        },
    ]
    if mode in ("completion", "workflow"):
        # Such apps take their text from an input variable, not from `query`.
        form.insert(0, {"paragraph": {"label": "Query", "variable": "query", "required": False}})
    return {
        "opening_statement": "Hello!",
        "suggested_questions": [],
        "suggested_questions_after_answer": {"enabled": False},
        "speech_to_text": {"enabled": False},
        "text_to_speech": {"enabled": False, "voice": "", "language": "", "autoPlay": "disabled"},
        "retriever_resource": {"enabled": True},
        "annotation_reply": {"enabled": False},
        "more_like_this": {"enabled": False},
        "user_input_form": form,
        "sensitive_word_avoidance": {"enabled": False, "type": "", "configs": []},
        "file_upload": {
            "enabled": True,
            "allowed_file_types": ["image"],
            "allowed_file_extensions": [],
            "allowed_file_upload_methods": ["local_file", "remote_url"],
            "number_limits": 3,
            "image": {
                "enabled": True,
                "number_limits": 3,
                "detail": "high",
                "transfer_methods": ["remote_url", "local_file"],
            },
        },
        "system_parameters": {
            "image_file_size_limit": 10,
            "video_file_size_limit": 100,
            "audio_file_size_limit": 50,
            "file_size_limit": 15,
            "workflow_file_upload_limit": 10,
        },
    }


def versioned_parameters(mode: str, style: str) -> dict:
    """default_parameters in the shape a Dify version gives them (R17). 1.13: ``file_upload`` is
    the new shape without an ``image`` key. 0.11: apps configured by a model config (chat, agent,
    completion) have only the legacy ``image`` setting; workflow-based apps (chatflow, workflow)
    have the new shape plus 0.11's extra keys, and their features and form items are serialised
    from the workflow (``type``/``options`` in every form item, bare ``sensitive_word_avoidance``)."""
    parameters = default_parameters(mode)
    if style == "docs":
        return parameters
    upload = parameters["file_upload"]
    image = upload.pop("image")
    if style == "1.13":
        return parameters
    if mode not in WORKER_MODES:
        parameters["file_upload"] = {"image": {**image, "detail": "low", "transfer_methods": ["local_file", "remote_url"]}}
        parameters["text_to_speech"] = {"enabled": False}
        return parameters
    upload["allowed_file_extensions"] = [".JPG", ".JPEG", ".PNG", ".GIF", ".WEBP", ".SVG"]
    upload["allowed_upload_methods"] = list(upload["allowed_file_upload_methods"])
    upload["allowed_extensions"] = []
    parameters["sensitive_word_avoidance"] = {"enabled": False}
    parameters["text_to_speech"] = {"enabled": False, "language": "", "voice": ""}
    for item in parameters["user_input_form"]:
        kind, spec = next(iter(item.items()))
        spec["type"] = kind
        spec.setdefault("options", [])
    return parameters


def _zero_usage(style: str, latency: float) -> dict:
    """A run without an LLM: every count 0, prices "0.0" (R12)."""
    usage: dict[str, Any] = {}
    for side in ("prompt", "completion"):
        usage.update({f"{side}_tokens": 0, f"{side}_unit_price": "0.0", f"{side}_price_unit": "0.0",
                      f"{side}_price": "0.0"})
    usage.update({"total_tokens": 0, "total_price": "0.0", "currency": "USD", "latency": 0.0})
    if style == "1.13":
        usage.update({"time_to_first_token": round(latency, 3), "time_to_generate": 0.001})
    return usage


def _free_model_usage(prompt_tokens: int, completion_tokens: int, latency: float) -> dict:
    """0.11 with a model whose price is 0: Decimal zeros serialised as "0" and "0E-7" (R12)."""
    usage: dict[str, Any] = {}
    for side, tokens in (("prompt", prompt_tokens), ("completion", completion_tokens)):
        usage.update({f"{side}_tokens": tokens, f"{side}_unit_price": "0", f"{side}_price_unit": "0",
                      f"{side}_price": "0E-7"})
    usage.update({"total_tokens": prompt_tokens + completion_tokens, "total_price": "0E-7", "currency": "USD",
                  "latency": latency})
    return usage


_PROMPT_UNIT_PRICE = Decimal("0.0015")
_COMPLETION_UNIT_PRICE = Decimal("0.002")
_PRICE_UNIT = Decimal("0.001")


def _price(tokens: int, unit_price: Decimal) -> Decimal:
    return (Decimal(tokens) * unit_price * _PRICE_UNIT).quantize(Decimal("0.0000001"), ROUND_HALF_UP)


def make_usage(prompt_tokens: int, completion_tokens: int, latency: float = 0.5) -> dict:
    """Full LLMUsage as Dify serialises it: token counts ints, prices Decimal strings."""
    prompt_price = _price(prompt_tokens, _PROMPT_UNIT_PRICE)
    completion_price = _price(completion_tokens, _COMPLETION_UNIT_PRICE)
    return {
        "prompt_tokens": prompt_tokens,
        "prompt_unit_price": format(_PROMPT_UNIT_PRICE, "f"),
        "prompt_price_unit": format(_PRICE_UNIT, "f"),
        "prompt_price": format(prompt_price, "f"),
        "completion_tokens": completion_tokens,
        "completion_unit_price": format(_COMPLETION_UNIT_PRICE, "f"),
        "completion_price_unit": format(_PRICE_UNIT, "f"),
        "completion_price": format(completion_price, "f"),
        "total_tokens": prompt_tokens + completion_tokens,
        "total_price": format(prompt_price + completion_price, "f"),
        "currency": "USD",
        "latency": latency,
        "time_to_first_token": None,
        "time_to_generate": None,
    }


def _split3(text: str) -> list[str]:
    """Cut text into about three pieces so default runs stream more than one delta."""
    size = max(1, -(-len(text) // 3))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return False
    return True


class _ApiError(Exception):
    """A Dify error envelope to answer with (HTTP status == envelope status)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 params: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}
        self.params = params


def _invalid_param(message: str) -> _ApiError:
    return _ApiError(400, "invalid_param", message)


def _pydantic_error(model: str, field_name: str, msg: str, kind: str, value: Any) -> _ApiError:
    """Mimic the text of a pydantic ValidationError turned into invalid_param."""
    return _invalid_param(
        f"1 validation error for {model}\n{field_name}\n  {msg} "
        f"[type={kind}, input_value={value!r}, input_type={type(value).__name__}]"
    )


_NOT_FOUND_TEXT = (
    "The requested URL was not found on the server. If you entered the URL manually please check your "
    "spelling and try again."
)
_MODE_MISMATCH = "Please check if your app mode matches the right API route."
_APP_UNAVAILABLE = "App unavailable, please check your app configurations."
_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="api"'}

# Envelope used when /info is configured to fail with a given status.
_STATUS_ERRORS = {
    400: ("bad_request", "The browser (or proxy) sent a request that this server could not understand."),
    401: ("unauthorized", "Access token is invalid"),
    403: ("forbidden", "The app's API service has been disabled."),
    404: ("not_found", _NOT_FOUND_TEXT),
    429: ("too_many_requests", "Too many requests. Please try again later."),
    500: ("internal_server_error", "Internal Server Error, please contact support."),
    503: ("service_unavailable", "The server is temporarily unable to service your request."),
}


class _ClientGone(Exception):
    """The client closed the connection; stop producing output."""


# --------------------------------------------------------------------------- one run


class _Execution:
    """One generation request executing its script, streaming or blocking.

    In blocking mode the same steps run, but nothing is written: text is collected and
    the mode's blocking body (or error) is produced at the end.
    """

    def __init__(
        self,
        fake: FakeDify,
        handler: _DifyHandler,
        app: FakeApp,
        *,
        kind: str,
        user: str,
        query: str,
        inputs: dict,
        conversation_id: str | None,
        streaming: bool,
    ) -> None:
        self.fake, self.handler, self.app = fake, handler, app
        self.kind, self.user, self.query, self.inputs = kind, user, query, inputs
        self.conversation_id = conversation_id
        self.streaming = streaming
        self.task_id = str(uuid4())
        self.message_id = str(uuid4())
        self.workflow_run_id = str(uuid4())
        self.created_at = int(time.time())
        self.started_mono = time.monotonic()
        self.end_user_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{app.key}/{user}"))
        # What the run produced so far.
        self.text = ""
        self.message_row: dict | None = None  # the stored message of a chat run (GET /messages)
        self.text_events = 0
        self.ended = False  # terminal events already produced
        self.final: dict[str, Any] = {}  # status/usage/outputs/error of the terminal
        self.outcome = "ok"  # ok | error_event | failed_run | http_error | dropped | gone
        self.error: _ApiError | None = None
        # Stream state.
        self.started = False  # response headers sent
        self.at_boundary = True  # last byte written ends an SSE event
        self.stop_requested = False
        self.gone = False
        self.aborted = False
        self.thought_ids: dict[Any, str] = {}
        self._wake = asyncio.Event()
        interval = fake.ping_interval
        self._next_ping = asyncio.get_running_loop().time() + interval if interval and interval > 0 else None

    # ---- signals from outside (all on the loop thread)

    def request_stop(self) -> None:
        self.stop_requested = True
        self._wake.set()

    def client_went_away(self) -> None:
        self.gone = True
        self._wake.set()

    def abort(self) -> None:
        self.aborted = True
        self._wake.set()

    def _interrupted(self) -> bool:
        return self.stop_requested or self.gone or self.aborted

    # ---- running the script

    @property
    def in_worker(self) -> bool:
        """Whether Dify 1.13 runs this request in its Celery worker (streaming chatflow/workflow)."""
        return self.streaming and self.fake.profile.worker_runs and self.app.mode in WORKER_MODES

    async def run(self, steps: list) -> None:
        try:
            if self.in_worker:
                await self._write(_PING)  # R3: before anything else, from the API process
                if self.fake.queue_delay > 0:  # R2: no worker slot free yet, and no pings meanwhile
                    await self._quiet(self.fake.queue_delay)
                    self._restart_pings()
            for step in steps:
                if self._interrupted():
                    break
                if await self._do(step):
                    break
            if self.stop_requested and not self.ended and not (self.gone or self.aborted):
                await self._end(End(status="stopped"))
            if self.ended and self.streaming and self.fake.end_linger > 0:
                await self._quiet(self.fake.end_linger)  # R10: the end of the response comes late
        except _ClientGone:
            self.outcome = "gone"

    def _restart_pings(self) -> None:
        interval = self.fake.ping_interval
        if self._next_ping is not None:
            self._next_ping = asyncio.get_running_loop().time() + interval

    async def _quiet(self, seconds: float) -> None:
        """Wait without pings; a stop, a departed client or the fake stopping cuts it short."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self._interrupted() and loop.time() < deadline:
            try:
                await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                pass

    async def _do(self, step: Any) -> bool:
        """Execute one step; True means the run is over."""
        if isinstance(step, Text):
            for piece in step.pieces:
                await self.emit(self._text_event(piece))
        elif isinstance(step, Event):
            await self.emit(self._fill(step.event))
        elif isinstance(step, Raw):
            if self.streaming:
                await self._write(step.data)
                self.at_boundary = step.data.endswith(b"\n\n") if step.data else self.at_boundary
        elif isinstance(step, Sleep):
            await self._pause(step.seconds)
        elif isinstance(step, Ping):
            if self.streaming:
                await self._write(_PING)
                self.at_boundary = True
        elif isinstance(step, End):
            await self._end(step)
            return self.outcome == "failed_run"
        elif isinstance(step, Start):
            for event in self._preamble():
                await self.emit(event)
        elif isinstance(step, Hang):
            await self._pause(None)
        elif isinstance(step, Silence):
            await self._quiet(step.seconds)
            self._restart_pings()
        elif isinstance(step, ErrorEvent):
            self.outcome = "error_event"
            self.error = _ApiError(step.status, step.code, step.message)
            await self.emit(self._error_event(step.code, step.status, step.message))
            return True
        elif isinstance(step, Drop):
            self.outcome = "dropped"
            if step.delay > 0 and self.started:
                await asyncio.sleep(step.delay)
            self.handler.detach().close()
            return True
        elif isinstance(step, HttpError):
            if self.started:
                raise RuntimeError("HttpError must come before any streamed output")
            self.outcome = "http_error"
            self.error = _ApiError(step.status, step.code, step.message, step.headers)
            return True
        else:
            raise TypeError(f"not a script step: {step!r}")
        return False

    async def _pause(self, seconds: float | None) -> None:
        """Wait (None: until interrupted), sending pings on schedule when streaming.

        Pings are skipped while a Raw step left a partial event on the wire, so they
        never corrupt an event a test split on purpose.
        """
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        while not self._interrupted():
            now = loop.time()
            if deadline is not None and now >= deadline:
                return
            ping_at = self._next_ping if self.streaming else None
            if ping_at is not None and now >= ping_at:
                self._next_ping = ping_at + self.fake.ping_interval
                if self.at_boundary:
                    await self._write(_PING)
                continue
            wake_at = [t for t in (deadline, ping_at) if t is not None]
            timeout = min(wake_at) - now if wake_at else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def emit(self, event: dict) -> None:
        """Track text for blocking bodies/usage, and write the event when streaming."""
        name = event.get("event")
        if name in _TEXT_EVENTS and isinstance(event.get("answer"), str):
            self.text += event["answer"]
            self.text_events += 1
        elif name == "text_chunk" and isinstance(event.get("data"), dict):
            self.text += str(event["data"].get("text", ""))
            self.text_events += 1
        elif name == "message_replace":
            self.text = str(event.get("answer", ""))
        if self.message_row is not None:
            self.message_row["answer"] = self.text
        if self.streaming:
            await self._write(b"data: " + self.fake._encode(event) + b"\n\n")
            self.at_boundary = True

    async def _write(self, data: bytes) -> None:
        if self.gone or self.aborted:
            raise _ClientGone()
        if not self.started:
            self.started = True
            self.handler.set_status(200)
            self.handler.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.handler.write(data)
        try:
            await self.handler.flush()
        except StreamClosedError:
            self.gone = True
            raise _ClientGone() from None

    # ---- event builders

    def _envelope(self, name: str) -> dict:
        """Leading fields of an event for this mode, in Dify's key order (reference §3.1)."""
        mode = self.app.mode
        if mode == "workflow":
            env = {"event": name, "workflow_run_id": self.workflow_run_id, "task_id": self.task_id}
        elif mode == "completion":
            env = {"event": name, "message_id": self.message_id, "created_at": self.created_at, "task_id": self.task_id}
        else:
            env = {
                "event": name,
                "conversation_id": self.conversation_id,
                "message_id": self.message_id,
                "created_at": self.created_at,
                "task_id": self.task_id,
            }
            if mode == "advanced-chat" and name.startswith(_WORKFLOW_EVENT_PREFIXES):
                env["workflow_run_id"] = self.workflow_run_id
        if name == "error":
            env.pop("task_id")  # error events are built from the envelope only
        return env

    def _fill(self, body: dict) -> dict:
        if body["event"] == "agent_thought" and "id" not in body:
            # One id per round, reused by every update of that round (R22).
            body = {**body, "id": self.thought_ids.setdefault(body.get("position"), str(uuid4()))}
        out = self._envelope(body["event"])
        for key in out:
            if key in body:
                out[key] = body[key]
        for key, value in body.items():
            out.setdefault(key, value)
        return out

    def _text_event(self, piece: str) -> dict:
        mode = self.app.mode
        if mode == "workflow":
            return self._fill({"event": "text_chunk", "data": {"text": piece, "from_variable_selector": ["llm", "text"]}})
        if mode == "agent-chat":
            return self._fill({"event": "agent_message", "id": self.message_id, "answer": piece})
        name = "message_file" if self.fake.message_file_text else "message"
        selector = ["llm", "text"] if mode == "advanced-chat" else None
        return self._fill({"event": name, "id": self.message_id, "answer": piece, "from_variable_selector": selector})

    def _error_event(self, code: str, status: int, message: str) -> dict:
        return self._fill({"event": "error", "code": code, "status": status, "message": message})

    def _sys_inputs(self) -> dict:
        inputs = dict(self.inputs)
        if self.app.mode == "advanced-chat":
            inputs["sys.query"] = self.query
            inputs["sys.conversation_id"] = self.conversation_id
        inputs.update(
            {
                "sys.files": [],
                "sys.user_id": self.end_user_id,
                "sys.app_id": self.app.app_id,
                "sys.workflow_id": self.app.workflow_id,
                "sys.workflow_run_id": self.workflow_run_id,
            }
        )
        return inputs

    def _preamble(self) -> list[dict]:
        mode = self.app.mode
        if mode == "agent-chat":
            return [
                self._fill(
                    {
                        "event": "agent_thought",
                        "position": 1,
                        "thought": "",
                        "observation": "",
                        "tool": "",
                        "tool_labels": {},
                        "tool_input": "",
                        "message_files": [],
                    }
                )
            ] + ([self._fill({"event": "agent_message", "answer": ""})] if self.fake.profile.empty_final_text else [])
        if mode not in ("advanced-chat", "workflow"):
            return []
        node = {
            "id": str(uuid4()),
            "node_id": "1711528915811",
            "node_type": "start",
            "title": "Start",
            "index": 1,
            "predecessor_node_id": None,
            "inputs": dict(self.inputs),
            "inputs_truncated": False,
        }
        outputs = dict(self.inputs)
        if mode == "advanced-chat":
            outputs["sys.query"] = self.query
        started = {**node, "created_at": self.created_at, "extras": {}, "iteration_id": None, "loop_id": None,
                   "agent_strategy": None}
        finished = {
            **node,
            "process_data": None,
            "process_data_truncated": False,
            "outputs": outputs,
            "outputs_truncated": False,
            "status": "succeeded",
            "error": None,
            "elapsed_time": 0.01,
            "execution_metadata": None,
            "created_at": self.created_at,
            "finished_at": self.created_at,
            "files": [],
            "iteration_id": None,
            "loop_id": None,
        }
        return [
            self._fill(
                {
                    "event": "workflow_started",
                    "data": {
                        "id": self.workflow_run_id,
                        "workflow_id": self.app.workflow_id,
                        "inputs": self._sys_inputs(),
                        "created_at": self.created_at,
                    },
                }
            ),
            self._fill({"event": "node_started", "data": started}),
            self._fill({"event": "node_finished", "data": finished}),
        ]

    def _usage(self, override: dict | None) -> dict:
        style = self.fake.profile.usage_style
        latency = round(time.monotonic() - self.started_mono, 4)
        if override is None and style == "1.13" and self.app.mode in WORKER_MODES:
            return _zero_usage(style, latency)  # the 1.13 flows captured have no LLM node
        override = override or {}
        prompt = override.get("prompt_tokens", len(self.query.split()) or 1)
        completion = override.get("completion_tokens", self.text_events)
        if style == "0.11":
            usage = (_zero_usage(style, latency) if self.app.mode in WORKER_MODES and not override
                     else _free_model_usage(prompt, completion, latency))
        else:
            usage = make_usage(prompt, completion, latency)
        usage.update(override)
        return usage

    def _message_end(self, usage: dict) -> dict:
        if self.fake.profile.usage_style == "0.11":
            metadata: dict[str, Any] = {"usage": usage}
        else:
            metadata = {"annotation_reply": None, "retriever_resources": [], "usage": usage}
        return self._fill(
            {
                "event": "message_end",
                "id": self.message_id,
                "metadata": metadata,
                "files": [] if self.app.mode == "advanced-chat" else None,
            }
        )

    def _workflow_data(self, status: str, outputs: dict, error: str | None, usage: dict) -> dict:
        return {
            "id": self.workflow_run_id,
            "workflow_id": self.app.workflow_id,
            "status": status,
            "outputs": outputs,
            "error": error,
            "elapsed_time": usage["latency"],
            "total_tokens": usage["total_tokens"],
            "total_steps": 3,
        }

    def _workflow_finished(self, status: str, outputs: dict, error: str | None, usage: dict) -> dict:
        data = self._workflow_data(status, outputs, error, usage)
        data.update(
            {
                "created_by": {"id": self.end_user_id, "user": self.user},
                "created_at": self.created_at,
                "finished_at": int(time.time()),
                "exceptions_count": 0,
                "files": [],
            }
        )
        return self._fill({"event": "workflow_finished", "data": data})

    async def _end(self, step: End) -> None:
        """Produce the terminal events of the mode (reference §3.3)."""
        mode = self.app.mode
        usage = self._usage(step.usage)
        status = step.status
        error = step.error if step.error is not None else ("Fake workflow failure" if status == "failed" else None)
        default_key = "answer" if mode == "advanced-chat" else "text"
        outputs = step.outputs if step.outputs is not None else {default_key: self.text}
        if status == "stopped" and self.fake.profile.aborted_stops and mode in WORKER_MODES:
            # R5: 1.13 reports a stopped flow as a failed run, and a chatflow gets no message_end.
            self.ended = True
            outputs = step.outputs if step.outputs is not None else {default_key: self.text}
            self.final = {"status": "failed", "usage": usage, "outputs": outputs, "error": ABORTED}
            await self.emit(self._workflow_finished("failed", outputs, ABORTED, usage))
            return
        if self.fake.profile.empty_final_text and mode != "workflow" and status != "failed":
            await self.emit(self._text_event(""))  # R22
        self.ended = True
        self.final = {"status": status, "usage": usage, "outputs": outputs, "error": error}
        if mode in ("chat", "agent-chat", "completion"):
            await self.emit(self._message_end(usage))
        elif mode == "workflow":
            await self.emit(self._workflow_finished(status, outputs, error, usage))
        else:
            finished = self._workflow_finished(status, outputs, error, usage)
            if status == "failed":
                self.outcome = "failed_run"
                self.error = _invalid_param(f"Run failed: {error}")
                await self.emit(finished)
                await self.emit(self._error_event("invalid_param", 400, f"Run failed: {error}"))
                return
            ordered = [finished, self._message_end(usage)]
            if self.fake.chatflow_end_order == "message_first":
                ordered.reverse()
            for event in ordered:
                await self.emit(event)

    # ---- blocking result

    def blocking_body(self) -> dict:
        """The mode's blocking response (reference §2.1-2.3) from what the run produced.

        A script without End still gets a result, computed as End() would.
        """
        if not self.ended:
            key = "answer" if self.app.mode == "advanced-chat" else "text"
            self.final = {"status": "succeeded", "usage": self._usage(None), "outputs": {key: self.text}, "error": None}
        usage = self.final["usage"]
        if self.app.mode == "workflow":
            data = self._workflow_data(self.final["status"], self.final["outputs"], self.final["error"], usage)
            data.update({"created_at": self.created_at, "finished_at": int(time.time())})
            return {"task_id": self.task_id, "workflow_run_id": self.workflow_run_id, "data": data}
        body: dict[str, Any] = {
            "event": "message",
            "task_id": self.task_id,
            "id": self.message_id,
            "message_id": self.message_id,
        }
        if self.app.mode != "completion":
            body["conversation_id"] = self.conversation_id
        body.update(
            {
                "mode": self.app.mode,
                "answer": self.text,
                "metadata": {"annotation_reply": None, "retriever_resources": [], "usage": usage},
                "created_at": self.created_at,
            }
        )
        return body


# --------------------------------------------------------------------------- HTTP side


_ROUTES: list[tuple[re.Pattern, dict[str, str], bool]] = [
    (re.compile(p), methods, auth)
    for p, methods, auth in [
        (r"/", {"GET": "_welcome"}, False),
        (r"/chat-messages", {"POST": "_chat_messages"}, True),
        (r"/chat-messages/(?P<task_id>[^/]+)/stop", {"POST": "_stop_chat"}, True),
        (r"/completion-messages", {"POST": "_completion_messages"}, True),
        (r"/completion-messages/(?P<task_id>[^/]+)/stop", {"POST": "_stop_completion"}, True),
        (r"/workflows/run", {"POST": "_workflows_run"}, True),
        (r"/workflows/tasks/(?P<task_id>[^/]+)/stop", {"POST": "_stop_workflow"}, True),
        (r"/files/upload", {"POST": "_files_upload"}, True),
        (r"/info", {"GET": "_info"}, True),
        (r"/parameters", {"GET": "_parameters"}, True),
        (r"/meta", {"GET": "_meta"}, True),
        (r"/conversations", {"GET": "_list_conversations"}, True),
        (r"/messages", {"GET": "_list_messages"}, True),
        (r"/conversations/(?P<conversation_id>[^/]+)", {"DELETE": "_delete_conversation"}, True),
    ]
]


def _v1_subpath(path: str) -> str | None:
    if path == "/v1":
        return "/"
    if path.startswith("/v1/"):
        return path[3:]
    return None


class _DifyHandler(RequestHandler):
    """Single handler: routes by path itself so auth/404/405 ordering matches Flask."""

    def initialize(self, fake: FakeDify) -> None:
        self.fake = fake
        self.execution: _Execution | None = None
        self.set_default_headers()

    def compute_etag(self) -> None:
        return None

    def set_default_headers(self) -> None:
        fake = getattr(self, "fake", None)  # Tornado calls this once before initialize()
        for name, value in fake.profile.extra_headers if fake is not None else ():
            self.set_header(name, value)

    def _dumps(self, body: Any) -> str:
        if self.fake.profile.compact_bodies:
            return json.dumps(body, separators=(",", ":"))
        return json.dumps(body)

    def prepare(self) -> None:
        self.fake._record(self.request)

    async def get(self, *_: str) -> None:
        await self._dispatch()

    async def post(self, *_: str) -> None:
        await self._dispatch()

    async def delete(self, *_: str) -> None:
        await self._dispatch()

    async def put(self, *_: str) -> None:
        await self._dispatch()

    async def patch(self, *_: str) -> None:
        await self._dispatch()

    def on_connection_close(self) -> None:
        if self.execution is not None:
            self.execution.client_went_away()

    # ---- plumbing

    async def _dispatch(self) -> None:
        try:
            sub = _v1_subpath(self.request.path)
            match, methods, auth = None, {}, False
            if sub is not None:
                for pattern, methods, auth in _ROUTES:
                    match = pattern.fullmatch(sub)
                    if match:
                        break
            if match is None:
                raise _ApiError(404, "not_found", _NOT_FOUND_TEXT)
            name = methods.get(self.request.method)
            if name is None:
                raise _ApiError(405, "method_not_allowed", "The method is not allowed for the requested URL.")
            app = self.fake._authenticate(self.request.headers.get("Authorization")) if auth else None
            await getattr(self, name)(app, **match.groupdict())
        except _ApiError as err:
            self._send_envelope(err)

    def _send_envelope(self, err: _ApiError) -> None:
        if self._finished:
            return
        self.clear()
        self.set_status(err.status)
        self.set_header("Content-Type", "application/json")
        for key, value in err.headers.items():
            self.set_header(key, value)
        if err.params is not None:  # R15: reqparse errors name the field and have no status
            self.finish(self._dumps({"code": err.code, "message": err.message, "params": err.params}))
            return
        self.finish(self._dumps({"code": err.code, "message": err.message, "status": err.status}))

    def _send_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(self._dumps(body))

    def _json_body(self) -> dict:
        """What Flask's request.get_json() accepts, with Werkzeug's errors."""
        mimetype = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not (mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))):
            raise _ApiError(
                415,
                "unsupported_media_type",
                "Did not attempt to load JSON data because the request Content-Type was not 'application/json'.",
            )
        try:
            data = json.loads(self.request.body) if self.request.body.strip() else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise _ApiError(400, "bad_request", "Invalid JSON payload received or JSON payload is empty.")
        return data

    def _invalid(self, model: str, field_name: str, msg: str, kind: str, value: Any) -> _ApiError:
        """A request validation error: 1.x pydantic text, or 0.11 reqparse's {message, params} (R15)."""
        if not self.fake.profile.reqparse_errors:
            return _pydantic_error(model, field_name, msg, kind, value)
        if kind == "missing":
            message = "Missing required parameter in the JSON body"
        elif kind == "literal_error":
            message = f"{value} is not a valid choice"
        elif field_name == "conversation_id" and kind == "value_error":
            message = f"{value} is not a valid uuid."
        else:
            message = msg
        return _ApiError(400, "invalid_param", message, params=field_name)

    @staticmethod
    def _user(value: Any, required: bool) -> str:
        if value is None or value == "":
            if required:
                raise _invalid_param("Arg user must be provided.")
            return DEFAULT_USER
        return str(value)

    # ---- simple endpoints

    async def _welcome(self, _app: None) -> None:
        self._send_json({"welcome": "Dify OpenAPI", "api_version": "v1", "server_version": SERVER_VERSION})

    async def _info(self, app: FakeApp) -> None:
        if app.info_delay > 0:
            await asyncio.sleep(app.info_delay)
        if app.info_status != 200:
            code, message = _STATUS_ERRORS.get(app.info_status, ("unknown", "Internal Server Error"))
            headers = _UNAUTHORIZED_HEADERS if app.info_status == 401 else None
            raise _ApiError(app.info_status, code, message, headers)
        if app.info_body is not None:
            self._send_json(app.info_body)
            return
        body: dict[str, Any] = {"name": app.name, "description": f"{app.name} (fake)"}
        if not self.fake.profile.info_has_mode:  # R13: 0.11 has neither tags nor mode
            self._send_json(body)
            return
        body["tags"] = []
        if app.info_has_mode:  # mode since 1.4.0, author_name since 1.4.3
            body["mode"] = app.mode
            body["author_name"] = "Fake Dify"
        self._send_json(body)

    async def _parameters(self, app: FakeApp) -> None:
        self._send_json(self.fake.parameters_of(app))

    async def _meta(self, _app: FakeApp) -> None:
        self._send_json({"tool_icons": {}})

    async def _list_conversations(self, app: FakeApp) -> None:
        self._require_chat(app)
        user = self._user(self.get_query_argument("user", None), required=False)
        try:
            limit = int(self.get_query_argument("limit", "20"))
        except ValueError:
            limit = 20
        rows = [
            {"id": cid, **self.fake._conversation_meta[cid]}
            for cid, owner in list(self.fake.conversations.items())
            if owner == (app.key, user) and cid in self.fake._conversation_meta
        ]
        rows.sort(key=lambda row: row["updated_at"], reverse=True)
        self._send_json({"limit": limit, "has_more": len(rows) > limit, "data": rows[:limit]})

    async def _list_messages(self, app: FakeApp) -> None:
        """The latest `limit` messages of a conversation (before `first_id`), oldest first."""
        self._require_chat(app)
        user = self._user(self.get_query_argument("user", None), required=False)
        conversation_id = self.get_query_argument("conversation_id", "")
        if not conversation_id:
            raise self._invalid("MessageListQuery", "conversation_id", "Field required", "missing", {})
        try:
            limit = int(self.get_query_argument("limit", "20"))
        except ValueError:
            limit = 20
        if not 1 <= limit <= 100:
            raise _invalid_param("limit must be between 1 and 100")
        if self.fake.conversations.get(conversation_id) != (app.key, user):
            raise _ApiError(404, "not_found", "Conversation Not Exists.")
        rows = list(self.fake.messages.get(conversation_id, []))
        first_id = self.get_query_argument("first_id", "")
        if first_id:
            ids = [row["id"] for row in rows]
            if first_id not in ids:
                raise _ApiError(404, "not_found", "First Message Not Exists.")
            rows = rows[: ids.index(first_id)]
        page = rows[-limit:]
        self._send_json({"limit": limit, "has_more": len(rows) > limit, "data": page})

    async def _delete_conversation(self, app: FakeApp, conversation_id: str) -> None:
        user = self._user(self._json_body().get("user"), required=False)
        self._require_chat(app)
        if self.fake.conversations.get(conversation_id) != (app.key, user):
            raise _ApiError(404, "not_found", "Conversation Not Exists.")
        self.fake.delete_conversation(conversation_id)
        self.set_status(204)
        self.finish()

    # ---- stop

    async def _stop(self, kind: str, task_id: str) -> None:
        user = self._user(self._json_body().get("user"), required=True)
        self.fake.stops.append((kind, task_id, user))
        execution = self.fake._executions.get(task_id)
        if execution is not None and (kind == "workflow" or execution.user == user):
            execution.request_stop()
        self._send_json({"result": "success"})

    async def _stop_chat(self, app: FakeApp, task_id: str) -> None:
        self._json_body()  # body/user errors come before the mode check
        self._require_chat(app)
        await self._stop("chat", task_id)

    async def _stop_completion(self, app: FakeApp, task_id: str) -> None:
        self._json_body()
        if app.mode != "completion":
            raise _ApiError(400, "app_unavailable", _APP_UNAVAILABLE)
        await self._stop("completion", task_id)

    async def _stop_workflow(self, app: FakeApp, task_id: str) -> None:
        self._json_body()
        if app.mode != "workflow":
            raise _ApiError(400, "not_workflow_app", _MODE_MISMATCH)
        await self._stop("workflow", task_id)

    @staticmethod
    def _require_chat(app: FakeApp) -> None:
        if app.mode not in CHAT_MODES:
            raise _ApiError(400, "not_chat_app", _MODE_MISMATCH)

    # ---- uploads

    async def _files_upload(self, app: FakeApp) -> None:
        await self.fake._meet_other_uploads()
        if self.fake.upload_error is not None:
            status, code, message = self.fake.upload_error
            raise _ApiError(status, code, message)
        files = self.request.files
        if "file" not in files:
            # Tornado files a part with filename="" as a plain field; Werkzeug keeps it a file.
            if re.search(rb'(?i)content-disposition:[^\r\n]*\bname="file"[^\r\n]*\bfilename\*?=', self.request.body):
                raise _ApiError(400, "filename_not_exists_error", "The specified filename does not exist.")
            raise _ApiError(400, "no_file_uploaded", "Please upload your file.")
        if sum(len(parts) for parts in files.values()) > 1:
            raise _ApiError(400, "too_many_files", "Only one file is allowed.")
        part = files["file"][0]
        if not part.content_type or part.content_type == "application/unknown":
            raise _ApiError(415, "unsupported_file_type", "File type not allowed.")
        if not part.filename:
            raise _ApiError(400, "filename_not_exists_error", "The specified filename does not exist.")
        if any(ch in part.filename for ch in '/\\:*?"<>|'):
            raise _invalid_param("Filename contains invalid characters")
        form_user = self.get_body_argument("user", None)
        file_id = str(uuid4())
        self.fake.uploads[file_id] = Upload(bytes(part.body), part.filename, part.content_type, form_user)
        extension = part.filename.rsplit(".", 1)[-1].lower() if "." in part.filename else ""
        now = int(time.time())
        base = self.fake.base_url[: -len("/v1")]
        self._send_json(
            {
                "id": file_id,
                "name": part.filename,
                "size": len(part.body),
                "extension": extension,
                "mime_type": part.content_type,
                "created_by": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{app.key}/{form_user or DEFAULT_USER}")),
                "created_at": now,
                "preview_url": None,
                "source_url": f"{base}/files/{file_id}/file-preview?timestamp={now}&nonce=fake&sign=fake",
                "original_url": None,
                "user_id": None,
                "tenant_id": str(uuid.uuid5(uuid.NAMESPACE_URL, "fake-dify-tenant")),
                "conversation_id": None,
                "file_key": None,
            },
            status=201,
        )

    # ---- generation endpoints

    def _common_payload(self, model: str, data: dict) -> tuple[dict, bool]:
        """Validate the pydantic fields shared by all generation payloads."""
        if "inputs" not in data:
            raise self._invalid(model, "inputs", "Field required", "missing", data)
        if not isinstance(data["inputs"], dict):
            raise self._invalid(model, "inputs", "Input should be a valid dictionary", "dict_type", data["inputs"])
        mode = data.get("response_mode")
        if mode not in (None, "blocking", "streaming"):
            raise self._invalid(model, "response_mode", "Input should be 'blocking' or 'streaming'", "literal_error", mode)
        files = data.get("files")
        if files is not None and not isinstance(files, list):
            raise self._invalid(model, "files", "Input should be a valid list", "list_type", files)
        return data["inputs"], mode == "streaming"

    def _check_inputs(self, app: FakeApp, inputs: dict) -> None:
        """The required/type/length/option checks of BaseAppGenerator._validate_inputs (texts as both
        real servers word them, captures strict_required_input.txt)."""
        for item in self.fake.parameters_of(app).get("user_input_form") or []:
            if not isinstance(item, dict) or not item:
                continue
            kind, spec = next(iter(item.items()))
            if not isinstance(spec, dict) or "variable" not in spec:
                continue
            var = spec["variable"]
            value = inputs.get(var)
            if value is None or value == "":
                if spec.get("required"):
                    raise _invalid_param(f"{var} is required in input form")
                continue
            if kind in ("text-input", "paragraph", "select") and not isinstance(value, str):
                raise _invalid_param(f"(type '{kind}') {var} in input form must be a string")
            max_length = spec.get("max_length")
            if kind in ("text-input", "paragraph") and isinstance(max_length, int) and len(value) > max_length:
                raise _invalid_param(f"{var} in input form must be less than {max_length} characters")
            if kind == "select" and spec.get("options") and value not in spec["options"]:
                raise _invalid_param(f"{var} in input form must be one of the following: {spec['options']}")

    def _check_files(self, app: FakeApp, files: list | None) -> None:
        """Local-file references must name an upload, when the app accepts files at all."""
        upload = self.fake.parameters_of(app).get("file_upload") or {}
        if not files or not (upload.get("enabled") or (upload.get("image") or {}).get("enabled")):
            return
        for item in files:
            if isinstance(item, dict) and item.get("transfer_method") == "local_file":
                if item.get("upload_file_id") not in self.fake.uploads:
                    raise _invalid_param("Invalid upload file")

    async def _chat_messages(self, app: FakeApp) -> None:
        data = self._json_body()
        user = self._user(data.get("user"), required=True)
        self._require_chat(app)
        model = "ChatRequestPayload"
        inputs, streaming = self._common_payload(model, data)
        if "query" not in data:
            raise self._invalid(model, "query", "Field required", "missing", data)
        query = data["query"]
        if not isinstance(query, str):
            raise self._invalid(model, "query", "Input should be a valid string", "string_type", query)
        query = query.replace("\x00", "")
        conversation_id = data.get("conversation_id")
        if conversation_id is not None and not isinstance(conversation_id, str):
            raise self._invalid(model, "conversation_id", "Input should be a valid string", "string_type",
                                  conversation_id)
        conversation_id = (conversation_id or "").strip() or None
        if conversation_id is not None and not _is_uuid(conversation_id):
            raise self._invalid(model, "conversation_id", "Value error, conversation_id must be a valid UUID",
                                  "value_error", conversation_id)
        if app.mode == "agent-chat" and not streaming:
            raise _invalid_param("Agent Chat App does not support blocking mode")
        if not query:
            raise _invalid_param("query is required")

        def worker_checks() -> None:
            if conversation_id is not None and self.fake.conversations.get(conversation_id) != (app.key, user):
                raise _ApiError(404, "not_found", "Conversation Not Exists.")
            self._check_inputs(app, inputs)
            self._check_files(app, data.get("files"))

        if await self._passes_worker_checks(app, "chat", user, streaming, worker_checks):
            await self._generate(app, "chat", user, query, inputs, streaming, conversation_id=conversation_id or "")

    async def _completion_messages(self, app: FakeApp) -> None:
        data = self._json_body()
        user = self._user(data.get("user"), required=True)
        if app.mode != "completion":
            raise _ApiError(400, "app_unavailable", _APP_UNAVAILABLE)
        inputs, streaming = self._common_payload("CompletionRequestPayload", data)
        query = data.get("query") or ""
        if not isinstance(query, str):
            raise self._invalid("CompletionRequestPayload", "query", "Input should be a valid string",
                                  "string_type", query)
        self._check_inputs(app, inputs)
        self._check_files(app, data.get("files"))
        await self._generate(app, "completion", user, query, inputs, streaming)

    async def _workflows_run(self, app: FakeApp) -> None:
        data = self._json_body()
        user = self._user(data.get("user"), required=True)
        if app.mode != "workflow":
            raise _ApiError(400, "not_workflow_app", _MODE_MISMATCH)
        inputs, streaming = self._common_payload("WorkflowRunPayload", data)
        if await self._passes_worker_checks(app, "workflow", user, streaming, lambda: self._check_inputs(app, inputs)):
            await self._generate(app, "workflow", user, "", inputs, streaming)

    async def _passes_worker_checks(self, app: FakeApp, kind: str, user: str, streaming: bool, checks: Any) -> bool:
        """Runs the checks Dify 1.13 leaves to its worker for streaming chatflow/workflow requests (R1):
        there a failure is no HTTP error but a 200 with one ping, then silence until Dify's own cut,
        then the end of the response with no terminal event. Elsewhere it is the usual error."""
        try:
            checks()
        except _ApiError as error:
            if not (streaming and self.fake.profile.worker_runs and app.mode in WORKER_MODES):
                raise
            self.fake.silent_failures.append((error.status, error.code, error.message))
            await self._generate(app, kind, user, "", {}, True, steps=[Silence(self.fake.worker_silence)])
            return False
        return True

    async def _generate(
        self,
        app: FakeApp,
        kind: str,
        user: str,
        query: str,
        inputs: dict,
        streaming: bool,
        conversation_id: str | None = None,
        steps: list | None = None,
    ) -> None:
        """Run the next script (or the default run, or the given steps) for a request that passed validation."""
        if steps is None:
            steps = self.fake._next_script(app.key)
        prompt = query or next((v for v in inputs.values() if isinstance(v, str)), "")
        if steps is None:
            steps = [Start(), Text(*_split3("Echo: " + prompt)), End()]
        if steps and isinstance(steps[0], HttpError):
            first = steps[0]
            raise _ApiError(first.status, first.code, first.message, first.headers)
        if conversation_id is not None:
            conversation_id = self.fake._touch_conversation(app, user, conversation_id, query, inputs)
        execution = _Execution(
            self.fake, self, app, kind=kind, user=user, query=prompt, inputs=inputs,
            conversation_id=conversation_id, streaming=streaming,
        )
        self.execution = execution
        if conversation_id:
            self.fake._add_message(execution)
        self.fake._executions[execution.task_id] = execution
        if streaming:
            self.fake.active_streams += 1
        try:
            await execution.run(steps)
            self._respond(execution)
        finally:
            self.fake._executions.pop(execution.task_id, None)
            if streaming:
                self.fake.active_streams -= 1

    def _respond(self, execution: _Execution) -> None:
        """Close out the HTTP response once the script is done."""
        if execution.outcome in ("dropped", "gone") or execution.aborted or self._finished:
            return
        if execution.outcome == "http_error":
            raise execution.error  # type: ignore[misc]
        if execution.streaming:
            if not execution.started:
                self.set_header("Content-Type", "text/event-stream; charset=utf-8")
            self.finish()
            return
        if execution.outcome in ("error_event", "failed_run"):
            raise execution.error  # type: ignore[misc]
        self.set_status(200)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(execution.blocking_body()))


class _CountingHTTPServer(HTTPServer):
    """HTTPServer that counts accepted TCP connections (connection-reuse tests)."""

    on_accept = None

    def handle_stream(self, stream: Any, address: Any) -> None:
        if self.on_accept is not None:
            self.on_accept()
        super().handle_stream(stream, address)


# --------------------------------------------------------------------------- the fake


class FakeDify:
    """A Dify Service API server for tests; see the module docstring."""

    def __init__(
        self,
        apps: list[FakeApp],
        *,
        profile: str | None = None,
        json_style: str | None = None,
        chatflow_end_order: str | None = None,
        ping_interval: float = 10.0,
        message_file_text: bool = False,
        tls: Any = None,
    ) -> None:
        if (profile or "docs") not in PROFILES:
            raise ValueError(f"unknown Dify profile {profile!r}; known: {', '.join(PROFILES)}")
        self.profile = PROFILES[profile or "docs"]
        json_style = json_style or self.profile.json_style
        chatflow_end_order = chatflow_end_order or self.profile.chatflow_end_order
        if json_style not in ("orjson", "dumps"):
            raise ValueError("json_style must be 'orjson' or 'dumps'")
        if chatflow_end_order not in ("workflow_first", "message_first"):
            raise ValueError("chatflow_end_order must be 'workflow_first' or 'message_first'")
        self.apps: list[FakeApp] = list(apps)
        self._apps_by_key = {app.key: app for app in self.apps}
        if len(self._apps_by_key) != len(self.apps):
            raise ValueError("duplicate app key")
        self.json_style = json_style
        self.chatflow_end_order = chatflow_end_order
        self.ping_interval = ping_interval
        self.message_file_text = message_file_text
        self.tls = tls  # an ssl.SSLContext: serve HTTPS

        self.port = 0
        self.base_url = ""
        self.requests: list[Recorded] = []
        self.stops: list[tuple[str, str, str]] = []
        self.uploads: dict[str, Upload] = {}
        self.upload_error: tuple[int, str, str] | None = None
        # With upload_rendezvous = n, each upload waits (at most 2 s) until n uploads are in flight at
        # once; max_concurrent_uploads records the most seen, so tests can tell parallel from serial.
        self.upload_rendezvous = 0
        self.max_concurrent_uploads = 0
        self._uploads_waiting = 0
        self._rendezvous: asyncio.Event | None = None
        self.conversations: dict[str, tuple[str, str]] = {}
        # conversation id -> its messages, oldest first (what GET /messages pages through)
        self.messages: dict[str, list[dict]] = {}
        # R2: seconds a worker run waits for a worker after the initial ping (no pings meanwhile); 1.13
        # took 0.2-0.3 s when idle, 13 s with its slots busy. Kept short by default so tests stay quick.
        self.queue_delay = 0.05 if self.profile.worker_runs else 0.0
        # R1: how long a worker-side failure keeps the stream open and silent (Dify's own cut: 300 s).
        self.worker_silence = 300.0
        # R10: seconds a stream stays open after its terminal event.
        self.end_linger = self.profile.end_linger
        # R1: what each worker-side failure was (status, code, message), in order.
        self.silent_failures: list[tuple[int, str, str]] = []
        self.connections_opened = 0
        self.active_streams = 0

        self._conversation_meta: dict[str, dict] = {}
        self._scripts: dict[str, deque[list]] = {key: deque() for key in self._apps_by_key}
        self._scripts_lock = threading.Lock()
        self._executions: dict[str, _Execution] = {}
        self._server: _CountingHTTPServer | None = None

    # ---- lifecycle (loop thread)

    async def start(self, port: int = 0) -> None:
        """Bind 127.0.0.1 on `port` (0: an ephemeral one) and serve on the current IOLoop."""
        app = Application([(r"(.*)", _DifyHandler, {"fake": self})], log_function=lambda _handler: None)
        server = _CountingHTTPServer(app, ssl_options=self.tls)
        server.on_accept = self._count_connection
        sockets = bind_sockets(port, "127.0.0.1")
        server.add_sockets(sockets)
        self._server = server
        self.port = sockets[0].getsockname()[1]
        self.base_url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1"

    async def stop(self) -> None:
        """Stop listening, end every running script and close all connections."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        executions = list(self._executions.values())
        for execution in executions:
            execution.abort()
        try:
            await asyncio.wait_for(server.close_all_connections(), 5)
        except asyncio.TimeoutError:
            pass
        # Let aborted handlers unwind so no task outlives the fake.
        for _ in range(100):
            if not self._executions:
                break
            await asyncio.sleep(0.01)

    async def _meet_other_uploads(self) -> None:
        if not self.upload_rendezvous:
            return
        if self._rendezvous is None:
            self._rendezvous = asyncio.Event()
        self._uploads_waiting += 1
        self.max_concurrent_uploads = max(self.max_concurrent_uploads, self._uploads_waiting)
        if self._uploads_waiting >= self.upload_rendezvous:
            self._rendezvous.set()
        try:
            await asyncio.wait_for(self._rendezvous.wait(), 2)
        except asyncio.TimeoutError:
            pass
        finally:
            self._uploads_waiting -= 1

    # ---- test-facing API (any thread)

    def script(self, key: str, *steps: Any) -> None:
        """Queue one scripted run for the next generation request on app ``key`` (FIFO)."""
        if key not in self._apps_by_key:
            raise KeyError(f"no app with key {key!r}")
        for step in steps:
            if not isinstance(step, _STEP_TYPES):
                raise TypeError(f"not a script step: {step!r}")
        with self._scripts_lock:
            self._scripts[key].append(list(steps))

    def requests_to(self, path: str, method: str | None = None) -> list[Recorded]:
        return [r for r in list(self.requests) if r.path == path and (method is None or r.method == method.upper())]

    def delete_conversation(self, conversation_id: str) -> None:
        self.conversations.pop(conversation_id, None)
        self.messages.pop(conversation_id, None)
        self._conversation_meta.pop(conversation_id, None)

    def parameters_of(self, app: FakeApp) -> dict:
        return app.effective_parameters(self.profile.parameters_style)

    # ---- internals (loop thread)

    def _count_connection(self) -> None:
        self.connections_opened += 1

    def _next_script(self, key: str) -> list | None:
        with self._scripts_lock:
            queue = self._scripts[key]
            return queue.popleft() if queue else None

    def _encode(self, event: dict) -> bytes:
        if self.json_style == "orjson":
            return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return json.dumps(event).encode("ascii")

    def _authenticate(self, header: str | None) -> FakeApp:
        """validate_and_get_api_token: runs before any other check (reference §4.2)."""
        if header is None or " " not in header:
            message = "Authorization header must be provided and start with 'Bearer'"
        else:
            scheme, token = header.split(None, 1)
            if scheme.lower() != "bearer":
                message = "Authorization scheme must be 'Bearer'"
            elif token.strip() in self._apps_by_key:
                return self._apps_by_key[token.strip()]
            else:
                message = "Access token is invalid"
        raise _ApiError(401, "unauthorized", message, _UNAUTHORIZED_HEADERS)

    def _add_message(self, execution: _Execution) -> None:
        """Dify stores the message when the run starts; its answer is read live from the run."""
        row = {"id": execution.message_id, "conversation_id": execution.conversation_id,
               "parent_message_id": "00000000-0000-0000-0000-000000000000", "inputs": execution.inputs,
               "query": execution.query, "answer": "", "message_files": [], "feedback": None,
               "retriever_resources": [], "created_at": execution.created_at, "agent_thoughts": [],
               "status": "normal", "error": None}
        execution.message_row = row
        self.messages.setdefault(execution.conversation_id, []).append(row)

    def _touch_conversation(self, app: FakeApp, user: str, conversation_id: str, query: str, inputs: dict) -> str:
        """Create a conversation for a blank id, or bump an existing one's updated_at."""
        now = int(time.time())
        if conversation_id:
            self._conversation_meta.setdefault(conversation_id, {})["updated_at"] = now
            return conversation_id
        new_id = str(uuid4())
        name = query[:20] + ("…" if len(query) > 20 else "")
        self._conversation_meta[new_id] = {
            "name": name,
            "inputs": inputs,
            "status": "normal",
            "introduction": "",
            "created_at": now,
            "updated_at": now,
        }
        self.conversations[new_id] = (app.key, user)
        return new_id

    def _record(self, request: Any) -> None:
        sub = _v1_subpath(request.path)
        headers: dict[str, str] = {}
        for name, value in request.headers.get_all():
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        mimetype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        parsed: Any = None
        if request.body and "json" in mimetype:
            try:
                parsed = json.loads(request.body)
            except ValueError:
                parsed = None
        self.requests.append(
            Recorded(
                method=request.method,
                path=sub if sub is not None else request.path,
                headers=headers,
                query={k: v[0].decode("utf-8", "replace") for k, v in request.query_arguments.items()},
                json=parsed,
                form={k: v[0].decode("utf-8", "replace") for k, v in request.body_arguments.items()},
                files=[(f.filename, f.content_type, bytes(f.body)) for parts in request.files.values() for f in parts],
                body=bytes(request.body or b""),
            )
        )


class FakeDifyThread:
    """Runs a :class:`FakeDify` on its own IOLoop in a daemon thread.

    For synchronous tests, or tests whose own loop is busy with the proxy::

        with FakeDifyThread(FakeDify([FakeApp("app-x", "X")])) as fake:
            ...  # fake.base_url is live; fake.script(...) from this thread is fine
    """

    def __init__(self, fake: FakeDify) -> None:
        self.fake = fake
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeDify:
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self.loop = loop
            try:
                loop.run_until_complete(self.fake.start())
            except BaseException as exc:  # surface bind errors in the test thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-dify", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self.fake

    def call(self, coro: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the fake's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc: Any) -> None:
        if self.loop is None or self._thread is None:
            return
        self.call(self.fake.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
