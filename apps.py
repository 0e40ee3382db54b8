"""The Dify apps served as models, named by each app's `/info` name.

The registry is rebuilt off to the side and swapped in one assignment, so a request
never sees a half-refreshed list. An app whose `/info` fails keeps its last known entry.
"""

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field

import metrics
from dify_client import DifyError, DifyFailure, DifyTimeout, DifyTransportError, DifyUnreachable

log = logging.getLogger("opendify.apps")

CHAT_FAMILY = ("chat", "agent-chat", "advanced-chat", "agent")
SERVED_MODES = CHAT_FAMILY + ("completion", "workflow")


def key_id(key):
    """A short, stable, non-reversible name for a Dify key, for logs and duplicate ids."""
    return hashlib.sha256(key.encode()).hexdigest()[:6]


@dataclass(frozen=True)
class App:
    """One Dify app served as a model: its model id (its Dify name, made unique), mode and key;
    `parameters` is its /parameters (input form, file upload settings); `created` when first listed."""
    model_id: str
    name: str
    mode: str
    key: str = field(repr=False)
    parameters: dict = field(default_factory=dict, repr=False, compare=False)
    created: int = 0

    @property
    def mark_id(self):
        """What conversation marks are bound to: the app's key, hashed (stable while the key is)."""
        return hashlib.sha256(b"opendify-app\0" + self.key.encode()).hexdigest()


def assign_ids(apps_by_key, key_order):
    """Model ids for apps: the name itself, or for a duplicated name "name#<key id>" on every
    app but the first in DIFY_API_KEYS order, so ids do not move when refreshes reorder."""
    by_name = {}
    for key in key_order:
        if key in apps_by_key:
            by_name.setdefault(apps_by_key[key]["name"], []).append(key)
    ids = {}
    for name, keys in by_name.items():
        ids[keys[0]] = name
        for key in keys[1:]:
            ids[key] = f"{name}#{key_id(key)}"
        if len(keys) > 1:
            log.warning("%d Dify apps are named %r; serving them as %s", len(keys), name,
                        ", ".join(repr(ids[k]) for k in keys))
    return ids


FIRST_LISTING_WAIT = 2.0  # s a request right after start-up waits for the first /info round
RETRY_INTERVAL = 30.0  # s between refreshes while some app's /info fails


_AGENT_REFUSAL = "does not support blocking mode"  # "Agent Chat App does not support blocking mode"


def made_by_workflow(parameters):
    """Whether a /parameters body was serialised from a workflow (a chatflow) rather than from a chat
    app's model config, on Dify before 1.4 where /info has no mode. Dify 0.11 shows three traces
    (captures info_advanced-chat_* vs info_chat_*): `file_upload` with a top-level `enabled` (model
    configs have only the legacy `image` setting), `sensitive_word_avoidance` without `configs`, and
    form items that name their own `type`. Two of them are required, so one setting a chat app's
    author changed cannot make it a chatflow."""
    upload = parameters.get("file_upload")
    moderation = parameters.get("sensitive_word_avoidance")
    form = parameters.get("user_input_form")
    traces = (
        isinstance(upload, dict) and "enabled" in upload,
        isinstance(moderation, dict) and "configs" not in moderation,
        isinstance(form, list) and any(isinstance(item, dict) and any(
            isinstance(spec, dict) and "type" in spec for spec in item.values()) for item in form),
    )
    return sum(traces) >= 2


