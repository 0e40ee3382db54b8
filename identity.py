"""Who a client is: the key it presents, checked against VALID_API_KEYS, and the opaque ids that stand
for it from then on.

Separate because identity is one rule used in several places: a key never travels further than
this module; Dify end users, conversation marks and response ids are bound to the client id made
here, so two keys never share a Dify user (nor, through it, a conversation).
"""

import hashlib
import hmac

MAX_USER = 64  # characters of a request's `user` kept in its Dify end user


def bearer_token(header):
    """The token of an `Authorization: Bearer <token>` header, or "" when there is none."""
    scheme, _, token = (header or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def client_id(secret, api_key):
    """An opaque, stable id for a client key: Dify users and marks are bound to it, never to the key."""
    return hmac.new(secret, b"opendify-client\0" + api_key.encode(), hashlib.sha256).hexdigest()[:16]


def dify_user(client, request_user=""):
    """The Dify end user for a request: the client's id, plus the request's own `user` if it sent one,
    so two client keys never share a Dify end user (nor, through it, a conversation)."""
    if request_user:
        return f"opendify-{client}:{request_user[:MAX_USER]}"
    return f"opendify-{client}"


class ClientKeys:
    """The configured client keys, kept hashed with their client ids, so that a presented key is compared
    with every one in constant time (how long the check takes says nothing about which key is close)."""

    def __init__(self, secret, keys):
        self.keys = [(hashlib.sha256(key.encode()).digest(), client_id(secret, key)) for key in keys]

    def client_for(self, token):
        """The client id of a presented key, or None."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for key_digest, client in self.keys:
            if hmac.compare_digest(digest, key_digest):
                found = client
        return found
