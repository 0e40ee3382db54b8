"""Whether a Dify conversation the proxy is about to continue still exists.

Dify 1.13 runs streaming chatflow (advanced-chat) requests in a Celery worker, and the worker
meets an unknown or deleted `conversation_id` with silence: a 200, one `event: ping`, then
nothing until Dify's own 300 s cut (captures R1). The 404 that older Dify, blocking calls and
chat/agent apps give at once never comes. So before continuing a chatflow's conversation the
proxy asks Dify directly, with the cheapest call that says "gone": `GET /messages?limit=1`
(`DifyClient.latest_message`). A conversation just found to exist is not asked about again for
a few seconds, so a burst of requests on one chat (a client's title and tag requests fired with
the answer) costs one check. The proxy's own finished turns do not count as proof: a conversation
deleted right after a turn must still be noticed on the next one.
"""

import logging
import time
from collections import OrderedDict

from dify_client import DifyError

log = logging.getLogger("opendify.conversations")

# Modes whose streaming runs Dify 1.13 executes in its worker, where an unknown conversation is silence.
WORKER_RUN_MODES = ("advanced-chat",)
KNOWN_FOR = 10.0  # s a conversation just found to exist is not checked again
_KNOWN_LIMIT = 10000


class ConversationCheck:
    """Remembers, per app key, Dify user and conversation, when the conversation was last known to exist."""

    def __init__(self, dify):
        self.dify = dify
        self._known = OrderedDict()

    def needed(self, mode):
        """Whether an app of this mode meets an unknown conversation with silence, so must be asked first."""
        return mode in WORKER_RUN_MODES

    def _remember(self, entry):
        self._known[entry] = time.monotonic()
        self._known.move_to_end(entry)
        while len(self._known) > _KNOWN_LIMIT:
            self._known.popitem(last=False)

    async def exists(self, key, user, conversation_id):
        """False only when Dify says the conversation is gone; any other failure to tell is logged and
        treated as "exists", so a check that cannot be made never blocks the turn (a DifyTransportError,
        Dify unreachable, still propagates: the turn could not run either)."""
        entry = (key, user, conversation_id)
        seen = self._known.get(entry)
        if seen is not None and time.monotonic() - seen < KNOWN_FOR:
            return True
        try:
            latest = await self.dify.latest_message(key, conversation_id, user)
        except DifyError as error:
            log.warning("could not check a Dify conversation before continuing it (%s); continuing", error)
            return True
        if latest is None:
            self._known.pop(entry, None)
            return False
        self._remember(entry)
        return True
