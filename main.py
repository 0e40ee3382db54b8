"""OpenDify: Dify apps served as OpenAI models. Run with `python main.py`."""

import asyncio
import logging
import sys

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application

from config import ConfigError, load_settings
from handlers import NotFoundHandler, Proxy, log_request, routes
from marks import derive_secret
from responses_handlers import response_routes

log = logging.getLogger("opendify")


def make_app(settings):
    """The Tornado application and the shared proxy state behind it."""
    secret = derive_secret(settings.mark_secret, list(settings.dify_api_keys) + list(settings.valid_api_keys))
    proxy = Proxy(settings, secret)
    app = Application(routes() + response_routes(), proxy=proxy, default_handler_class=NotFoundHandler, log_function=log_request)
    return app, proxy


def start(settings):
    """Listens, then keeps the model registry filled; call on a running event loop.
    Returns (server, proxy, port); the port is the bound one when SERVER_PORT is 0."""
    app, proxy = make_app(settings)
    sockets = bind_sockets(settings.server_port, settings.server_host)
    server = HTTPServer(app, max_body_size=settings.max_request_bytes)
    server.add_sockets(sockets)
    proxy.start()
    return server, proxy, sockets[0].getsockname()[1]


async def serve(settings):
    server, proxy, port = start(settings)
    log.info("OpenDify listening on http://%s:%d/v1", settings.server_host, port)
    try:
        await asyncio.Event().wait()
    finally:
        server.stop()
        proxy.close()


def run(coroutine):
    """Runs on uvloop when it is installed (requirements.txt lists it where it builds): measured with
    bench/run.py, it cuts the proxy's CPU per relayed chunk by about a third. Plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def main():
    try:
        settings = load_settings()
    except ConfigError as error:
        sys.stderr.write(f"opendify: configuration error: {error}\n")
        sys.exit(2)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(serve(settings))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
