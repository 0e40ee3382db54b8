"""Worker processes and stop signals: WORKERS > 1, and SIGTERM/SIGINT for every process.

WORKERS > 1 uses Tornado's pre-fork model: the listening sockets are bound once, then
`fork_processes` starts the workers and restarts any that dies (logged by Tornado as
"child N (pid P) killed by signal S, restarting"); each worker builds its own event loop,
Dify client and app registry after the fork. On SIGTERM or SIGINT the parent passes the
signal on to the workers, and each worker (or the one process) stops accepting, lets open
answers finish for up to SHUTDOWN_GRACE_S (see in_flight.py), and exits 0.
"""

import asyncio
import logging
import os
import signal

from tornado.process import fork_processes

log = logging.getLogger("opendify")

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


def on_stop_signal(callback):
    """Calls `callback` (once) on the running loop at SIGTERM or SIGINT, or at once if one came already."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, callback, signal.Signals(signum).name)
    if _stop_requested:
        loop.call_soon(callback, "stop signal")
