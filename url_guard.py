"""Which image URLs may be handed to Dify: none that points inside the operator's network.

The proxy never fetches a client's URL, but Dify does, from inside its own network: a URL
naming a loopback, link-local (cloud metadata at 169.254.169.254), private or otherwise
non-public address would let anyone holding a client key reach what only Dify's host can,
whenever Dify runs without its SSRF proxy. So the host is resolved (off the event loop,
bounded in time) and every address it has must be public; the forms that make parsers
disagree (credentials before the host, backslashes, decimal, octal or hex IPv4 numbers) are
refused outright. ALLOW_PRIVATE_URLS=on lets operators whose Dify should reach private
addresses do so. What Dify resolves later may differ (DNS rebinding): Dify's SSRF proxy is
the complete answer; this check keeps the proxy from being the open door.
"""

import asyncio
import ipaddress
import re
import socket
from urllib.parse import urlsplit

from errors import APIError

RESOLVE_TIMEOUT = 5.0  # s to resolve an image URL's host
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NUMERIC_HOST = re.compile(r"(?i)(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*\.?")


def non_public(address):
    """Why an address is not a public one (e.g. 'loopback'), or None when it is public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
                                                      if ip in _NAT64 else None)
        if embedded is not None:
            return non_public(str(embedded))
    for reason in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, "is_" + reason):
            return reason.replace("_", "-")
    return None if ip.is_global else "not public"


async def system_resolver(host, port):
    """Every address `host` resolves to, from the system resolver in an executor thread."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


class URLGuard:
    """Refuses URLs into the operator's network with a 400 naming the part; `resolve` is the resolver
    (the system's by default)."""

    def __init__(self, allow_private=False, resolve=system_resolver, timeout=RESOLVE_TIMEOUT):
        self.allow_private = allow_private
        self.resolve = resolve
        self.timeout = timeout

    async def check(self, where, url):
        parts = urlsplit(url)
        if "@" in parts.netloc or "\\" in url:
            raise refused(where, "has credentials or a backslash before its host, which parsers read differently")
        host = parts.hostname or ""
        if self.allow_private:
            return
        if _NUMERIC_HOST.fullmatch(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise refused(where, f"names its host as the number '{host}'; write an IP address as a.b.c.d")
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            addresses = await self._resolved(where, host, parts.port or (443 if parts.scheme == "https" else 80))
        for address in addresses:
            reason = non_public(address)
            if reason:
                shown = host if address == host else f"{host} ({address})"
                raise refused(where, f"points to {shown}, a {reason} address inside this server's network",
                              setting=True)

    async def _resolved(self, where, host, port):
        try:
            addresses = await asyncio.wait_for(self.resolve(host, port), self.timeout)
        except (OSError, UnicodeError, asyncio.TimeoutError):
            addresses = []
        if not addresses:
            raise refused(where, f"names the host '{host}', which does not resolve from this server")
        return addresses


def refused(where, why, setting=False):
    """The 400 for an image URL at `where`; `setting`: whether ALLOW_PRIVATE_URLS=on would let it through."""
    hint = (" Dify would fetch it from inside its own network. Send the image itself (a base64 data: URL)"
            + (", or have the operator set ALLOW_PRIVATE_URLS=on if such URLs are meant to work." if setting else "."))
    return APIError(400, f"The image URL in {where} {why}.{hint}", code="url_not_allowed", param=where)
