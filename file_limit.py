"""The process's open-file limit, raised at start-up to what the streams need.

A stream holds two sockets (the client's and Dify's), so the common default soft limit of
1,024 open files fails at about 500 streams; the soft limit is raised to the hard one at
start-up, with one warning when even the hard limit is below what DIFY_MAX_CONNECTIONS needs.
"""

import logging
import resource

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
