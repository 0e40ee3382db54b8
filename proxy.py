"""The proxy's shared state: the one object that builds the Dify client, the app registry, the caches
and the client keys from the settings, and that every handler reaches through the application.

Separate from handlers.py so that the HTTP surface holds HTTP only; this is what `main` starts and
stops.
"""

import asyncio

from apps import AppRegistry
from conversations import ConversationCheck
from dify_client import DifyClient
from identity import ClientKeys
from in_flight import InFlight
from pacing import FrameClock
from streaming import KeepAlive
from uploads import Uploads


class Proxy:
    """What every handler shares: the settings, the Dify connection, the app registry, the upload and
    conversation caches, the client keys and the answers in flight."""

    def __init__(self, settings, secret):
        self.settings = settings
        self.secret = secret
        self.dify = DifyClient(settings.dify_api_base, connect_timeout=settings.dify_connect_timeout,
                               idle_timeout=settings.dify_idle_timeout,
                               max_connections=settings.dify_max_connections, proxy=settings.dify_proxy,
                               no_proxy=settings.dify_no_proxy, ca_file=settings.ssl_cert_file,
                               ca_dir=settings.ssl_cert_dir)
        self.registry = AppRegistry(self.dify, settings.dify_api_keys, settings.model_refresh_interval)
        self.keepalive = KeepAlive(settings.keepalive_interval)
        self.frames = FrameClock.from_settings(settings)  # None when smoothing is off
        self.uploads = Uploads.from_settings(self.dify, settings)
        self.conversations = ConversationCheck(self.dify)
        self.clients = ClientKeys(secret, settings.valid_api_keys)
        self.refresher = None
        self.in_flight = InFlight()
        self.draining = False

    def start(self):
        self.refresher = asyncio.ensure_future(self.registry.keep_fresh())

    def close(self):
        if self.refresher is not None:
            self.refresher.cancel()
        self.keepalive.stop()
        if self.frames is not None:
            self.frames.stop()
        self.dify.close()
