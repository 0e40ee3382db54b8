"""Uploads: the new turn's attachments turned into Dify file objects, each file uploaded once.

Clients resend the same file turn after turn (mode 1 folds the whole chat each time), so an
upload id is remembered per app, Dify user and content, and an identical upload already
under way is shared rather than repeated. A refused upload is an OpenAI-shaped error naming
the file; an image URL is handed to Dify only if it points outside the operator's network
(url_guard.py).
"""

import asyncio
import logging
import time
from collections import OrderedDict

from tornado.ioloop import IOLoop

import metrics
from attachment_policy import Limits, Policy, describe_file, file_error, megabytes
from attachments import attachment_parts, read_parts
from dify_client import DifyError, DifyTransportError
from errors import from_dify_failure, upstream_broken
from memory import new_turn_start
from url_guard import URLGuard

log = logging.getLogger("opendify.uploads")

# Apps whose streaming runs Dify 1.13 executes in a worker, which meets an upload id it no longer has
# with silence instead of the 400 the proxy could mend by uploading again (captures R1/R19). A Dify
# service API has no cheap "does this upload exist" call, so these apps get their files uploaded afresh
# every time: a resent file costs one more upload, never a stream that stays silent.
UNREFUSED_UPLOAD_MODES = ("advanced-chat", "workflow")


class UploadCache:
    """Dify upload ids by (app, Dify user, content), so a file the client resends is not uploaded again.

    Bounded (the least recently used entry goes first) and expiring, because Dify may clean up
    uploads and an id must never outlive the file it names for long.
    """

    def __init__(self, size=1000, ttl=3600.0, clock=time.monotonic):
        self.size = size
        self.ttl = ttl
        self.clock = clock
        self._entries = OrderedDict()

    def get(self, key):
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self.clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key, value):
        if self.size <= 0:
            return
        self._entries[key] = (self.clock() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, app_key, user):
        """Drops an app and user's entries: Dify lost one of their files, so none is trusted."""
        for key in [k for k in self._entries if k[0] == app_key and k[1] == user]:
            del self._entries[key]


class Uploads:
    """Turns the new turn's attachments into Dify file objects, uploading concurrently and only once per
    content, app and Dify user (an identical upload already under way is shared, not repeated)."""

    def __init__(self, dify, limits, cache, guard):
        self.dify = dify
        self.limits = limits
        self.cache = cache
        self.guard = guard
        self._pending = {}

    @classmethod
    def from_settings(cls, dify, settings):
        """Uploads with the limits, cache size and URL rule the settings give (MAX_*, UPLOAD_CACHE_*,
        ALLOW_PRIVATE_URLS)."""
        return cls(dify, Limits.from_settings(settings),
                   UploadCache(settings.upload_cache_size, settings.upload_cache_ttl),
                   URLGuard(settings.allow_private_urls))

    async def attach(self, app, messages, user, model):
        """Dify `files` for the request; any bad attachment raises before anything is uploaded."""
        parts = attachment_parts(messages, new_turn_start(messages))
        if not parts:
            return []
        policy = Policy(self.limits, app)
        policy.check_count(parts)
        # Decoding and hashing megabytes takes tens of milliseconds: off the event loop, other streams flow.
        attachments = await IOLoop.current().run_in_executor(None, read_parts, policy, parts)
        for attachment in attachments:
            if attachment.url:
                await self.guard.check(attachment.where, attachment.url)
        local = [a for a in attachments if not a.url]
        results = await asyncio.gather(*(self._upload_id(app, user, model, a) for a in local),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        ids = dict(zip((a.where for a in local), results))
        log.debug("model %r: %d attachment(s), %d uploaded or cached", model, len(attachments), len(local))
        return [a.dify_file(ids.get(a.where)) for a in attachments]

    async def _upload_id(self, app, user, model, attachment):
        key = (app.key, user, attachment.digest, attachment.name, attachment.mime)
        cached = self.cache.get(key) if app.mode not in UNREFUSED_UPLOAD_MODES else None
        metrics.upload(hit=cached is not None)
        if cached is not None:
            log.debug("model %r: %s already uploaded; reusing it", model, attachment.where)
            return cached
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._upload(app, user, model, attachment))
            self._pending[key] = task
            task.add_done_callback(lambda done: self._settle(key, done))
        return await asyncio.shield(task)

    def _settle(self, key, task):
        self._pending.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            self.cache.put(key, task.result())

    async def _upload(self, app, user, model, attachment):
        try:
            answer = await self.dify.upload(app.key, attachment.name, attachment.mime, attachment.data, user)
        except DifyError as error:
            raise upload_error(error, attachment, model)
        except DifyTransportError as failure:
            raise from_dify_failure(failure, model)
        upload_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(upload_id, str) or not upload_id:
            raise upstream_broken(model, f"answered the upload of {attachment.name} without a file id")
        log.debug("model %r: uploaded %s (%s, %d bytes)", model, attachment.where, attachment.mime,
                  len(attachment.data))
        return upload_id


def upload_error(error, attachment, model):
    """What the client sees when Dify refuses an upload: the file named, and what to change."""
    what = describe_file(attachment.kind, attachment.name, attachment.where)
    detail = f" ({error.message})" if error.message and error.message != "no detail" else ""
    if error.status == 413:
        return file_error(413, "file_too_large", attachment.where,
                          f"The Dify app behind model '{model}' refused {what} as too large{detail}; it is "
                          f"{megabytes(len(attachment.data))}. Send a smaller file.")
    if error.status == 415:
        return file_error(415, "unsupported_file_type", attachment.where,
                          f"The Dify app behind model '{model}' does not accept the type of {what} "
                          f"({attachment.mime}){detail}.")
    if error.status == 400:
        return file_error(400, error.code or "upload_rejected", attachment.where,
                          f"The Dify app behind model '{model}' refused {what}{detail}.")
    return from_dify_failure(error, model)
