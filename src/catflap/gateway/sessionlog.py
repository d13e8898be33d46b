"""How a session names itself in the gateway's log: its logger, and its path without a token."""

from __future__ import annotations

import logging

from catflap.gateway.upgrade import UpgradeAccepted
from catflap.logs import SessionLog, session_log

__all__ = ["accepted_log", "log", "loggable"]

log = logging.getLogger("catflap.gateway")


def accepted_log(accepted: UpgradeAccepted | None) -> SessionLog:
    """The session's logger, with the agent and organisation once they are known."""
    if accepted is None:
        return session_log(log, "-")
    if accepted.agent is None:
        return session_log(log, accepted.session_id)
    host = accepted.agent.service_host
    return session_log(log, accepted.session_id, agent=host.agent, org=host.org)


def loggable(path: str) -> str:
    """The path without a token segment: tokens never go to the log."""
    parts = path.split("/")
    keep = 4 if len(parts) > 2 and parts[2] == "generic" else 3
    return "/".join(parts[:keep]) + ("/<token>" if len(parts) > keep else "")
