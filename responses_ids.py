"""Response ids that carry their own state, so `previous_response_id` needs no database.

A Responses API id names the Dify conversation and message it answered, the Dify user
it ran as, and is bound by a 96-bit tag to the server secret (the mode-2 marks' secret),
the app and the client key. Any instance with the same configuration can continue the
conversation; a forged or altered id, or one made for another client or app, fails the
tag and never reaches Dify.

    resp_ + base64url( version | conversation uuid (16) | message uuid (16) | user (utf-8) | tag (12) )

An all-zero conversation means the app keeps no conversation (completion and workflow apps).
The ids are not secret from their own client (it sees its Dify conversation id in the
`X-Dify-Conversation-Id` header anyway), only unforgeable.

Call ids carry state too: the id of a function call the client sees names the function after
`__` (`named_call_id`), so a later `function_call_output` can say which tool it answers.
"""

import base64
import binascii
import functools
import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass

PREFIX = "resp_"
_VERSION = b"\x01"
_TAG_BYTES = 12
_FIXED = len(_VERSION) + 32
_NO_CONVERSATION = bytes(16)
_MAX_ID_LENGTH = 600
_NAMED_CALL_ID = re.compile(r"call_[A-Za-z0-9]{1,40}__([A-Za-z0-9_.:-]{1,64})\Z")


@dataclass(frozen=True)
class ResponseRef:
    """What a response id says: the Dify conversation ("" for none), message and end user it ran as."""
    conversation_id: str
    message_id: str
    user: str


@functools.lru_cache(maxsize=8)
def _key(secret):
    return hmac.new(secret, b"opendify/responses/v1/id", hashlib.sha256).digest()


def _field(text):
    data = text.encode("utf-8", "surrogatepass")
    return len(data).to_bytes(4, "big") + data


def _tag(secret, app_id, client, payload):
    return hmac.new(_key(secret), _field(app_id) + _field(client) + payload, hashlib.sha256).digest()[:_TAG_BYTES]


def _uuid_bytes(value):
    try:
        return uuid.UUID(value).bytes if value else _NO_CONVERSATION
    except (ValueError, AttributeError, TypeError):
        return None


def make_response_id(secret, app_id, client, conversation_id, message_id, user=""):
    """The id of a response; a missing or odd message id is replaced by a random one (nothing to read back)."""
    conversation = _uuid_bytes(conversation_id) or _NO_CONVERSATION
    message = _uuid_bytes(message_id)
    if not message or message == _NO_CONVERSATION:
        message = uuid.uuid4().bytes
    payload = _VERSION + conversation + message + user.encode("utf-8", "surrogatepass")
    raw = payload + _tag(secret, app_id, client, payload)
    return PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def read_response_id(secret, app_id, client, response_id):
    """The ResponseRef of an id made for this app and client, or None (forged, altered, another's, malformed)."""
    if not isinstance(response_id, str) or not response_id.startswith(PREFIX) or len(response_id) > _MAX_ID_LENGTH:
        return None
    text = response_id[len(PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) < _FIXED + _TAG_BYTES or raw[:1] != _VERSION:
        return None
    payload, tag = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
    if not hmac.compare_digest(_tag(secret, app_id, client, payload), tag):
        return None
    conversation = payload[1:17]
    try:
        user = payload[_FIXED:].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return ResponseRef("" if conversation == _NO_CONVERSATION else str(uuid.UUID(bytes=conversation)),
                       str(uuid.UUID(bytes=payload[17:33])), user)


def named_call_id(call_id, name):
    """The call id a client sees: the proxy's own, with the function's name after `__`. A later
    `function_call_output` names only the call id; with `previous_response_id` its call is not in the
    request, and the name read back from the id lets the result say which tool it answers."""
    named = f"{call_id}__{name}"
    return named if _NAMED_CALL_ID.match(named) else call_id


def named_call_name(call_id):
    """The function name a `named_call_id` carries, or None for any other call id."""
    found = _NAMED_CALL_ID.match(call_id)
    return found.group(1) if found else None
