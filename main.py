"""OpenDify: Dify apps served as OpenAI models. Run with `python main.py`."""

import asyncio
import logging
import sys

from tornado.netutil import bind_sockets
from tornado.web import Application

import health
import metrics
import workers
from access_log import log_request
from config import ConfigError, load_settings
from file_limit import raise_open_file_limit
from handlers import NotFoundHandler, routes
from marks import derive_secret
from proxy import Proxy
from responses_handlers import response_routes
from server import ProxyHTTPServer

log = logging.getLogger("opendify")


def make_app(settings):
    """The Tornado application and the shared proxy state behind it."""
    secret = derive_secret(settings.mark_secret, list(settings.dify_api_keys) + list(settings.valid_api_keys))
    proxy = Proxy(settings, secret)
    app = Application(routes() + response_routes() + health.routes(), proxy=proxy,
                      default_handler_class=NotFoundHandler, log_function=log_request)
    return app, proxy


def start(settings, sockets=None):
    """Serves on `sockets` (by default, binds SERVER_HOST:SERVER_PORT), then keeps the model registry filled;
    call on a running event loop. Returns (server, proxy, port); the port is the bound one when SERVER_PORT is 0."""
    if settings.metrics_key:
        metrics.enable()
    app, proxy = make_app(settings)
    if sockets is None:
        sockets = bind_sockets(settings.server_port, settings.server_host)
    server = ProxyHTTPServer(app, max_body_size=settings.max_request_bytes)
    server.add_sockets(sockets)
    proxy.start()
    return server, proxy, sockets[0].getsockname()[1]


async def stop(server, proxy, grace):
    """Stops accepting, lets the answers in flight finish for up to `grace` seconds, ends the rest."""
    server.stop()
    proxy.draining = True
    waiting = len(proxy.in_flight.handlers)
    if waiting:
        log.info("stopping: waiting up to %g s for %d answer(s) in flight", grace, waiting)
    if not await proxy.in_flight.wait(grace):
        ended = await proxy.in_flight.end_all()
        log.warning("stopping: ended %d answer(s) still in flight after SHUTDOWN_GRACE_S=%g s", ended, grace)
    try:
        await asyncio.wait_for(server.close_all_connections(), 2)
    except asyncio.TimeoutError:
        pass
    proxy.close()


async def serve(settings, sockets):
    server, proxy, port = start(settings, sockets)
    log.info("OpenDify listening on http://%s:%d/v1", settings.server_host, port)
    stopping = asyncio.Event()
    workers.on_stop_signal(lambda name: (log.info("%s: stopping", name), stopping.set()))
    await stopping.wait()
    await stop(server, proxy, settings.shutdown_grace)
    log.info("stopped")


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
    raise_open_file_limit(settings.dify_max_connections)
    sockets = bind_sockets(settings.server_port, settings.server_host)
    if settings.workers == 1:
        run(serve(settings, sockets))
        return
    directory, made = metrics.shared_directory() if settings.metrics_key else (None, False)
    if directory:
        log.info("metrics of the %d workers are kept in %s", settings.workers, directory)
    try:
        workers.fork_workers(settings.workers)
    except BaseException:  # the parent, once every worker has exited (SystemExit) or too many died
        if made:
            metrics.remove_directory(directory)
        raise
    run(serve(settings, sockets))


if __name__ == "__main__":
    main()
