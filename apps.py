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
from dify_client import DifyError, StreamFailure

log = logging.getLogger("opendify.apps")

CHAT_FAMILY = ("chat", "agent-chat", "advanced-chat", "agent")
SERVED_MODES = CHAT_FAMILY + ("completion", "workflow")


def key_id(key):
    """A short, stable, non-reversible name for a Dify key, for logs and duplicate ids."""
    return hashlib.sha256(key.encode()).hexdigest()[:6]


@dataclass(frozen=True)
class App:
    model_id: str
    name: str
    mode: str
    key: str = field(repr=False)
    parameters: dict = field(default_factory=dict, repr=False, compare=False)
    created: int = 0

    @property
    def key_id(self):
        return key_id(self.key)

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


class AppRegistry:
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

    def get(self, model_id):
        return self._apps.get(model_id)

    def all(self):
        return list(self._apps.values())

    async def resolve(self, model_id):
        """The app for a model id; an unknown id waits for the refresh under way (the first one, at start-up),
        else triggers one (shared by concurrent callers, at most one every few seconds) in case the app was
        just added or renamed in Dify."""
        app = self._apps.get(model_id)
        if app is None and (self._refreshing is not None or time.monotonic() - self._last_refresh > 5):
            await self.refresh()
            app = self._apps.get(model_id)
        return app

    async def keep_fresh(self):
        """Refreshes forever: every refresh interval, or every 30 s while some app's /info fails."""
        shown = None
        while True:
            await self.refresh()
            listing = ", ".join(f"{app.model_id!r} ({app.mode})" for app in self._apps.values()) or "none"
            if listing != shown:
                log.info("serving %d model(s): %s", len(self._apps), listing)
                shown = listing
            await asyncio.sleep(min(self.refresh_interval, 30) if self.failing else self.refresh_interval)

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
        results = await asyncio.gather(*(self._describe(key) for key in self.keys))
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

    async def _describe(self, key):
        """/info and /parameters for one key, or None when Dify cannot be asked right now."""
        try:
            info = await self.dify.get(key, "/info", timeout=15)
        except (DifyError, StreamFailure) as error:
            log.error("Dify app %s: /info failed (%s); keeping its last known entry, if any, and retrying", key_id(key),
                      error)
            return None
        name = str(info.get("name") or f"dify-app-{key_id(key)}")
        mode = info.get("mode")
        if not mode:
            mode = await self._probe_mode(key)
            log.info("Dify app %r: /info has no mode (Dify before 1.4); probed mode: %s", name, mode)
        answerable = True
        parameters = {}
        try:
            parameters = await self.dify.get(key, "/parameters", timeout=15)
        except DifyError as error:
            if error.code == "app_unavailable":
                answerable = False
                log.warning("Dify app %r cannot answer (%s); not listing it", name, error.message)
        except StreamFailure as error:
            log.warning("Dify app %r: /parameters failed (%s)", name, error)
        if mode not in SERVED_MODES:
            log.warning("Dify app %r is a %s app, which this proxy does not serve; not listing it", name, mode)
        return {"name": name, "mode": mode, "answerable": answerable, "parameters": parameters}

    async def _probe_mode(self, key):
        """Old Dify does not say an app's mode: ask the chat endpoint with an empty query, which every
        chat-family app rejects as invalid without running anything, while other modes say they
        are not chat apps; then tell workflow from completion the same way."""
        probe = {"inputs": {}, "query": "", "user": "opendify-mode-probe", "response_mode": "blocking"}
        try:
            await self.dify.post(key, "/chat-messages", probe, timeout=15)
        except DifyError as error:
            if error.code != "not_chat_app":
                return "chat"
            try:
                await self.dify.post(key, "/workflows/run", {"inputs": {}, "user": "opendify-mode-probe",
                                                             "response_mode": "probe"}, timeout=15)
            except DifyError as workflow_error:
                return "completion" if workflow_error.code == "not_workflow_app" else "workflow"
            return "workflow"
        except StreamFailure:
            pass
        log.warning("could not probe the mode of Dify app %s; assuming chat", key_id(key))
        return "chat"
