"""A recording forward proxy on loopback, for the egress-proxy tests.

It answers both ways a client uses a proxy: `CONNECT host:port` opens a tunnel (HTTPS
origins), and an absolute-URI request (`POST http://host:port/path`) is passed on to the
origin in origin form. Every request line it receives is recorded. One request per
proxy connection: the forwarded request asks the origin to close after answering,
so the proxy only ever pipes bytes and never parses a response.
"""

import asyncio
from urllib.parse import urlsplit


class RecordingProxy:
    def __init__(self):
        self.requests = []  # request lines, as received
        self.port = 0
        self._server = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    async def start(self):
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self):
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        first, _, rest = head.decode("latin1").partition("\r\n")
        self.requests.append(first)
        method, target, version = first.split(" ", 2)
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            parts = urlsplit(target)
            upstream_reader, upstream_writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            headers = [line for line in rest.split("\r\n")
                       if line and not line.lower().startswith(("connection:", "proxy-connection:"))]
            origin_form = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            upstream_writer.write("\r\n".join([f"{method} {origin_form} {version}", *headers, "Connection: close",
                                               "", ""]).encode("latin1"))
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))


async def _pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
