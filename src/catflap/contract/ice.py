"""How an agent's runtime is given its ICE servers: PCC's ``ICE_CONFIG_URL`` and its document.

PCC's base image reads ``ICE_CONFIG_URL`` from its environment and GETs
``{"iceConfig": {"iceServers": [{urls, username, credential}]}}`` from it at each offer. catflap's
pool sets it, for an agent with ``[webrtc] ice_servers``, to a ``data:`` URL of that document,
so the credentials travel in the runtime's environment (readable by its own user only), never
on a command line, a socket or a disk; :mod:`catflap.runtime.webrtc` reads it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

__all__ = ["ICE_CONFIG_URL_ENV", "ice_config_data_url", "ice_config_document"]

#: PCC's base image reads its ICE servers from the URL in this environment variable.
ICE_CONFIG_URL_ENV = "ICE_CONFIG_URL"


def ice_config_document(ice_servers: list[dict[str, Any]]) -> dict[str, Any]:
    """PCC's ``{"iceConfig": {"iceServers": [...]}}`` (also ``/start``'s ``iceConfig``)."""
    return {"iceConfig": {"iceServers": ice_servers}}


def ice_config_data_url(ice_servers: list[dict[str, Any]]) -> str:
    """The ``ICE_CONFIG_URL`` that gives ``ice_servers`` with no server to ask."""
    document = json.dumps(ice_config_document(ice_servers), separators=(",", ":"))
    return "data:application/json;base64," + base64.b64encode(document.encode()).decode()
