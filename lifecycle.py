"""The process around the server: its open-file limit, its worker processes, and a graceful stop.

A stream holds two sockets (the client's and Dify's), so the common default soft limit of
1,024 open files fails at about 500 streams; the soft limit is raised to the hard one at
start-up. WORKERS > 1 uses Tornado's pre-fork model: the listening sockets are bound once,
then `fork_processes` starts the workers and restarts any that dies (logged by Tornado as
"child N (pid P) killed by signal S, restarting"); each worker builds its own event loop,
Dify client and app registry after the fork. On SIGTERM or SIGINT the parent passes the
signal on to the workers, and each worker stops accepting, lets open answers finish for up
to SHUTDOWN_GRACE_S, ends the rest with an error event and `[DONE]`, and exits 0.
"""

import asyncio
import logging
import os
import resource
import signal
import time

from tornado.process import fork_processes

from errors import APIError

log = logging.getLogger("opendify")

FILES_PER_STREAM = 2  # the client's socket and Dify's
SPARE_FILES = 100  # listening sockets, logs, the interpreter's own files


def raise_open_file_limit(dify_max_connections):
    """Raises the soft open-file limit to the hard one; one warning when even the hard limit is below
    what DIFY_MAX_CONNECTIONS streams need. Returns (soft before, soft now, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _kernel_file_ceiling()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, error)
            target = soft
    else:
        target = soft
    log.info("open-file limit: soft %s, raised to %s (hard %s)", _limit(soft), _limit(target), _limit(hard))
    needed = FILES_PER_STREAM * dify_max_connections + SPARE_FILES
    if target != resource.RLIM_INFINITY and target < needed:
        log.warning("the open-file limit (%d) is below the %d that DIFY_MAX_CONNECTIONS=%d streams need (two sockets "
                    "each), so about %d streams can be open at once: raise the hard limit (systemd: LimitNOFILE=65536; "
                    "Docker: --ulimit nofile=65536:65536; shell, as root: ulimit -Hn 65536) or lower "
                    "DIFY_MAX_CONNECTIONS", target, needed, dify_max_connections,
                    max(0, (target - SPARE_FILES) // FILES_PER_STREAM))
    return soft, target, hard


def _kernel_file_ceiling():
    try:
        with open("/proc/sys/fs/nr_open") as ceiling:
            return int(ceiling.read())
    except (OSError, ValueError):
        return 1 << 20


def _limit(value):
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


# --- workers ----------------------------------------------------------------------------------

_stop_requested = False  # a stop signal came; a worker forked after it (a restart) stops at once


def fork_workers(count):
    """Forks `count` workers; returns the worker's number in each worker. The parent stays here, restarting
    workers that die, until all have exited after a stop signal, then exits 0 (Tornado's fork_processes)."""
    parent = os.getpid()

    def pass_on(signum, frame):
        global _stop_requested
        _stop_requested = True
        log.info("%s: stopping the workers", signal.Signals(signum).name)
        for child in _children(parent):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    number = fork_processes(count)
    # A worker. Until its event loop takes over, a stop signal is only noted (dying of it would get the
    # worker restarted); and it is told to stop if the parent dies, so that no worker is left orphaned.
    signal.signal(signal.SIGTERM, _note_stop)
    signal.signal(signal.SIGINT, _note_stop)
    _stop_with_parent(parent)
    log.info("worker %d started (pid %d)", number, os.getpid())
    return number


def _note_stop(signum, frame):
    global _stop_requested
    _stop_requested = True


def _stop_with_parent(parent):
    """Linux: SIGTERM when the parent process dies (prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        _note_stop(signal.SIGTERM, None)


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listed:
            return [int(child) for child in listed.read().split()]
    except OSError:
        pass
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return children


# --- graceful stop ----------------------------------------------------------------------------

def shutting_down():
    return APIError(503, "The server is restarting and ended this answer; send the request again.",
                    type="server_error", code="server_shutting_down", retry=True)


class InFlight:
    """The answers being produced now, so that a stop can wait for them and then end the ones left.

    Each entry is a handler with `shut_down()`, which ends its answer with an error (an error event
    and `[DONE]` on a stream that started) and stops its Dify run."""

    def __init__(self):
        self.handlers = set()
        self.stops = set()  # Dify stop calls still under way

    def add(self, handler):
        self.handlers.add(handler)

    def discard(self, handler):
        self.handlers.discard(handler)

    def track(self, task):
        self.stops.add(task)
        task.add_done_callback(self.stops.discard)

    async def wait(self, seconds):
        """Waits until no answer is in flight, or `seconds` passed; whether none is left."""
        deadline = time.monotonic() + seconds
        while self.handlers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.handlers

    async def end_all(self, seconds=3.0):
        """Ends every answer still in flight and waits (at most `seconds`) for their Dify runs to be stopped."""
        ended = len(self.handlers)
        for handler in list(self.handlers):
            handler.shut_down()
        await self.wait(seconds)
        if self.stops:
            await asyncio.wait(list(self.stops), timeout=seconds)
        return ended


def on_stop_signal(callback):
    """Calls `callback` (once) on the running loop at SIGTERM or SIGINT, or at once if one came already."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, callback, signal.Signals(signum).name)
    if _stop_requested:
        loop.call_soon(callback, "stop signal")
