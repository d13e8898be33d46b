"""Start-up steps the long-running commands share: the connection budget (open files), and a
clear message when the listening address cannot be taken."""

from __future__ import annotations

import errno
import logging
import os
import re
import resource

from catflap.contract.errors import StartupError

__all__ = ["listen_failure", "raise_open_file_limit"]

log = logging.getLogger("catflap")

#: macOS reports an unlimited hard limit but refuses a soft limit above OPEN_MAX.
_OPEN_MAX_WHEN_UNLIMITED = 10240
#: Both asyncio and uvloop name the address in the bind error: ``... address ('HOST', PORT...``.
_ADDRESS_IN_MESSAGE = re.compile(r"\('([^']*)', (\d+)")


def raise_open_file_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit, and log the limit in force.

    Every relayed session holds two sockets (client and agent), so the common soft default of
    1024 would refuse connections long before ``[gateway] max_connections``; the hard limit is
    what the administrator allows, and the soft one is only a default a process may raise. Agent
    processes started afterwards inherit it.

    Returns:
        The soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _OPEN_MAX_WHEN_UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning(
                "! open files limited to %d: could not raise it to %d (%s)", soft, target, exc
            )
            return soft
        log.info("= open files: %d (RLIMIT_NOFILE soft limit raised from %d)", target, soft)
        return target
    log.info("= open files: %d (RLIMIT_NOFILE soft limit, already the hard limit)", soft)
    return soft


#: How a user moves the main listener, in both ``catflap serve`` and ``catflap gateway``.
LISTEN_OPTION = "--listen HOST:PORT (or listen in the config file)"


def listen_failure(
    exc: OSError,
    host: str,
    port: int,
    *,
    option: str = LISTEN_OPTION,
    tls: tuple[str, int] | None = None,
) -> StartupError:
    """The message for a listening socket that could not be opened.

    Args:
        exc: What binding raised.
        host: The address catflap was told to listen on, named when ``exc`` names none.
        port: Its port.
        option: How the user changes ``host:port``, e.g. ``--listen HOST:PORT``.
        tls: ``listen_tls`` as ``(host, port)``, when there is one.
    """
    match = _ADDRESS_IN_MESSAGE.search(str(exc))
    if match is not None:
        if tls is not None and int(match.group(2)) == tls[1] and tls[1] != port:
            option = "--listen-tls HOST:PORT (or listen_tls in the config file)"
        elif port and int(match.group(2)) != port:  # not the main port: the /metrics listener
            option = "[gateway] metrics_listen in the config file"
        host, port = match.group(1), int(match.group(2))
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        advice = (
            f"another process is listening there (`ss -ltnp 'sport = :{port}'` shows which); "
            f"stop it, or choose another address with {option}"
        )
    elif exc.errno == errno.EACCES:
        advice = (
            "ports below 1024 need root or CAP_NET_BIND_SERVICE; "
            f"choose a port above 1023 with {option}"
        )
    elif exc.errno == errno.EADDRNOTAVAIL:
        advice = f"this machine has no such address; choose one of its own with {option}"
    else:
        advice = f"choose another address with {option}"
    # Not exc.strerror: asyncio and uvloop put their whole sentence, address included, there.
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return StartupError(f"cannot listen on {shown}: {reason}; {advice}")