class AppRegistry:
    """The apps behind DIFY_API_KEYS, described by Dify, refreshed in the background; what was last
    known of an app is kept while Dify cannot be asked."""

    def __init__(self, dify, keys, refresh_interval=300.0):
        self.dify = dify
        self.keys = tuple(keys)
        self.refresh_interval = refresh_interval
        self._apps = {}
        self._known = {}
        self._refreshing = None
        self._last_refresh = 0.0
        self.failing = 0
        self.reachable = False  # whether Dify answered any /info in the latest refresh
        self.last_seen = None  # when it last did (time.time())
        self.rounds = 0  # completed /info rounds
        self.unreachable = None  # why Dify could not be reached on the last round, or None

    def all(self):
        return list(self._apps.values())

    async def first_listing(self, timeout=FIRST_LISTING_WAIT):
        """Right after start-up, waits (at most `timeout`) for the first /info round, so a client that
        lists models at once does not get an empty list."""
        if self.rounds:
            return
        try:
            await asyncio.wait_for(self.refresh(), timeout)
        except asyncio.TimeoutError:
            pass

    async def resolve(self, model_id):
        """The app for a model id; an unknown id triggers one refresh (shared by concurrent callers,
        at most one every few seconds) in case the app was just added or renamed in Dify."""
        await self.first_listing()
        app = self._apps.get(model_id)
        if app is None and time.monotonic() - self._last_refresh > 5:
            await self.refresh()
            app = self._apps.get(model_id)
        return app

    async def keep_fresh(self):
        """Refreshes forever: every refresh interval, or every 30 s while some app's /info fails. A
        round that fails unexpectedly is logged and retried; the loop itself never ends."""
        shown = None
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("refreshing the model list failed; keeping the last list and retrying")
                self.failing = max(self.failing, 1)
            listing = ", ".join(f"{app.model_id!r} ({app.mode})" for app in self._apps.values()) or "none"
            if listing != shown:
                log.info("serving %d model(s): %s", len(self._apps), listing)
                shown = listing
            await asyncio.sleep(min(self.refresh_interval, RETRY_INTERVAL) if self.failing else self.refresh_interval)

    async def refresh(self):
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh())
        task = self._refreshing
        try:
            await asyncio.shield(task)
        finally:
            if self._refreshing is task and task.done():
                self._refreshing = None

    async def _refresh(self):
        self._last_refresh = time.monotonic()
        unreachable = []
        results = await asyncio.gather(*(self._describe(key, unreachable) for key in self.keys))
        self.unreachable = unreachable[0] if unreachable else None
        self.rounds += 1
        known = dict(self._known)
        self.failing = sum(1 for described in results if described is None)
        self.reachable = self.failing < len(self.keys)
        if self.reachable:
            self.last_seen = time.time()
        metrics.model_refresh(len(self.keys) - self.failing, self.failing)
        for key, described in zip(self.keys, results):
            if described is not None:
                known[key] = described
        ids = assign_ids(known, self.keys)
        apps = {}
        for key in self.keys:
            entry = known.get(key)
            if entry is None or entry["mode"] not in SERVED_MODES or not entry["answerable"]:
                continue
            previous = self._apps.get(ids[key])
            created = previous.created if previous is not None else int(time.time())
            apps[ids[key]] = App(ids[key], entry["name"], entry["mode"], key, entry["parameters"], created)
        self._known = known
        self._apps = apps

    async def _describe(self, key, unreachable):
        """/info and /parameters for one key, or None when Dify cannot be asked right now (why it could
        not be reached at all is added to `unreachable`)."""
        try:
            info = await self.dify.get(key, "/info", timeout=15)
        except DifyFailure as error:
            log.error("Dify app %s: /info failed (%s); keeping its last known entry, if any, and retrying", key_id(key),
                      error)
            if isinstance(error, (DifyUnreachable, DifyTimeout)):
                unreachable.append(error.detail)
            return None
        if not isinstance(info, dict):
            log.error("Dify app %s: /info answered a JSON %s, not an object; keeping its last known entry, if "
                      "any, and retrying", key_id(key), type(info).__name__)
            return None
        name = str(info.get("name") or f"dify-app-{key_id(key)}")
        mode = info.get("mode")
        probed = not mode
        if probed:
            mode = await self._probe_mode(key)
        answerable = True
        parameters = {}
        try:
            parameters = await self.dify.get(key, "/parameters", timeout=15)
        except DifyError as error:
            if error.code == "app_unavailable":
                answerable = False
                log.warning("Dify app %r cannot answer (%s); not listing it", name, error.message)
        except DifyTransportError as error:
            log.warning("Dify app %r: /parameters failed (%s)", name, error)
        if not isinstance(parameters, dict):
            log.warning("Dify app %r: /parameters is not a JSON object; ignoring it", name)
            parameters = {}
        if probed:
            if mode == "chat" and made_by_workflow(parameters):
                mode = "advanced-chat"
            log.info("Dify app %r: /info has no mode (Dify before 1.4); probed mode: %s", name, mode)
        if mode not in SERVED_MODES:
            log.warning("Dify app %r is a %s app, which this proxy does not serve; not listing it", name, mode)
        return {"name": name, "mode": mode, "answerable": answerable, "parameters": parameters}

    async def _probe_mode(self, key):
        """Old Dify does not say an app's mode: ask the chat endpoint with an empty query in blocking
        mode, which every chat-family app rejects without running anything (an agent app first of all
        because it cannot block, the others because the query is empty), while other modes say they
        are not chat apps; then tell workflow from completion the same way. Chatflows answer like chat
        apps; `_describe` tells them apart by their /parameters."""
        probe = {"inputs": {}, "query": "", "user": "opendify-mode-probe", "response_mode": "blocking"}
        try:
            await self.dify.post(key, "/chat-messages", probe, timeout=15)
        except DifyError as error:
            if error.code != "not_chat_app":
                return "agent-chat" if _AGENT_REFUSAL in error.message else "chat"
            try:
                await self.dify.post(key, "/workflows/run", {"inputs": {}, "user": "opendify-mode-probe",
                                                             "response_mode": "probe"}, timeout=15)
            except DifyError as workflow_error:
                return "completion" if workflow_error.code == "not_workflow_app" else "workflow"
            return "workflow"
        except DifyTransportError:
            pass
        log.warning("could not probe the mode of Dify app %s; assuming chat", key_id(key))
        return "chat"
